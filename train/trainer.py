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

Re-running the same command resumes from ``checkpoints/last.pt``; on one process with a fixed
seed the resume is exact (weights and logged losses), also from a mid-epoch SIGTERM.
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
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml

from augment import build_augmentation, build_eval_transform, resolve_preset
from data_prep.loader import BetonLoader, inspect_beton
from eval.knn import evaluate_knn
from train.checkpoint import check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from train.config import ConfigError, UserError
from train.loss import effective_rank, nearest_neighbour_distance, simmer_loss
from train.model import build_encoder_from_cfg, save_backbone

PART_NAMES = ("loss", "tv", "entropy", "rank")
COLLAPSE_RANK = 2.0  # effective rank of zbar below this: (dimensional) collapse
COLLAPSE_RANK_DROP = 0.4  # ... or below this fraction of the run's highest effective rank so far
COLLAPSE_STD = 1e-3  # per-dimension std of zbar below this: collapse to a point


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------- config
def validate_config(config: dict, check_files: bool = True) -> None:
    """Raises :class:`ConfigError` (or a beton error) for an impossible config, before any work."""
    cfg, run = config["cfg"], config["run"]
    problems = []
    if cfg["K"] < 2:
        problems.append(f"cfg.K must be >= 2 (views per image), got {cfg['K']}")
    if cfg["batch_size"] < 2:
        problems.append(f"cfg.batch_size must be >= 2 (the entropy term needs neighbours), got {cfg['batch_size']}")
    if cfg["epochs"] < 1:
        problems.append(f"cfg.epochs must be >= 1, got {cfg['epochs']}")
    if cfg["lr"] <= 0 or cfg["weight_decay"] < 0 or cfg["warmup_epochs"] < 0:
        problems.append("cfg.lr must be > 0, cfg.weight_decay and cfg.warmup_epochs >= 0")
    if cfg["alpha_h"] < 0 or cfg["alpha_r"] < 0:
        problems.append("cfg.alpha_h and cfg.alpha_r must be >= 0")
    if cfg["cifar_stem"] not in (-1, 0, 1):
        problems.append(f"cfg.cifar_stem must be -1, 0 or 1, got {cfg['cifar_stem']}")
    if cfg["proj_dim"] < 1 or cfg["proj_layers"] < 0 or cfg["proj_hidden"] < 0 or cfg["image_size"] < 0:
        problems.append("cfg.proj_dim must be >= 1; cfg.proj_layers, cfg.proj_hidden, cfg.image_size >= 0")
    if min(run["knn_every"], run["save_every"], run["steps_per_epoch"], run["stop_after_epochs"]) < 0 or run["log_every"] < 1:
        problems.append("run.knn_every, run.save_every, run.steps_per_epoch, run.stop_after_epochs must be >= 0 "
                        "and run.log_every >= 1")
    import timm
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
        if run["knn_every"]:
            inspect_beton(config["data"]["test_beton"])
        if cfg["image_size"] == 0 and train_info.fixed_size is None:
            raise ConfigError(f"{train_info.path} holds images of several sizes: set cfg.image_size")


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def health(zbar: torch.Tensor, peak_rank: float = 0.0) -> dict[str, float]:
    """Collapse indicators of zbar (B, D): mean per-dimension std, effective rank, mean NN distance.

    ``collapsed`` is a heuristic: the effective rank is below 2, or below 40 % of ``peak_rank`` (the
    highest effective rank the run has logged: dimensions are being lost), or the spread is ~0.
    """
    zbar = zbar.detach().float()
    figures = {
        "zbar_std": zbar.std(dim=0).mean().item(),
        "zbar_effective_rank": effective_rank(zbar).item(),
        "zbar_nn_distance": nearest_neighbour_distance(zbar).item(),
    }
    rank = figures["zbar_effective_rank"]
    figures["collapsed"] = bool(rank < COLLAPSE_RANK or rank < COLLAPSE_RANK_DROP * peak_rank
                                or figures["zbar_std"] < COLLAPSE_STD)
    return figures


# ------------------------------------------------------------------------------------- set-up
class _StopFlag:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "_StopFlag":
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nreceived {signal.Signals(signum).name}: finishing the step and saving a checkpoint", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


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


