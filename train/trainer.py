"""The pretraining loop, read top to bottom in the order a run calls it.

Each step: FFCV loader (uint8 batch on the device) -> K-view Kornia augmentation on the device
-> encoder over all K·B views at once (channels-last, AMP on GPU) -> the method's loss in float32
(SimMER by default, train.methods) -> Adam, with the learning rate set per step (linear warm-up,
then cosine).

The steady-state step makes no host-device sync: the step's losses are summed on the device and
read once every ``run.log_every`` steps (progress bar, divergence check) and at the end of the epoch.

Names: ``training`` is the :class:`TrainingParts` (encoder, optimiser, augmentation, ...) and
``train_step`` its :class:`TrainStep`; ``step`` is the optimiser-step counter (the schedule
position); ``state`` is the loop's :class:`_LoopState`; ``run`` is the config's ``run`` section
and ``files`` the run directory (:class:`~train.rundir.RunDir`); ``parts`` is a loss's dict of
terms and ``losses`` the step's detached (total, *parts) tensor.

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
from core.device import amp_dtype, resolve_device
from core.schedule import lr_at, scaled_lr
from data_prep.loader import BetonLoader, inspect_beton
from measure.features import embed_images, feature_batch
from measure.health import health, held_out_images
from measure.monitor import KnnMonitor
from train.checkpoint import CheckpointWriter, check_compatible, load_checkpoint, rng_state, save_backbone, set_rng_state
from train.cluster import StopFlag, requeue, slurm_job_id
from train.methods import Method, get_method
from train.model import build_encoder_from_cfg
from train.probe import OnlineProbe
from train.rundir import RunDir
from train.tracking import Tracker, check_wandb_login, parse_loggers, views_grid

LOSS_FORMATS = {"entropy": ".3f", "rank": ".1f"}  # how the progress bar and the epoch line print a part (else .4f)
LOSS_SHORT = {"entropy": "H", "rank": "R"}  # the progress bar's short names


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------ the run, in the order it goes
def pretrain(config: dict, stop: StopFlag | None = None) -> dict:
    """Runs (or resumes) pretraining as ``config`` says; returns the final summary.

    ``config`` is the nested dict of :func:`core.config.parse_config` with sections ``cfg``,
    ``data`` and ``run``. ``stop`` is the signal flag that ``train/pretrain.py`` installed before
    its imports; without one, the first thing done here is to install one, so that a signal during
    start-up stops the run cleanly before its first step. Raises :class:`~core.config.UserError`
    subclasses on bad input.
    """
    with StopFlag() if stop is None else nullcontext(stop) as stop:
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
            stop.requested = _agreed(stop.requested, world, device)  # every rank stops, or none
            if stop.requested:  # a signal during start-up: nothing trained, nothing to save
                return _stopped_before_training(config, resume, stop, rank == 0)
            tracker = _start_tracker(config, rank, resume)  # before config.yaml: a failed start leaves no files
            state = None
            try:
                state = _setup(config, rank, world, device, resume, tracker)
                del resume
                return _train(state, stop)
            finally:  # also on an error: no checkpoint write is left half done, the loggers are flushed
                if state is not None:
                    state.writer.wait(raise_error=False)
                tracker.close()


def validate_config(config: dict, check_files: bool = True) -> None:
    """Raises :class:`ConfigError` (or a beton error) for an impossible config, before any work.

    Single values were checked against their declared ranges when parsed; these are the checks
    that need several values, the machine or the files.
    """
    import timm

    cfg, run = config["cfg"], config["run"]
    if "wandb" in parse_loggers(run["logger"]):
        check_wandb_login(run["wandb_mode"])
    problems = []
    if not timm.is_model(cfg["arch"]):
        problems.append(f"cfg.arch={cfg['arch']!r} is not a timm model (e.g. resnet18, resnet50)")
    try:
        resolve_device(run["device"], "run.device")
    except ConfigError as error:
        problems.append(str(error))
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
        _check_encoder_takes(cfg, cfg["image_size"] or train_info.fixed_size[0])
    elif cfg["image_size"]:
        _check_encoder_takes(cfg, cfg["image_size"])


def _check_encoder_takes(cfg: dict, image_size: int) -> None:
    """Raises :class:`ConfigError` when ``cfg.arch`` cannot take ``image_size``-px images (e.g. a ViT
    made for 224 px on 32-px data): the encoder built and run on the meta device (no memory, no time)."""
    try:
        with torch.device("meta"):
            encoder = build_encoder_from_cfg(cfg, image_size).eval()
            encoder.backbone(torch.empty(2, 3, image_size, image_size))  # the projector sees only its width
    except NotImplementedError:  # an operator without a meta kernel: the first step will tell
        return
    except (AssertionError, RuntimeError, ValueError, TypeError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cfg.arch={cfg['arch']!r} cannot take {image_size}-px images ({detail}); set "
                          "cfg.image_size to a size it takes, or pick another arch") from None


def _init_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_choice, "run.device", index=int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


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


def _stopped_before_training(config: dict, resume: dict | None, stop: StopFlag, is_main: bool) -> dict:
    """A signal arrived before the first step: exit cleanly, requeue under SLURM (not for Ctrl-C)."""
    where = f"the checkpoint {RunDir(config['run']['dir']).last_checkpoint} is unchanged" if resume else "nothing was trained yet"
    summary = {"run_dir": config["run"]["dir"], "epochs_done": resume["epoch"] if resume else 0,
               "steps": resume["step"] if resume else 0, "interrupted": True}
    if is_main:
        print(f"stopped by {stop.signal_name} during start-up, before the first step; {where}. "
              "Re-run the same command to resume.", flush=True)
        if not stop.by_user and (job := slurm_job_id()):
            summary["requeued"] = requeue(job)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.destroy_process_group()
    return summary


def _start_tracker(config: dict, rank: int, resume: dict | None) -> Tracker:
    """The loggers of ``run.logger`` (rank 0 only), told the config and the betons read."""
    run = config["run"]
    return Tracker(RunDir(run["dir"]).path, parse_loggers(run["logger"]) if rank == 0 else (), config,
                   betons=describe_betons(config["data"]) if rank == 0 else None,
                   resume_step=None if resume is None else resume["step"],
                   wandb_id=None if resume is None else resume.get("wandb_id"),
                   wandb_project=run["wandb_project"], wandb_mode=run["wandb_mode"])


def describe_betons(data: dict) -> dict:
    """What the run's betons really hold (:func:`~data_prep.loader.inspect_beton`): for ``train``
    and ``test`` (when it exists), the path, the dataset name that ``write_beton.py`` put in the
    file name (``cifar10`` for ``cifar10_train.beton``), the images, their side(s) and the classes."""
    record = {}
    for split in ("train", "test"):
        path = Path(data[f"{split}_beton"])
        if split == "test" and not path.is_file():
            continue
        info = inspect_beton(path)
        sizes = sorted({f"{h}x{w}" for h, w in info.image_sizes})
        record[split] = {"path": str(path.absolute()), "dataset": path.stem.removesuffix(f"_{split}"),
                         "images": info.num_samples, "resolution": sizes[0] if len(sizes) == 1 else "mixed",
                         "classes": info.num_classes}
    return record


def _setup(config: dict, rank: int, world: int, device: torch.device, resume: dict | None,
           tracker: Tracker) -> _LoopState:
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
    training = build_training(cfg, run, device, image_size, world, resume, num_classes=info.num_classes)
    monitor = None
    if rank == 0 and not info.labelled and (run["knn_every"] or run["probe"]):
        print(f"{data['train_beton']} is unlabelled: the kNN monitor and the online probe are off", flush=True)
    if rank == 0 and run["knn_every"] and info.labelled:
        monitor = KnnMonitor(data["train_beton"], data["test_beton"], device, image_size, data["num_workers"],
                             run["knn_k"], run["knn_temperature"], verify=bool(run["knn_verify"]))
    state = _LoopState(config, rank, world, device, loader, training, monitor, steps_per_epoch,
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
        atomic_write(state.files.config, lambda handle: _write_config(handle, config, tracker.betons), binary=False)
        write_jsonl(state.files.log, history)
    state.tracker = tracker
    return state


def _write_config(handle, config: dict, betons: dict | None) -> None:
    """config.yaml: the resolved config (``-C`` reads it back), then what the betons held, as comments."""
    yaml.safe_dump(config, handle, sort_keys=False)
    if betons:
        handle.write("# the betons this run read (data_prep/inspect_beton.py):\n")
        for split, info in betons.items():
            handle.write(f"#   {split}: {info['path']}: dataset {info['dataset']}, {info['images']} images, "
                         f"{info['resolution']} px, {info['classes'] or 'no'} classes\n")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ the training step
def build_training(cfg: dict, run: dict, device: torch.device, image_size: int, world: int = 1,
                   resume: dict | None = None, num_classes: int = 0) -> TrainingParts:
    """The encoder, augmentation, Adam, scaler and step of pretraining, as ``cfg`` and ``run`` say.

    ``cfg['method']`` (train.methods) picks the loss, its options and whether the encoder has a
    predictor; the rest is the same for every method.

    ``resume`` (a checkpoint) restores the weights, optimiser, scaler and probe before the model is
    wrapped for DDP (``world`` > 1) and compiled (``run.compile``, -1 = on for CUDA). The online
    probe (``run.probe``) needs ``num_classes`` > 0.
    """
    use_amp, autocast_dtype = amp_settings(run, device)
    preset = resolve_preset(cfg["augment"], image_size)
    encoder = build_encoder_from_cfg(cfg, image_size).to(device)
    augment = build_augmentation(preset, cfg["K"], image_size,
                                 dtype=autocast_dtype if use_amp and autocast_dtype == torch.bfloat16 else torch.float32).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the shapes are fixed: let cuDNN pick its fastest kernels once
    optimizer = torch.optim.Adam(encoder.parameters(), lr=scaled_lr(cfg["lr"], cfg["batch_size"]),
                                 weight_decay=cfg["weight_decay"], fused=device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and autocast_dtype == torch.float16)
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
    train_step = TrainStep(model, augment, optimizer, scaler, autocast_dtype if use_amp else None, loss_fn,
                           method.log_names, probe, method.predictor, **method.options(cfg))
    return TrainingParts(encoder, model, augment, build_eval_transform(preset).to(device), optimizer, scaler, train_step)


def amp_settings(run: dict, device: torch.device) -> tuple[bool, torch.dtype | None]:
    """(enabled, dtype) of autocast for ``run['amp']`` (-1 = on for CUDA), in :func:`core.device.amp_dtype`."""
    enabled = (device.type == "cuda") if run["amp"] == -1 else bool(run["amp"])
    return (True, amp_dtype(device)) if enabled else (False, None)


@dataclass
class TrainingParts:
    """What a training step is made of, built by :func:`build_training` (also for the benchmarks)."""

    encoder: torch.nn.Module  # the plain encoder: what checkpoints save and the kNN monitor reads
    model: torch.nn.Module  # what the step runs: the encoder, compiled and/or DDP-wrapped
    augment: torch.nn.Module
    eval_transform: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_step: TrainStep


class TrainStep:
    """The optimisation step of every method: ``train_step(images) -> (losses, zbar)``.

    ``images``: uint8 (B, 3, H, W) on the device. K views are made on the device (:meth:`views`),
    the model runs over all K·B views at once under autocast when ``amp_dtype`` is set
    (:meth:`forward`), the loss in float32 (:meth:`loss`), then backward (:meth:`backward`) and the
    optimiser step through ``scaler`` (:meth:`optimise`); the benchmarks time these stages one by
    one. With a ``probe`` and ``labels``, the online probe then trains on the first view's
    detached backbone features. Returns ``losses``, the detached figures named by ``loss_names``
    (the total, then the loss's parts: SimMER's ``[loss, tv, entropy, rank]``) on the device (no
    host sync), and ``zbar`` (B, D). With ``predict`` (SimSiam) the model also returns the
    predictor's outputs, which the loss takes after z.
    """

    def __init__(self, model: torch.nn.Module, augment: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, loss_fn, loss_names: tuple[str, ...],
                 probe: OnlineProbe | None = None, predict: bool = False, **loss_options):
        self.model, self.augment, self.optimizer, self.scaler = model, augment, optimizer, scaler
        self.amp_dtype, self.loss_fn, self.loss_options, self.probe = amp_dtype, loss_fn, loss_options, probe
        self.loss_names, self.predict = tuple(loss_names), predict
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
        losses = torch.stack([loss.detach(), *(parts[name].detach() for name in self.loss_names[1:])])
        return losses, z.detach().float().mean(0)


# ------------------------------------------------------------------ the loop
@dataclass
class _LoopState:
    """Everything a run keeps between steps and epochs: set up by :func:`_setup`, changed by the loop."""

    config: dict
    rank: int
    world: int
    device: torch.device
    loader: BetonLoader
    training: TrainingParts
    monitor: KnnMonitor | None
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
        return scaled_lr(self.cfg["lr"], self.cfg["batch_size"])

    @property
    def show(self) -> bool:
        return bool(self.run["progress"]) and self.is_main

    def checkpoint(self, epochs_done: int, batch_in_epoch: int = 0, sums: torch.Tensor | None = None) -> dict:
        training = self.training
        return {"model": training.encoder.state_dict(), "optimizer": training.optimizer.state_dict(),
                "scaler": training.scaler.state_dict() if training.scaler.is_enabled() else None, "step": self.step,
                "epoch": epochs_done, "batch_in_epoch": batch_in_epoch,
                "epoch_sums": None if sums is None else sums.cpu(), "rng": rng_state(), "config": self.config,
                "steps_per_epoch": self.steps_per_epoch, "wandb_id": self.tracker.wandb_id,
                "probe": None if training.train_step.probe is None else training.train_step.probe.state()}


def _train(state: _LoopState, stop: StopFlag) -> dict:
    """The epochs from ``state.start_epoch`` on, until the end, a signal or ``run.stop_after_epochs``.

    A signal (``stop``, installed before start-up) stops the run at its next step, or before the
    next epoch when it came between epochs; one after the last epoch changes nothing.
    """
    epochs = state.cfg["epochs"]
    if state.tracker.active and state.step == 0:
        _log_views(state)
    if state.is_main and state.start_epoch >= epochs:  # a checkpoint at (or past) the end: finish it
        print(f"{state.files.path} is already complete ({state.start_epoch}/{epochs} epochs); writing its backbone "
              "and summary. Raise cfg.epochs to train further, or use another run.dir.", flush=True)
    elif state.is_main:
        print(f"training epochs {state.start_epoch + 1}-{epochs} of {state.steps_per_epoch} steps "
              f"on {state.device} ({state.world} process{'es' if state.world > 1 else ''})", flush=True)
    for epoch in range(state.start_epoch, epochs):
        if _agreed(stop.requested, state.world, state.device):  # a signal before this epoch's first step (or before the loop)
            state.interrupted = True
            if state.is_main:
                held = (f"the checkpoint {state.checkpoint_path} holds epoch {epoch}"
                        if epoch or state.checkpoint_path.exists() else "nothing was trained yet")
                print(f"stopped by {stop.signal_name} before epoch {epoch + 1}; {held}. "
                      "Re-run the same command to resume.", flush=True)
            break
        result = _run_epoch(state, epoch, stop)
        if result.stopped:
            _save_mid_epoch(state, epoch, result)
            break
        if _end_epoch(state, epoch, result):
            break
    summary = _finish(state)
    job = slurm_job_id()
    if state.interrupted and stop.requested and not stop.by_user and state.is_main and job:
        summary["requeued"] = requeue(job)
    return summary


def _agreed(flag: bool, world: int, device: torch.device) -> bool:
    """``flag`` of any rank (one collective under torchrun)."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value)
    return bool(value.item())


def _log_views(state: _LoopState) -> None:
    """A grid of a few training images above their K augmented views, for the loggers."""
    batches = iter(state.loader)
    images = next(batches).images
    with torch.no_grad():
        views = state.training.augment(images[:8])
    normalize = state.training.augment.normalize
    state.tracker.image("views", views_grid(images, views, normalize.mean, normalize.std), 0)
    batches.close()


def _run_epoch(state: _LoopState, epoch: int, stop: StopFlag) -> _Epoch:
    """One pass over the loader (from ``state.skip_batches`` on): the steps, synced every ``run.log_every``."""
    state.loader.set_epoch(epoch)
    state.training.encoder.train()
    result = _Epoch(torch.zeros(len(state.training.train_step.loss_names), device=state.device), done=state.skip_batches)
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
            for group in state.training.optimizer.param_groups:
                group["lr"] = lr_at(state.step, state.total_steps, state.peak_lr, state.warmup_steps)
            try:
                losses, result.zbar = state.training.train_step(batch.images, batch.labels)
            except torch.linalg.LinAlgError as error:  # the SVD met NaN/inf representations
                raise TrainingDiverged(_divergence(state, epoch, str(error).split(":")[0])) from None
            result.sums += losses
            state.step += 1
            result.done = batch_index + 1
            images = len(batch.images) * state.world
            result.images += images
            window_images += images
            bar.update(1)
            estimate_now = state.cpu_estimate_due and window_images >= 2 * len(batch.images) * state.world
            sync_now = state.step % state.run["log_every"] == 0 or result.done == total or estimate_now
            if sync_now:
                _sync_point(state, epoch, losses, bar, window_images / max(time.perf_counter() - window_start, 1e-9))
                window_start, window_images = time.perf_counter(), 0
            if sync_now:  # ranks agree on stopping at the sync points only
                stop.requested = _agreed(stop.requested, state.world, state.device)
            if stop.requested and result.done < total and (state.world == 1 or sync_now):
                result.stopped = True
                break
    finally:  # whatever ends the epoch (its end, a signal, an error): ffcv's thread stops here
        batches.close()
        bar.close()
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class _Epoch:
    """What one pass over the loader produced."""

    sums: torch.Tensor  # summed [loss, *parts] (TrainStep.loss_names) of the epoch's steps, on the device
    done: int  # steps of this epoch done (including those before a resume)
    images: int = 0  # images trained on in this invocation (all processes)
    seconds: float = 0.0
    zbar: torch.Tensor | None = None  # the last step's zbar (B, D)
    stopped: bool = False  # a signal stopped it before its last step


def _sync_point(state: _LoopState, epoch: int, losses: torch.Tensor, bar, rate: float) -> None:
    """The one host sync of a window: the divergence check, the progress bar, the CPU time estimate."""
    values, names = losses.tolist(), state.training.train_step.loss_names
    if not all(math.isfinite(v) for v in values):
        raise TrainingDiverged(_divergence(state, epoch, ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values))))
    bar.set_postfix(**{LOSS_SHORT.get(n, n): format(v, LOSS_FORMATS.get(n, ".4f")) for n, v in zip(names, values)},
                    lr=f"{state.training.optimizer.param_groups[0]['lr']:.2e}", img_s=f"{rate:.0f}", refresh=False)
    state.tracker.scalars({**{f"train/{n}": v for n, v in zip(names, values)},
                           "train/lr": state.training.optimizer.param_groups[0]["lr"], "train/images_per_s": rate}, state.step)
    if state.cpu_estimate_due:
        state.cpu_estimate_due = False
        remaining = (state.total_steps - state.step) * state.cfg["batch_size"] / max(rate, 1e-9)
        if remaining > 3600 and state.is_main:
            warnings.warn(f"running on CPU at {rate:.0f} images/s: this run would take about {remaining / 3600:.1f} h. "
                          "Use a GPU, or try -C configs/demo.yaml for a CPU-sized run.", stacklevel=1)


def _divergence(state: _LoopState, epoch: int, detail: str) -> str:
    return (f"the loss became non-finite at epoch {epoch + 1}, step {state.step} ({detail}); the last good "
            f"checkpoint {state.checkpoint_path} is kept. {_method(state).advice('Lower cfg.lr')}.")


def _method(state: _LoopState) -> Method:
    """The self-supervised method the run trains (train.methods)."""
    return get_method(state.cfg.get("method", "simmer"))


def _save_mid_epoch(state: _LoopState, epoch: int, result: _Epoch) -> None:
    """A signal stopped the epoch: checkpoint its position and partial sums so that a re-run continues it."""
    state.interrupted = True
    _average_over_ranks(state, result)  # every rank carries these sums into the resumed epoch
    if state.is_main:
        state.writer.save(state.checkpoint_path, state.checkpoint(epoch, result.done, result.sums), background=False)
        print(f"stopped in epoch {epoch + 1} after step {result.done}/{state.steps_per_epoch}; checkpoint saved to "
              f"{state.checkpoint_path}. Re-run the same command to resume.", flush=True)


def _end_epoch(state: _LoopState, epoch: int, result: _Epoch) -> bool:
    """Health figures, kNN monitor, log line and checkpoint of a finished epoch; True when the run stops here."""
    cfg, run = state.cfg, state.run
    state.skip_batches, state.carried_sums = 0, None
    state.epochs_done = epoch + 1
    state.images_seen += result.images
    _average_over_ranks(state, result)
    means = (result.sums / max(1, result.done)).tolist()
    line = {"epoch": epoch + 1, **dict(zip(state.training.train_step.loss_names, means)), "lr": state.training.optimizer.param_groups[0]["lr"],
            "images_per_s": result.images / max(result.seconds, 1e-9), "epoch_seconds": result.seconds,
            "step": state.step}
    embeddings = _health_embeddings(state, result) if state.is_main else None
    if embeddings is not None:
        # the spectrum once: the effective rank's, and the loggers' histogram of it
        singular_values = torch.linalg.svdvals(embeddings.detach().float()) if state.tracker.active else None
        line.update(health(embeddings, state.peak_rank, singular_values))
        if state.health_images is not None:
            line["health_images"] = len(embeddings)
        if singular_values is not None:
            state.tracker.histogram("epoch/zbar_singular_values", singular_values.cpu(), state.step)
        state.peak_rank = max(state.peak_rank, line["zbar_effective_rank"])
        if line["collapsed"] and state.is_main:
            warnings.warn(f"epoch {epoch + 1}: the representation looks collapsed (effective rank of zbar "
                          f"{line['zbar_effective_rank']:.2f}, std {line['zbar_std']:.2e}); "
                          f"{_method(state).advice() or 'check cfg.lr'}", stacklevel=1)
    last_epoch = epoch + 1 == cfg["epochs"]
    probe = state.training.train_step.probe
    if probe is not None and probe.seen:
        line["probe_train_top1"] = probe.train_top1()
        probe.reset()
    if state.monitor is not None and ((epoch + 1) % run["knn_every"] == 0 or last_epoch):
        line.update(state.monitor.evaluate(state.training.encoder.backbone, state.training.eval_transform,
                                           amp=state.training.train_step.amp_dtype is not None, probe=state.training.train_step.probe,
                                           progress=state.show))
        state.last_knn = line["knn_top1"]
    if state.world > 1:
        torch.distributed.barrier()
    epochs_this_run = epoch + 1 - state.start_epoch
    stop_here = bool(run["stop_after_epochs"]) and epochs_this_run >= run["stop_after_epochs"] and not last_epoch
    state.interrupted = state.interrupted or stop_here
    if state.is_main:
        append_jsonl(state.files.log, line)
        state.tracker.scalars({f"epoch/{key}": float(value) for key, value in line.items()
                               if key not in ("epoch", "step", "collapsed", "health_images")}, state.step)
        if line.get("collapsed"):  # a flag, not a curve
            state.tracker.text("epoch/collapsed", f"epoch {epoch + 1}: the representation looks collapsed (effective "
                               f"rank {line['zbar_effective_rank']:.2f}, std {line['zbar_std']:.2e})", state.step)
        state.writer.save(state.checkpoint_path, state.checkpoint(epoch + 1), background=not stop_here)
        if run["save_every"] and (epoch + 1) % run["save_every"] == 0:
            state.writer.save(state.files.checkpoints / f"epoch_{epoch + 1}.pt", state.checkpoint(epoch + 1))
        knn_text = f", kNN top-1 {line['knn_top1']:.2%}" if "knn_top1" in line else ""
        parts_text = ", ".join(f"{n} {line[n]:{LOSS_FORMATS.get(n, '.4f')}}" for n in state.training.train_step.loss_names[1:])
        print(f"epoch {epoch + 1}/{cfg['epochs']}: loss {line['loss']:.4f} ({parts_text}), "
              f"{line['images_per_s']:.0f} img/s{knn_text}", flush=True)
        if stop_here:
            print(f"stopping after {epochs_this_run} epoch(s) as run.stop_after_epochs asks; re-run to continue", flush=True)
    return stop_here


def _average_over_ranks(state: _LoopState, result: _Epoch) -> None:
    """Makes ``result.sums`` the mean over ranks: the TV part is local to each rank's shard, and the
    mean of the ranks' values is the loss of the global batch (docs/LOSS.md). One collective."""
    if state.world > 1:
        torch.distributed.all_reduce(result.sums)
        result.sums /= state.world


def _health_embeddings(state: _LoopState, result: _Epoch) -> torch.Tensor | None:
    """What the epoch's health figures are computed on: the held-out images' z in eval mode
    (RankMe's protocol: independent of the batch size), or the last training batch's zbar."""
    if state.health_images is None:
        return result.zbar
    amp = state.training.train_step.amp_dtype is not None
    return embed_images(state.training.encoder, state.health_images, state.training.eval_transform,
                        feature_batch(state.device, state.health_images.shape[-1]), amp=amp)


def _finish(state: _LoopState) -> dict:
    """Writes the backbone and the summary of a finished run, shuts the loaders and the process group down."""
    state.writer.wait()  # the last checkpoint is on disk before the run says it is done
    state.tracker.close()
    seconds = time.perf_counter() - state.started
    summary = {"run_dir": str(state.files.path), "epochs_done": state.epochs_done,
               "steps": state.step, "seconds": seconds, "images_per_s": state.images_seen / max(seconds, 1e-9),
               "knn_top1": state.last_knn, "interrupted": state.interrupted, "device": str(state.device)}
    if state.is_main and not state.interrupted:
        save_backbone(state.training.encoder, state.files.backbone)
        summary["backbone"] = str(state.files.backbone)
        atomic_write(state.files.summary, lambda handle: json.dump(summary, handle, indent=2), binary=False)
        knn_text = f", last kNN top-1 {state.last_knn:.2%}" if state.last_knn is not None else ""
        print(f"done: {state.cfg['epochs']} epochs in {seconds / 60:.1f} min, {summary['images_per_s']:.0f} img/s"
              f"{knn_text}; backbone weights in {summary['backbone']}", flush=True)
    # ffcv loaders go before the process group (a live one aborts the exit), and so does the model:
    # DDP holds the group, so that destroy_process_group, with the model alive, only unregisters
    # it, and it is freed (its gloo threads joined, with the GIL held) wherever the model's last
    # reference goes, at worst at the interpreter's exit, where a gloo thread dropping a finished
    # collective aborts the process ("terminate called without an active exception").
    state.loader = state.monitor = state.training = None
    gc.collect()
    if state.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary
