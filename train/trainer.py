"""The SimMER pretraining loop.

Each step: FFCV loader (uint8 batch on the device) -> K-view Kornia augmentation on the device
-> encoder over all K·B views at once (channels-last, AMP on GPU) -> SimMER loss in float32 ->
Adam, with the learning rate set per step (linear warm-up, then cosine).

The steady-state step makes no host-device sync: loss parts are summed on the device and read
once every ``run.log_every`` steps (progress bar, divergence check) and at the end of the epoch.

Run directory layout (``run.dir``)::

    config.yaml            the resolved config of the latest start
    log.jsonl              one JSON object per epoch (losses, lr, images/s, health, knn_top1)
    checkpoints/last.pt    written atomically after every epoch and on SIGTERM/SIGINT
    backbone.pt            the backbone's weights, loadable by timm (see train.model)
    summary.json           the final summary
    .lock                  held by the running process (train.rundir): one run at a time

Re-running the same command resumes from ``checkpoints/last.pt``; on one process with a fixed
seed the resume is exact (weights and logged losses), also from a mid-epoch SIGTERM. A resume
that would change the encoder, the schedule or the data is refused (train.checkpoint).
Distributed (``torchrun``): DDP, the FFCV distributed loader, the loss on the global batch;
``cfg.batch_size`` is global. Rank 0 alone writes files.
"""
from __future__ import annotations

import gc
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from augment import build_augmentation, build_eval_transform, resolve_preset
from core.config import ConfigError, UserError
from core.io import append_jsonl, atomic_write, read_jsonl, write_jsonl
from core.progress import progress_bar
from core.schedule import lr_at
from data_prep.loader import BetonLoader, inspect_beton
from eval.features import embed_images, extract_features, knn_accuracy
from train.checkpoint import CheckpointWriter, check_compatible, load_checkpoint, rng_state, save_backbone, set_rng_state
from train.cluster import requeue, slurm_job_id
from train.loss import effective_rank, nearest_neighbour_distance, simmer_loss
from train.methods import get_method
from train.model import build_encoder_from_cfg
from train.probe import OnlineProbe
from train.rundir import RunDir
from train.tracking import Tracker, parse_loggers, views_grid

PART_NAMES = get_method("simmer").log_names  # ("loss", "tv", "entropy", "rank"); other methods: TrainStep.part_names
PART_FORMATS = {"entropy": ".3f", "rank": ".1f"}  # how the progress bar and the epoch line print a part (else .4f)
PART_SHORT = {"entropy": "H", "rank": "R"}  # the progress bar's short names
COLLAPSE_RANK = 2.0  # effective rank of zbar below this: (dimensional) collapse
COLLAPSE_RANK_SHARE = 0.02  # ... or below this fraction of min(N, D): dimensional collapse from the start
COLLAPSE_RANK_DROP = 0.4  # ... or below this fraction of the run's highest effective rank so far
COLLAPSE_STD = 1e-3  # per-dimension std of zbar below this: collapse to a point
KNN_BATCH = {"cuda": 2048, "cpu": 512}  # images per forward of the kNN monitor (eval mode, no gradient)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------- config
def validate_config(config: dict, check_files: bool = True) -> None:
    """Raises :class:`ConfigError` (or a beton error) for an impossible config, before any work.

    Single values were checked against their declared ranges when parsed; these are the checks
    that need several values, the machine or the files.
    """
    import timm

    cfg, run = config["cfg"], config["run"]
    parse_loggers(run["logger"])
    problems = []
    if not timm.is_model(cfg["arch"]):
        problems.append(f"cfg.arch={cfg['arch']!r} is not a timm model (e.g. resnet18, resnet50)")
    if run["device"] == "cuda" and not torch.cuda.is_available():
        problems.append("run.device=cuda but no CUDA device is available (use run.device=cpu or auto)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg["batch_size"] % world or cfg["batch_size"] // world < 2:
        problems.append(f"cfg.batch_size={cfg['batch_size']} (global) must split into >= 2 images on each of {world} processes")
    if problems:
        raise ConfigError("; ".join(problems))
    if check_files:
        train_info = inspect_beton(config["data"]["train_beton"])
        if run["knn_every"] and train_info.labelled:  # unlabelled data: no monitor (see _setup)
            inspect_beton(config["data"]["test_beton"])
        if cfg["image_size"] == 0 and train_info.fixed_size is None:
            raise ConfigError(f"{train_info.path} holds images of several sizes: set cfg.image_size")


def health(zbar: torch.Tensor, peak_rank: float = 0.0) -> dict[str, float]:
    """Collapse indicators of embeddings (N, D): mean per-dimension std, effective rank, mean NN distance.

    The run passes the held-out images' embeddings (``run.health_images``, eval mode), or the last
    training batch's zbar when that is 0; the log keys keep the ``zbar_`` names either way.

    ``collapsed`` is a heuristic: the effective rank is below 2, or below 2 % of min(N, D) (a few
    dimensions of many: SimMER without its entropy and rank terms reaches this on real CIFAR-10
    within an epoch, docs/LOSS.md), or below 40 % of ``peak_rank`` (the highest effective rank the
    run has logged: dimensions are being lost), or the spread is ~0.
    """
    zbar = zbar.detach().float()
    figures = {
        "zbar_std": zbar.std(dim=0).mean().item(),
        "zbar_effective_rank": effective_rank(zbar).item(),
        "zbar_nn_distance": nearest_neighbour_distance(zbar).item(),
    }
    rank = figures["zbar_effective_rank"]
    figures["collapsed"] = bool(rank < max(COLLAPSE_RANK, COLLAPSE_RANK_SHARE * min(zbar.shape))
                                or rank < COLLAPSE_RANK_DROP * peak_rank or figures["zbar_std"] < COLLAPSE_STD)
    return figures


def held_out_images(data: dict, count: int, image_size: int, device: torch.device) -> torch.Tensor:
    """The fixed images of the health figures: ``count`` evenly spaced images (all when fewer) of
    ``data.test_beton``, or of the training beton when there is no test beton; uint8 on ``device``."""
    path = data["test_beton"] if Path(data["test_beton"]).is_file() else data["train_beton"]
    loader = BetonLoader(path, KNN_BATCH[device.type], train=False, device=device,
                         num_workers=data["num_workers"], image_size=image_size)
    chosen = np.unique(np.linspace(0, loader.num_samples - 1, min(count, loader.num_samples)).round().astype(np.int64))
    kept, start = [], 0
    for batch in loader:
        inside = chosen[(chosen >= start) & (chosen < start + len(batch.images))] - start
        kept.append(batch.images[torch.as_tensor(inside, device=device)])  # a copy: batches are reused buffers
        start += len(batch.images)
    return torch.cat(kept)


def _health_embeddings(state: _Run, result: _Epoch) -> torch.Tensor | None:
    """What the epoch's health figures are computed on: the held-out images' z in eval mode
    (RankMe's protocol: independent of the batch size), or the last training batch's zbar."""
    if state.health_images is None:
        return result.zbar
    amp = state.parts.step.amp_dtype is not None
    return embed_images(state.parts.encoder, state.health_images, state.parts.eval_transform,
                        KNN_BATCH[state.device.type], amp=amp)


# ------------------------------------------------------------------------------------- pieces
class _StopFlag:
    """SIGTERM, SIGINT and SIGUSR1 (a cluster's warning signal) set a flag; the loop finishes its
    step, checkpoints and returns."""

    def __init__(self) -> None:
        self.requested = False
        self.by_user = False  # Ctrl-C: never requeue
        self._previous = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        self.by_user = self.by_user or signum == signal.SIGINT
        print(f"\nreceived {signal.Signals(signum).name}: finishing the step and saving a checkpoint", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _init_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    if world > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank = torch.distributed.get_rank()
    else:
        rank = 0
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_settings(run: dict, device: torch.device) -> tuple[bool, torch.dtype | None]:
    """(enabled, dtype) of autocast for ``run['amp']`` (-1 = on for CUDA): bf16 where supported, else fp16."""
    enabled = (device.type == "cuda") if run["amp"] == -1 else bool(run["amp"])
    if not enabled:
        return False, None
    if device.type == "cuda":
        return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return True, torch.bfloat16


class TrainStep:
    """The optimisation step of every method: ``step(images) -> (parts, zbar)``.

    ``images``: uint8 (B, 3, H, W) on the device. K views are made on the device (:meth:`views`),
    the model runs over all K·B views at once under autocast when ``amp_dtype`` is set
    (:meth:`forward`), the loss in float32 (:meth:`loss`), then backward (:meth:`backward`) and the
    optimiser step through ``scaler`` (:meth:`optimise`); the benchmarks time these stages one by
    one. With a ``probe`` and ``labels``, the online probe then trains on the first view's
    detached backbone features. Returns ``parts``, the detached figures named by ``part_names``
    (the total, then the loss's parts: SimMER's ``[loss, tv, entropy, rank]``) on the device (no
    host sync), and ``zbar`` (B, D). With ``predict`` (SimSiam) the model also returns the
    predictor's outputs, which the loss takes after z.
    """

    def __init__(self, model: torch.nn.Module, augment: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, loss_fn=simmer_loss,
                 probe: OnlineProbe | None = None, part_names: tuple[str, ...] = PART_NAMES, predict: bool = False,
                 **loss_options):
        self.model, self.augment, self.optimizer, self.scaler = model, augment, optimizer, scaler
        self.amp_dtype, self.loss_fn, self.loss_options, self.probe = amp_dtype, loss_fn, loss_options, probe
        self.part_names, self.predict = tuple(part_names), predict
        self.features: torch.Tensor | None = None  # (B, F) of the first view, for the probe
        self.predictions: torch.Tensor | None = None  # (K, B, D) of the predictor, for the loss

    def views(self, images: torch.Tensor) -> torch.Tensor:
        return self.augment(images)  # (K, B, 3, h, w), channels-last

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        with torch.autocast(views.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            if self.probe is None and not self.predict:
                return self.model(views)  # (K, B, D)
            outputs = self.model(views, return_features=self.probe is not None,
                                 **({"predict": True} if self.predict else {}))
        if self.predict:
            self.predictions = outputs[1]
        if self.probe is not None:
            self.features = outputs[-1][0]
        return outputs[0]

    def loss(self, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.predict:
            return self.loss_fn(z, **self.loss_options)
        predictions, self.predictions = self.predictions, None
        return self.loss_fn(z, predictions, **self.loss_options)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def optimise(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.forward(self.views(images))
        loss, parts = self.loss(z)
        self.backward(loss)
        self.optimise()
        if self.probe is not None and labels is not None:
            self.probe.update(self.features, labels)
        self.features = None
        detached = torch.stack([loss.detach(), *(parts[name].detach() for name in self.part_names[1:])])
        return detached, z.detach().float().mean(0)


@dataclass
class TrainingParts:
    """What a training step is made of, built by :func:`build_training` (also for the benchmarks)."""

    encoder: torch.nn.Module  # the plain encoder: what checkpoints save and the kNN monitor reads
    model: torch.nn.Module  # what the step runs: the encoder, compiled and/or DDP-wrapped
    augment: torch.nn.Module
    eval_transform: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: TrainStep


def build_training(cfg: dict, run: dict, device: torch.device, image_size: int, world: int = 1,
                   resume: dict | None = None, num_classes: int = 0) -> TrainingParts:
    """The encoder, augmentation, Adam, scaler and step of pretraining, as ``cfg`` and ``run`` say.

    ``cfg['method']`` (train.methods) picks the loss, its options and whether the encoder has a
    predictor; the rest is the same for every method.

    ``resume`` (a checkpoint) restores the weights, optimiser, scaler and probe before the model is
    wrapped for DDP (``world`` > 1) and compiled (``run.compile``, -1 = on for CUDA). The online
    probe (``run.probe``) needs ``num_classes`` > 0.
    """
    use_amp, amp_dtype = amp_settings(run, device)
    preset = resolve_preset(cfg["augment"], image_size)
    encoder = build_encoder_from_cfg(cfg, image_size).to(device)
    augment = build_augmentation(preset, cfg["K"], image_size,
                                 dtype=amp_dtype if use_amp and amp_dtype == torch.bfloat16 else torch.float32).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the shapes are fixed: let cuDNN pick its fastest kernels once
    optimizer = torch.optim.Adam(encoder.parameters(), lr=cfg["lr"] * cfg["batch_size"] / 256,
                                 weight_decay=cfg["weight_decay"], fused=device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    if resume is not None:
        encoder.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler") is not None and scaler.is_enabled():
            scaler.load_state_dict(resume["scaler"])
    probe = OnlineProbe(encoder.num_features, num_classes, device=device) if run["probe"] and num_classes else None
    if probe is not None and resume is not None and resume.get("probe") is not None:
        probe.load(resume["probe"])
    method = get_method(cfg.get("method", "simmer"))
    model, loss_fn = encoder, method.loss
    if world > 1:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if (device.type == "cuda") if run["compile"] == -1 else bool(run["compile"]):
        model, loss_fn = torch.compile(model), torch.compile(method.loss)
    step = TrainStep(model, augment, optimizer, scaler, amp_dtype if use_amp else None, loss_fn, probe,
                     method.log_names, method.predictor, **method.options(cfg))
    return TrainingParts(encoder, model, augment, build_eval_transform(preset).to(device), optimizer, scaler, step)


# ------------------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """Everything a run keeps between steps and epochs: set up by :func:`_setup`, changed by the loop."""

    config: dict
    rank: int
    world: int
    device: torch.device
    loader: BetonLoader
    parts: TrainingParts
    knn_loaders: tuple[BetonLoader, BetonLoader] | None
    steps_per_epoch: int
    warmup_steps: int
    step: int = 0  # optimiser steps so far: the schedule position
    start_epoch: int = 0
    epochs_done: int = 0
    skip_batches: int = 0  # steps of ``start_epoch`` done before a mid-epoch stop
    carried_sums: torch.Tensor | None = None  # that epoch's partial loss sums
    peak_rank: float = 0.0
    health_images: torch.Tensor | None = None  # the held-out uint8 images of the health figures (rank 0)
    last_knn: float | None = None
    images_seen: int = 0
    interrupted: bool = False
    cpu_estimate_due: bool = False
    started: float = field(default_factory=time.perf_counter)
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)
    tracker: Tracker | None = None

    @property
    def cfg(self) -> dict:
        return self.config["cfg"]

    @property
    def run(self) -> dict:
        return self.config["run"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def files(self) -> RunDir:
        return RunDir(self.run["dir"])

    @property
    def checkpoint_path(self) -> Path:
        return self.files.last_checkpoint

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg["epochs"]

    @property
    def peak_lr(self) -> float:
        return self.cfg["lr"] * self.cfg["batch_size"] / 256

    @property
    def show(self) -> bool:
        return bool(self.run["progress"]) and self.is_main

    def checkpoint(self, epochs_done: int, batch_in_epoch: int = 0, sums: torch.Tensor | None = None) -> dict:
        parts = self.parts
        return {"model": parts.encoder.state_dict(), "optimizer": parts.optimizer.state_dict(),
                "scaler": parts.scaler.state_dict() if parts.scaler.is_enabled() else None, "step": self.step,
                "epoch": epochs_done, "batch_in_epoch": batch_in_epoch,
                "epoch_sums": None if sums is None else sums.cpu(), "rng": rng_state(), "config": self.config,
                "steps_per_epoch": self.steps_per_epoch, "wandb_id": self.tracker.wandb_id,
                "probe": None if parts.step.probe is None else parts.step.probe.state()}


@dataclass
class _Epoch:
    """What one pass over the loader produced."""

    sums: torch.Tensor  # summed [loss, *parts] (TrainStep.part_names) of the epoch's steps, on the device
    done: int  # steps of this epoch done (including those before a resume)
    images: int = 0  # images trained on in this invocation (all processes)
    seconds: float = 0.0
    zbar: torch.Tensor | None = None  # the last step's zbar (B, D)
    stopped: bool = False  # a signal stopped it before its last step


def _completed(config: dict, resume: dict | None, is_main: bool, world: int) -> dict | None:
    """The summary of a run that is already complete (nothing left to do), else None."""
    summary_path = RunDir(config["run"]["dir"]).summary
    if resume is None or resume["epoch"] < config["cfg"]["epochs"] or not summary_path.is_file():
        return None
    if is_main:
        print(f"{config['run']['dir']} is complete ({resume['epoch']}/{config['cfg']['epochs']} epochs); nothing to do. "
              "Raise cfg.epochs to train further, or use another run.dir.", flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    return json.loads(summary_path.read_text())


def _setup(config: dict, rank: int, world: int, device: torch.device, resume: dict | None) -> _Run:
    """Builds the loaders and the training parts, restores ``resume``, and prepares the run directory."""
    cfg, data, run = config["cfg"], config["data"], config["run"]
    _seed_everything(cfg["seed"])
    info = inspect_beton(data["train_beton"])
    image_size = cfg["image_size"] or info.fixed_size[0]
    loader = BetonLoader(data["train_beton"], cfg["batch_size"] // world, train=True, device=device,
                         num_workers=data["num_workers"], seed=cfg["seed"], image_size=cfg["image_size"] or None)
    steps_per_epoch = min(len(loader), run["steps_per_epoch"]) if run["steps_per_epoch"] else len(loader)
    if resume is not None:
        check_compatible(resume, config, RunDir(run["dir"]).last_checkpoint, steps_per_epoch)
    parts = build_training(cfg, run, device, image_size, world, resume, num_classes=info.num_classes)
    knn_loaders = None
    if rank == 0 and not info.labelled and (run["knn_every"] or run["probe"]):
        print(f"{data['train_beton']} is unlabelled: the kNN monitor and the online probe are off", flush=True)
    if rank == 0 and run["knn_every"] and info.labelled:
        knn_loaders = tuple(BetonLoader(path, KNN_BATCH[device.type], train=False, device=device, num_workers=data["num_workers"],
                                        image_size=image_size) for path in (data["train_beton"], data["test_beton"]))
    state = _Run(config, rank, world, device, loader, parts, knn_loaders, steps_per_epoch,
                 warmup_steps=round(cfg["warmup_epochs"] * steps_per_epoch), cpu_estimate_due=device.type != "cuda")
    if rank == 0 and run["health_images"]:
        state.health_images = held_out_images(data, run["health_images"], image_size, device)
    if resume is not None:
        state.step, state.start_epoch = resume["step"], resume["epoch"]
        state.epochs_done = state.start_epoch
        state.skip_batches, state.carried_sums = resume.get("batch_in_epoch", 0), resume.get("epoch_sums")
        set_rng_state(resume["rng"])
        if rank:
            torch.manual_seed(cfg["seed"] + 1000 * state.start_epoch + rank)
        if rank == 0:
            where = f"epoch {state.start_epoch + 1}" + (f", step {state.skip_batches + 1}" if state.skip_batches else "")
            print(f"resuming {state.checkpoint_path} at {where}", flush=True)
    elif rank:
        torch.manual_seed(cfg["seed"] + rank)  # different views on each rank; weights come from rank 0 (DDP)
    if state.is_main:  # the log keeps the epochs the checkpoint has (later ones were lost with a crash)
        history = [line for line in read_jsonl(state.files.log) if line["epoch"] <= state.start_epoch]
        state.last_knn = next((line["knn_top1"] for line in reversed(history) if "knn_top1" in line), None)
        state.peak_rank = max((line.get("zbar_effective_rank", 0.0) for line in history), default=0.0)
        atomic_write(state.files.config, lambda handle: yaml.safe_dump(config, handle, sort_keys=False), binary=False)
        write_jsonl(state.files.log, history)
    state.tracker = Tracker(state.files.path, parse_loggers(run["logger"]) if state.is_main else (), config,
                            resume_step=None if resume is None else state.step,
                            wandb_id=None if resume is None else resume.get("wandb_id"),
                            wandb_project=run["wandb_project"], wandb_mode=run["wandb_mode"])
    return state


def _run_epoch(state: _Run, epoch: int, stop: _StopFlag) -> _Epoch:
    """One pass over the loader (from ``state.skip_batches`` on): the steps, synced every ``run.log_every``."""
    state.loader.set_epoch(epoch)
    state.parts.encoder.train()
    result = _Epoch(torch.zeros(len(state.parts.step.part_names), device=state.device), done=state.skip_batches)
    if state.skip_batches and state.carried_sums is not None:
        result.sums += state.carried_sums.to(state.device)
    total = state.steps_per_epoch
    bar = progress_bar(total=total, initial=state.skip_batches, desc=f"epoch {epoch + 1}/{state.cfg['epochs']}",
                       unit="step", leave=True, enabled=state.show)
    started = window_start = time.perf_counter()
    window_images = 0
    batches = iter(state.loader)
    try:
        for batch_index, batch in enumerate(batches):
            if batch_index >= total:
                break
            if batch_index < state.skip_batches:
                continue
            for group in state.parts.optimizer.param_groups:
                group["lr"] = lr_at(state.step, state.total_steps, state.peak_lr, state.warmup_steps)
            try:
                parts, result.zbar = state.parts.step(batch.images, batch.labels)
            except torch.linalg.LinAlgError as error:  # the SVD met NaN/inf representations
                raise TrainingDiverged(_divergence(state, epoch, str(error).split(":")[0])) from None
            result.sums += parts
            state.step += 1
            result.done = batch_index + 1
            images = len(batch.images) * state.world
            result.images += images
            window_images += images
            bar.update(1)
            estimate_now = state.cpu_estimate_due and window_images >= 2 * len(batch.images) * state.world
            sync_now = state.step % state.run["log_every"] == 0 or result.done == total or estimate_now
            if sync_now:
                _sync_point(state, epoch, parts, bar, window_images / max(time.perf_counter() - window_start, 1e-9))
                window_start, window_images = time.perf_counter(), 0
            if state.world > 1 and sync_now:  # ranks agree on stopping at the sync points only
                flag = torch.tensor([float(stop.requested)], device=state.device)
                torch.distributed.all_reduce(flag)
                stop.requested = bool(flag.item())
            if stop.requested and result.done < total and (state.world == 1 or sync_now):
                result.stopped = True
                break
    finally:  # whatever ends the epoch (its end, a signal, an error): ffcv's thread stops here
        batches.close()
        bar.close()
    result.seconds = time.perf_counter() - started
    return result


def _divergence(state: _Run, epoch: int, detail: str) -> str:
    return (f"the loss became non-finite at epoch {epoch + 1}, step {state.step} ({detail}); the last good "
            f"checkpoint {state.checkpoint_path} is kept. Lower cfg.lr or check cfg.alpha_h / cfg.alpha_r.")


def _sync_point(state: _Run, epoch: int, parts: torch.Tensor, bar, rate: float) -> None:
    """The one host sync of a window: the divergence check, the progress bar, the CPU time estimate."""
    values, names = parts.tolist(), state.parts.step.part_names
    if not all(math.isfinite(v) for v in values):
        raise TrainingDiverged(_divergence(state, epoch, ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values))))
    bar.set_postfix(**{PART_SHORT.get(n, n): format(v, PART_FORMATS.get(n, ".4f")) for n, v in zip(names, values)},
                    lr=f"{state.parts.optimizer.param_groups[0]['lr']:.2e}", img_s=f"{rate:.0f}", refresh=False)
    state.tracker.scalars({**{f"train/{n}": v for n, v in zip(names, values)},
                           "train/lr": state.parts.optimizer.param_groups[0]["lr"], "train/images_per_s": rate}, state.step)
    if state.cpu_estimate_due:
        state.cpu_estimate_due = False
        remaining = (state.total_steps - state.step) * state.cfg["batch_size"] / max(rate, 1e-9)
        if remaining > 3600 and state.is_main:
            warnings.warn(f"running on CPU at {rate:.0f} images/s: this run would take about {remaining / 3600:.1f} h. "
                          "Use a GPU, or try -C configs/demo.yaml for a CPU-sized run.", stacklevel=1)


def _average_over_ranks(state: _Run, result: _Epoch) -> None:
    """Makes ``result.sums`` the mean over ranks: the TV part is local to each rank's shard, and the
    mean of the ranks' values is the loss of the global batch (docs/LOSS.md). One collective."""
    if state.world > 1:
        torch.distributed.all_reduce(result.sums)
        result.sums /= state.world


def _save_mid_epoch(state: _Run, epoch: int, result: _Epoch) -> None:
    """A signal stopped the epoch: checkpoint its position and partial sums so that a re-run continues it."""
    state.interrupted = True
    _average_over_ranks(state, result)  # every rank carries these sums into the resumed epoch
    if state.is_main:
        state.writer.save(state.checkpoint_path, state.checkpoint(epoch, result.done, result.sums), background=False)
        print(f"stopped in epoch {epoch + 1} after step {result.done}/{state.steps_per_epoch}; checkpoint saved to "
              f"{state.checkpoint_path}. Re-run the same command to resume.", flush=True)


def _end_epoch(state: _Run, epoch: int, result: _Epoch) -> bool:
    """Health figures, kNN monitor, log line and checkpoint of a finished epoch; True when the run stops here."""
    cfg, run = state.cfg, state.run
    state.skip_batches, state.carried_sums = 0, None
    state.epochs_done = epoch + 1
    state.images_seen += result.images
    _average_over_ranks(state, result)
    means = (result.sums / max(1, result.done)).tolist()
    line = {"epoch": epoch + 1, **dict(zip(state.parts.step.part_names, means)), "lr": state.parts.optimizer.param_groups[0]["lr"],
            "images_per_s": result.images / max(result.seconds, 1e-9), "epoch_seconds": result.seconds,
            "step": state.step}
    embeddings = _health_embeddings(state, result) if state.is_main else None
    if embeddings is not None:
        line.update(health(embeddings, state.peak_rank))
        if state.health_images is not None:
            line["health_images"] = len(embeddings)
        if state.tracker.active:
            singular_values = torch.linalg.svdvals(embeddings.detach().float()).cpu()
            state.tracker.histogram("epoch/zbar_singular_values", singular_values, state.step)
        state.peak_rank = max(state.peak_rank, line["zbar_effective_rank"])
        if line["collapsed"] and state.is_main:
            warnings.warn(f"epoch {epoch + 1}: the representation looks collapsed (effective rank of zbar "
                          f"{line['zbar_effective_rank']:.2f}, std {line['zbar_std']:.2e}); "
                          "check cfg.alpha_h and cfg.alpha_r", stacklevel=1)
    last_epoch = epoch + 1 == cfg["epochs"]
    probe = state.parts.step.probe
    if probe is not None and probe.seen:
        line["probe_train_top1"] = probe.train_top1()
        probe.reset()
    if state.knn_loaders is not None and ((epoch + 1) % run["knn_every"] == 0 or last_epoch):
        line.update(_monitor(state))
    if state.world > 1:
        torch.distributed.barrier()
    epochs_this_run = epoch + 1 - state.start_epoch
    stop_here = bool(run["stop_after_epochs"]) and epochs_this_run >= run["stop_after_epochs"] and not last_epoch
    state.interrupted = state.interrupted or stop_here
    if state.is_main:
        append_jsonl(state.files.log, line)
        state.tracker.scalars({f"epoch/{key}": float(value) for key, value in line.items()
                               if key not in ("epoch", "step")}, state.step)
        state.writer.save(state.checkpoint_path, state.checkpoint(epoch + 1), background=not stop_here)
        if run["save_every"] and (epoch + 1) % run["save_every"] == 0:
            state.writer.save(state.files.checkpoints / f"epoch_{epoch + 1}.pt", state.checkpoint(epoch + 1))
        knn_text = f", kNN top-1 {line['knn_top1']:.2%}" if "knn_top1" in line else ""
        parts_text = ", ".join(f"{n} {line[n]:{PART_FORMATS.get(n, '.4f')}}" for n in state.parts.step.part_names[1:])
        print(f"epoch {epoch + 1}/{cfg['epochs']}: loss {line['loss']:.4f} ({parts_text}), "
              f"{line['images_per_s']:.0f} img/s{knn_text}", flush=True)
        if stop_here:
            print(f"stopping after {epochs_this_run} epoch(s) as run.stop_after_epochs asks; re-run to continue", flush=True)
    return stop_here


def _monitor(state: _Run) -> dict[str, float]:
    """kNN top-1/top-5 of the backbone, and the probe's test top-1 on the same test features."""
    backbone, transform, show = state.parts.encoder.backbone, state.parts.eval_transform, state.show
    bank, bank_labels = extract_features(backbone, state.knn_loaders[0], transform, progress=show, desc="kNN bank")
    queries, labels = extract_features(backbone, state.knn_loaders[1], transform, progress=show, desc="kNN queries")
    accuracy = knn_accuracy(bank, bank_labels, queries, labels, state.run["knn_k"], state.run["knn_temperature"])
    state.last_knn = accuracy["top1"]
    figures = {"knn_top1": accuracy["top1"], "knn_top5": accuracy["top5"]}
    if state.parts.step.probe is not None:
        figures["probe_test_top1"] = state.parts.step.probe.top1(queries, labels)
    return figures


def _finish(state: _Run) -> dict:
    """Writes the backbone and the summary of a finished run, shuts the loaders and the process group down."""
    state.writer.wait()  # the last checkpoint is on disk before the run says it is done
    state.tracker.close()
    seconds = time.perf_counter() - state.started
    summary = {"run_dir": str(state.files.path), "epochs_done": state.epochs_done,
               "steps": state.step, "seconds": seconds, "images_per_s": state.images_seen / max(seconds, 1e-9),
               "knn_top1": state.last_knn, "interrupted": state.interrupted, "device": str(state.device)}
    if state.is_main and not state.interrupted:
        save_backbone(state.parts.encoder, state.files.backbone)
        summary["backbone"] = str(state.files.backbone)
        atomic_write(state.files.summary, lambda handle: json.dump(summary, handle, indent=2), binary=False)
        knn_text = f", last kNN top-1 {state.last_knn:.2%}" if state.last_knn is not None else ""
        print(f"done: {state.cfg['epochs']} epochs in {seconds / 60:.1f} min, {summary['images_per_s']:.0f} img/s"
              f"{knn_text}; backbone weights in {summary['backbone']}", flush=True)
    state.loader = state.knn_loaders = None  # ffcv loaders go before the process group (PITFALLS)
    gc.collect()
    if state.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def pretrain(config: dict) -> dict:
    """Runs (or resumes) pretraining as ``config`` says; returns the final summary.

    ``config`` is the nested dict of :func:`core.config.parse_config` with sections ``cfg``,
    ``data`` and ``run``. Raises :class:`~core.config.UserError` subclasses on bad input.
    """
    validate_config(config)
    rank, world, device = _init_distributed(config["run"]["device"])
    files = RunDir(config["run"]["dir"])
    with files.locked() if rank == 0 else nullcontext():  # one run at a time in a run directory
        if rank == 0 and (stale := files.prepare()):
            print(f"removed {stale} temporary file(s) of an interrupted checkpoint write in {files.path}", flush=True)
        resume = load_checkpoint(files.last_checkpoint) if files.last_checkpoint.exists() else None
        if resume is not None:
            check_compatible(resume, config, files.last_checkpoint)
        summary = _completed(config, resume, rank == 0, world)
        if summary is not None:
            return summary
        state = _setup(config, rank, world, device, resume)
        del resume
        try:
            return _train(state)
        finally:  # also on an error: no checkpoint write is left half done, the loggers are flushed
            state.writer.wait(raise_error=False)
            state.tracker.close()


def _log_views(state: _Run) -> None:
    """A grid of a few training images above their K augmented views, for the loggers."""
    batches = iter(state.loader)
    images = next(batches).images
    with torch.no_grad():
        views = state.parts.augment(images[:8])
    normalize = state.parts.augment.normalize
    state.tracker.image("views", views_grid(images, views, normalize.mean, normalize.std), 0)
    batches.close()


def _train(state: _Run) -> dict:
    """The epochs from ``state.start_epoch`` on, until the end, a signal or ``run.stop_after_epochs``."""
    with _StopFlag() as stop:
        if state.tracker.active and state.step == 0:
            _log_views(state)
        if state.is_main:  # from here on, SIGTERM / Ctrl-C checkpoint and exit 0
            print(f"training epochs {state.start_epoch + 1}-{state.cfg['epochs']} of {state.steps_per_epoch} steps "
                  f"on {state.device} ({state.world} process{'es' if state.world > 1 else ''})", flush=True)
        for epoch in range(state.start_epoch, state.cfg["epochs"]):
            result = _run_epoch(state, epoch, stop)
            if result.stopped:
                _save_mid_epoch(state, epoch, result)
                break
            if _end_epoch(state, epoch, result):
                break
    summary = _finish(state)
    job = slurm_job_id()
    if stop.requested and not stop.by_user and state.is_main and job:
        summary["requeued"] = requeue(job)
    return summary