def make_train_step(model: torch.nn.Module, augment: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None, loss_fn=simmer_loss, **loss_options):
    """The SimMER optimisation step: ``step(images) -> (parts, zbar)``.

    ``images``: uint8 (B, 3, H, W) on the device. K views are made on the device, the model runs
    over all K·B views at once (under autocast when ``amp_dtype`` is set), the loss in float32,
    then backward and the optimiser step (through ``scaler`` for fp16). Returns ``parts``, the
    detached ``[loss, tv, entropy, rank]`` (4,) on the device (no host sync), and ``zbar`` (B, D).
    """
    device_type = next(model.parameters()).device.type
    autocast = (lambda: torch.autocast(device_type, dtype=amp_dtype)) if amp_dtype else nullcontext

    def step(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        views = augment(images)  # (K, B, 3, h, w), channels-last
        with autocast():
            z = model(views)  # (K, B, D)
        loss, parts = loss_fn(z, **loss_options)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        detached = torch.stack([loss.detach(), parts["tv"].detach(), parts["entropy"].detach(), parts["rank"].detach()])
        return detached, z.detach().float().mean(0)

    return step


def _divergence_message(epoch: int, step: int, detail: str, checkpoint_path: Path) -> str:
    return (f"the loss became non-finite at epoch {epoch + 1}, step {step} ({detail}); the last good checkpoint "
            f"{checkpoint_path} is kept. Lower cfg.lr or check cfg.alpha_h / cfg.alpha_r.")


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    """The log lines of epochs <= ``upto_epoch`` (lines of an epoch lost to a crash are dropped)."""
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if line["epoch"] <= upto_epoch]


# ------------------------------------------------------------------------------------- the run
def pretrain(config: dict) -> dict:
    """Runs (or resumes) pretraining as ``config`` says; returns the final summary.

    ``config`` is the nested dict of :func:`train.config.parse_config` with sections ``cfg``,
    ``data`` and ``run``. Raises :class:`~train.config.UserError` subclasses on bad input.
    """
    validate_config(config)
    cfg, data, run = config["cfg"], config["data"], config["run"]
    rank, world, device = _init_distributed(run["device"])
    is_main = rank == 0
    run_dir = Path(run["dir"])
    checkpoint_path = run_dir / "checkpoints" / "last.pt"
    show = bool(run["progress"]) and is_main

    resume = load_checkpoint(checkpoint_path) if checkpoint_path.exists() else None
    if resume is not None:
        check_compatible(resume["config"], config, checkpoint_path)
        summary_path = run_dir / "summary.json"
        if resume["epoch"] >= cfg["epochs"] and summary_path.is_file():
            if is_main:
                print(f"{run_dir} is complete ({resume['epoch']}/{cfg['epochs']} epochs); nothing to do. "
                      "Raise cfg.epochs to train further, or use another run.dir.", flush=True)
            if world > 1:
                torch.distributed.destroy_process_group()
            return json.loads(summary_path.read_text())

    _seed_everything(cfg["seed"])
    info = inspect_beton(data["train_beton"])
    image_size = cfg["image_size"] or info.fixed_size[0]
    preset = resolve_preset(cfg["augment"], image_size)
    local_batch = cfg["batch_size"] // world
    use_amp, amp_dtype = amp_settings(run, device)
    compile_enabled = (device.type == "cuda") if run["compile"] == -1 else bool(run["compile"])

    loader = BetonLoader(data["train_beton"], local_batch, train=True, device=device,
                         num_workers=data["num_workers"], seed=cfg["seed"],
                         image_size=cfg["image_size"] or None)
    steps_per_epoch = min(len(loader), run["steps_per_epoch"]) if run["steps_per_epoch"] else len(loader)
    total_steps = steps_per_epoch * cfg["epochs"]
    warmup_steps = round(cfg["warmup_epochs"] * steps_per_epoch)
    peak_lr = cfg["lr"] * cfg["batch_size"] / 256

    encoder = build_encoder_from_cfg(cfg, image_size).to(device)
    augment = build_augmentation(preset, cfg["K"], image_size,
                                 dtype=amp_dtype if use_amp and amp_dtype == torch.bfloat16 else torch.float32).to(device)
    eval_transform = build_eval_transform(preset).to(device)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=peak_lr, weight_decay=cfg["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    step, start_epoch, skip_batches, carried_sums = 0, 0, 0, None
    log_path = run_dir / "log.jsonl"
    if resume is not None:
        encoder.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler") is not None and scaler.is_enabled():
            scaler.load_state_dict(resume["scaler"])
        step, start_epoch = resume["step"], resume["epoch"]
        skip_batches = resume.get("batch_in_epoch", 0)
        carried_sums = resume.get("epoch_sums")
        set_rng_state(resume["rng"])
        if rank:
            torch.manual_seed(cfg["seed"] + 1000 * start_epoch + rank)
        if is_main:
            where = f"epoch {start_epoch + 1}" + (f", step {skip_batches + 1}" if skip_batches else "")
            print(f"resuming {checkpoint_path} at {where}", flush=True)
    elif rank:
        torch.manual_seed(cfg["seed"] + rank)  # different views on each rank; weights come from rank 0 (DDP)

    history = _read_log(log_path, start_epoch) if is_main else []
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        log_path.write_text("".join(json.dumps(line) + "\n" for line in history))

    model: torch.nn.Module = encoder
    if world > 1:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = simmer_loss
    if compile_enabled:
        model = torch.compile(model)
        loss_fn = torch.compile(simmer_loss)

    knn_loaders = None
    if is_main and run["knn_every"]:
        knn_loaders = tuple(BetonLoader(path, 512, train=False, device=device, num_workers=data["num_workers"],
                                        image_size=image_size) for path in (data["train_beton"], data["test_beton"]))

    train_step = make_train_step(model, augment, optimizer, scaler, amp_dtype if use_amp else None, loss_fn,
                                 alpha_h=cfg["alpha_h"], alpha_r=cfg["alpha_r"], rank_variant=cfg["rank_variant"],
                                 rank_bias=bool(cfg["rank_bias"]))

    def checkpoint_state(epochs_done: int, batch_in_epoch: int, sums: torch.Tensor | None) -> dict:
        return {"model": encoder.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "step": step,
                "epoch": epochs_done, "batch_in_epoch": batch_in_epoch,
                "epoch_sums": None if sums is None else sums.cpu(), "rng": rng_state(), "config": config}

    run_start = time.perf_counter()
    images_seen = 0
    last_knn = next((line["knn_top1"] for line in reversed(history) if "knn_top1" in line), None)
    peak_rank = max((line.get("zbar_effective_rank", 0.0) for line in history), default=0.0)
    warned_cpu = device.type == "cuda"
    interrupted = False
    zbar = None
    with _StopFlag() as stop:
        for epoch in range(start_epoch, cfg["epochs"]):
            loader.set_epoch(epoch)
            encoder.train()
            sums = torch.zeros(len(PART_NAMES), device=device)
            done = 0
            if skip_batches and carried_sums is not None:
                sums += carried_sums.to(device)
            epoch_start = time.perf_counter()
            epoch_images = 0
            bar = None
            if show:
                from tqdm import tqdm
                bar = tqdm(total=steps_per_epoch, initial=skip_batches, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                           unit="step", dynamic_ncols=True, leave=True)
            window_start, window_images = time.perf_counter(), 0
            sync_now = False
            for batch_index, batch in enumerate(loader):
                if batch_index >= steps_per_epoch:
                    break
                if batch_index < skip_batches:
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total_steps, peak_lr, warmup_steps)
                try:
                    parts, zbar = train_step(batch.images)
                except torch.linalg.LinAlgError as error:  # the SVD met NaN/inf representations
                    raise TrainingDiverged(_divergence_message(epoch, step, str(error).split(":")[0], checkpoint_path)) from None
                sums += parts
                step += 1
                done = batch_index + 1
                epoch_images += len(batch.images) * world
                window_images += len(batch.images) * world
                if bar is not None:
                    bar.update(1)
                estimate_now = not warned_cpu and window_images >= 2 * local_batch * world
                sync_now = step % run["log_every"] == 0 or done == steps_per_epoch or estimate_now
                if sync_now:
                    values = parts.tolist()  # the one host sync of the window
                    if not all(math.isfinite(v) for v in values):
                        detail = ", ".join(f"{n}={v:.4g}" for n, v in zip(PART_NAMES, values))
                        raise TrainingDiverged(_divergence_message(epoch, step, detail, checkpoint_path))
                    rate = window_images / max(time.perf_counter() - window_start, 1e-9)
                    window_start, window_images = time.perf_counter(), 0
                    if bar is not None:
                        bar.set_postfix(loss=f"{values[0]:.4f}", tv=f"{values[1]:.4f}", H=f"{values[2]:.3f}",
                                        R=f"{values[3]:.1f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                                        img_s=f"{rate:.0f}", refresh=False)
                    if estimate_now:
                        warned_cpu = True
                        remaining = (total_steps - step) * local_batch * world / max(rate, 1e-9)
                        if remaining > 3600 and is_main:
                            warnings.warn(f"running on CPU at {rate:.0f} images/s: this run would take about "
                                          f"{remaining / 3600:.1f} h. Use a GPU, or try -C configs/demo.yaml for a "
                                          "CPU-sized run.", stacklevel=1)
                if world > 1 and sync_now:  # ranks agree on stopping at the sync points only
                    flag = torch.tensor([float(stop.requested)], device=device)
                    torch.distributed.all_reduce(flag)
                    stop.requested = bool(flag.item())
                if stop.requested and done < steps_per_epoch and (world == 1 or sync_now):
                    break
            if bar is not None:
                bar.close()
            if stop.requested and done < steps_per_epoch and (world == 1 or sync_now):
                if is_main:
                    save_checkpoint(checkpoint_path, checkpoint_state(epoch, done, sums))
                    print(f"stopped in epoch {epoch + 1} after step {done}/{steps_per_epoch}; checkpoint saved to "
                          f"{checkpoint_path}. Re-run the same command to resume.", flush=True)
                interrupted = True
                break
            skip_batches, carried_sums = 0, None
            epoch_seconds = time.perf_counter() - epoch_start
            images_seen += epoch_images
            means = (sums / max(1, done)).tolist()
            line = {"epoch": epoch + 1, **dict(zip(PART_NAMES, means)),
                    "lr": optimizer.param_groups[0]["lr"], "images_per_s": epoch_images / max(epoch_seconds, 1e-9),
                    "epoch_seconds": epoch_seconds, "step": step}
            if zbar is not None:
                line.update(health(zbar, peak_rank))
                peak_rank = max(peak_rank, line["zbar_effective_rank"])
                if line["collapsed"] and is_main:
                    warnings.warn(f"epoch {epoch + 1}: the representation looks collapsed (effective rank of zbar "
                                  f"{line['zbar_effective_rank']:.2f}, std {line['zbar_std']:.2e}); "
                                  "check cfg.alpha_h and cfg.alpha_r", stacklevel=1)
            last_epoch = epoch + 1 == cfg["epochs"]
            if knn_loaders is not None and ((epoch + 1) % run["knn_every"] == 0 or last_epoch):
                accuracy = evaluate_knn(encoder.backbone, *knn_loaders, eval_transform, k=run["knn_k"],
                                        temperature=run["knn_temperature"], progress=show)
                line["knn_top1"] = last_knn = accuracy["top1"]
                line["knn_top5"] = accuracy["top5"]
            if world > 1:
                torch.distributed.barrier()
            epochs_this_run = epoch + 1 - start_epoch
            if run["stop_after_epochs"] and epochs_this_run >= run["stop_after_epochs"] and not last_epoch:
                interrupted = True
            if is_main:
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(line) + "\n")
                save_checkpoint(checkpoint_path, checkpoint_state(epoch + 1, 0, None))
                if run["save_every"] and (epoch + 1) % run["save_every"] == 0:
                    save_checkpoint(run_dir / "checkpoints" / f"epoch_{epoch + 1}.pt", checkpoint_state(epoch + 1, 0, None))
                knn_text = f", kNN top-1 {line['knn_top1']:.2%}" if "knn_top1" in line else ""
                print(f"epoch {epoch + 1}/{cfg['epochs']}: loss {line['loss']:.4f} (tv {line['tv']:.4f}, entropy {line['entropy']:.3f}, "
                      f"rank {line['rank']:.1f}), {line['images_per_s']:.0f} img/s{knn_text}", flush=True)
                if interrupted:
                    print(f"stopping after {epochs_this_run} epoch(s) as run.stop_after_epochs asks; re-run to continue",
                          flush=True)
            if interrupted:
                break

    seconds = time.perf_counter() - run_start
    summary = {"run_dir": str(run_dir), "epochs_done": step // max(1, steps_per_epoch), "steps": step,
               "seconds": seconds, "images_per_s": images_seen / max(seconds, 1e-9), "knn_top1": last_knn,
               "interrupted": interrupted, "device": str(device)}
    if is_main and not interrupted:
        save_backbone(encoder, run_dir / "backbone.pt")
        summary["backbone"] = str(run_dir / "backbone.pt")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        knn_text = f", last kNN top-1 {last_knn:.2%}" if last_knn is not None else ""
        print(f"done: {cfg['epochs']} epochs in {seconds / 60:.1f} min, {summary['images_per_s']:.0f} img/s{knn_text}; "
              f"backbone weights in {summary['backbone']}", flush=True)
    del loader, knn_loaders
    gc.collect()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary
