"""Stage-by-stage throughput of the SimMER pipeline, each stage against the baseline a user would pick.

    python bench/throughput.py --bench.device=cpu      # a few minutes on 2 CPU cores
    python bench/throughput.py --bench.device=cuda     # the same on a GPU, plus device-resident batches
    python bench/throughput.py --bench.quick=1         # tiny sizes (QUICK below): a smoke test of this script

All stages run in one process, on the same synthetic data and machine (``--bench.stages`` picks them):

- loader: a synthetic 32-px beton -> uint8 batches with :class:`BetonLoader`, against a torch
  ``DataLoader`` over the same images held in memory as PIL images with per-sample torchvision
  ``ToTensor`` (same batch size, same number of workers).
- augment: K views of a uint8 batch with our batched Kornia module, against per-sample torchvision v2
  transforms applied K times per image in ``DataLoader`` workers (what lightly and solo-learn do).
- loss: forward + backward of ``simmer_loss`` at B x D = batch_size x 2048, K = bench.K and 10, eager
  against ``torch.compile`` (compiled once, warmed up, then timed; the cold first step is reported).
- model: forward + backward + Adam of the encoder on K·B random views: eager / compiled, channels-last
  / NCHW, and (GPU only) bf16 AMP / fp32. A stand-in loss (mean of z²) isolates the encoder.
- end_to_end: real pretraining steps (``train.trainer.pretrain`` on the beton; the last epoch's
  images/s) and the 800-epoch CIFAR-10 time they imply. On a GPU with ``bench.device_batches=1``, also
  :func:`train.trainer.build_training`'s step fed with uint8 batches already on the device (no loader).

On a CPU the model and end-to-end stages use a reduced batch (``bench.model_batch``, 32): one step
of ResNet-18 with the CIFAR stem at B=512, K=4 takes about a minute on 2 cores. ``--bench.quick=1``
takes the sizes of :data:`QUICK` (for the ``bench`` flags not given) and :data:`QUICK_SIZES`: every
code path once, in seconds. Figures are medians of ``bench.iters`` timed iterations after a warm-up;
every figure goes to ``bench.out`` (JSON) with ``ratios`` (ours ÷ baseline, images/s), and a table
is printed. Speed claims live here, never in timed tests.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms import ToTensor, v2  # noqa: E402

from augment import CIFAR10_MEAN, CIFAR10_STD, build_augmentation  # noqa: E402
from core.config import ConfigError, parse_config, run_cli  # noqa: E402
from core.device import resolve_device  # noqa: E402
from data_prep.loader import BetonLoader  # noqa: E402
from data_prep.sources import ArraySource, load_synthetic  # noqa: E402
from data_prep.writer import write_betons  # noqa: E402
from train.loss import rank_loss, simmer_loss  # noqa: E402
from train.trainer import build_training, pretrain  # noqa: E402

STAGES = ("loader", "augment", "loss", "model", "end_to_end")
IMAGE_SIZE = 32
PROJ_DIM = 2048  # D of the paper's runs
CIFAR10_TRAIN = 50_000
PAPER_EPOCHS = 800
# --bench.quick=1: these bench flags, unless given, and these Settings (no flags of their own).
QUICK = {"batch_size": 32, "K": 2, "arch": "test_resnet", "images": 256, "iters": 2, "workers": 1, "model_batch": 8}
QUICK_SIZES = {"proj_dim": 64, "also_K": 3, "compile_model": False, "e2e_steps": 2, "e2e_epochs": 2,
               "min_window_s": 0.2}


@dataclass(frozen=True)
class Settings:
    """The resolved sizes of one benchmark run (see :func:`resolve`)."""

    device: str
    out: Path
    stages: tuple[str, ...]
    batch_size: int
    K: int
    arch: str
    images: int
    iters: int
    workers: int
    device_batches: bool
    quick: bool
    model_batch: int
    proj_dim: int = PROJ_DIM
    also_K: int = 10  # the loss is timed at K and at this K
    compile_model: bool = True
    e2e_steps: int = 0  # steps per epoch of the end-to-end run (0 = the whole beton)
    e2e_epochs: int = 2  # the last one is timed
    min_window_s: float = 1.0  # the loaders are timed over whole epochs lasting at least this long

    @property
    def loss_Ks(self) -> tuple[int, ...]:
        return tuple(sorted({self.K, self.also_K}))


def resolve(bench: dict, given: set[str] = frozenset()) -> Settings:
    """The ``bench`` config section -> :class:`Settings`; raises :class:`ConfigError` before any work.

    ``given``: the names (``bench.K``) set by a flag or a file, which :data:`QUICK` leaves alone.
    """
    if bench["quick"]:
        bench = {**bench, **{key: value for key, value in QUICK.items() if f"bench.{key}" not in given}}
    stages = tuple(s.strip() for s in bench["stages"].split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ConfigError(f"--bench.stages: unknown stage(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"choose from {','.join(STAGES)}")
    problems = []
    try:
        resolve_device(bench["device"], "--bench.device")
    except ConfigError as error:
        problems.append(str(error))
    if not timm.is_model(bench["arch"]):
        problems.append(f"--bench.arch={bench['arch']!r} is not a timm model")
    if problems:
        raise ConfigError("; ".join(problems))
    cpu = bench["device"] == "cpu"
    settings = Settings(
        device=bench["device"], stages=stages, batch_size=bench["batch_size"], K=bench["K"], arch=bench["arch"],
        images=bench["images"], iters=bench["iters"], workers=bench["workers"],
        device_batches=bool(bench["device_batches"]), quick=bool(bench["quick"]),
        out=Path(bench["out"] or f"runs/bench/throughput_{bench['device']}.json"),
        model_batch=bench["model_batch"] or (32 if cpu else bench["batch_size"]),
        e2e_steps=3 if cpu else 0, e2e_epochs=2 if cpu else 3)
    if settings.quick:
        settings = replace(settings, **QUICK_SIZES)
    if settings.images < 2 * max(settings.batch_size, settings.model_batch * max(1, settings.e2e_steps)):
        raise ConfigError(f"--bench.images={settings.images} is too few for two batches of {settings.batch_size}")
    return settings


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(step: Callable[[], object], iters: int, device: str, warmup: int = 1) -> tuple[float, float]:
    """(first call's seconds, median seconds of ``iters`` calls after ``warmup`` more)."""
    start = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _row(name: str, role: str, setting: str, images: int, seconds: float, steps: int = 1, **extra: object) -> dict:
    """One measurement: ``images`` processed in ``seconds`` over ``steps`` steps (batches)."""
    row = {"name": name, "role": role, "setting": setting, "images_per_s": images / max(seconds, 1e-12),
           "ms": 1000.0 * seconds / steps}
    row.update(extra)
    return row


def _ratio(ours: dict, baseline: dict) -> float:
    return ours["images_per_s"] / baseline["images_per_s"]


# ---------------------------------------------------------------------------------------------- baselines
class _InMemoryImages(torch.utils.data.Dataset):
    """The baseline's dataset: PIL images held in memory, a torchvision transform per sample."""

    def __init__(self, source: ArraySource, transform: Callable):
        self.images = [Image.fromarray(image) for image in source.images]
        self.labels = source.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), int(self.labels[index])


class _KTimes:
    """Applies a per-sample transform K times: PIL image -> (K, 3, h, w) (lightly/solo-learn style)."""

    def __init__(self, transform: Callable, K: int):
        self.transform, self.K = transform, K

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.transform(image) for _ in range(self.K)])


def _simsiam_v2(size: int) -> Callable:
    """torchvision v2 version of the ``cifar`` recipe of :mod:`augment.views` (the baseline)."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def _data_loader(dataset, s: Settings) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=s.batch_size, shuffle=True, drop_last=True,
                                       num_workers=s.workers, persistent_workers=True,
                                       pin_memory=s.device == "cuda")


def _batches(loader: Iterable, count: int) -> Iterable:
    """``count`` batches, starting new epochs as needed."""
    while True:
        for batch in loader:
            yield batch
            count -= 1
            if count == 0:
                return


def _time_batches(batches: Iterable, s: Settings, to_device: bool) -> tuple[int, float, int]:
    """(images, seconds, batches) to pull every batch (moved to the device when ``to_device``)."""
    images = count = 0
    start = time.perf_counter()
    for batch in batches:
        first = batch[0]
        if to_device:
            first = first.to(s.device, non_blocking=True)
        images += len(first)
        count += 1
    _sync(s.device)
    return images, time.perf_counter() - start, count


def _time_epochs(loader: Iterable, s: Settings, to_device: bool) -> tuple[int, float, int]:
    """(images, seconds, batches) over whole epochs: at least ``s.iters`` of them and ``s.min_window_s``."""
    images = seconds = count = epochs = 0
    while epochs < s.iters or seconds < s.min_window_s:
        more = _time_batches(loader, s, to_device)
        images, seconds, count, epochs = images + more[0], seconds + more[1], count + more[2], epochs + 1
    return images, seconds, count


# ---------------------------------------------------------------------------------------------- stages
def bench_loader(s: Settings, beton: Path, source: ArraySource) -> dict:
    """BetonLoader (uint8) against DataLoader + per-sample ToTensor, over whole epochs (see :func:`_time_epochs`)."""
    loader = BetonLoader(beton, s.batch_size, train=True, device=s.device, num_workers=s.workers, seed=0)
    _time_batches(loader, s, to_device=False)  # epoch 0 compiles ffcv's pipeline (numba)
    ours = _row("BetonLoader -> uint8", "ours", f"B={s.batch_size}, {s.workers} thread(s)",
                *_time_epochs(loader, s, to_device=False))
    del loader
    loader = _data_loader(_InMemoryImages(source, ToTensor()), s)
    _time_batches(_batches(loader, 1), s, to_device=True)  # starts the workers
    baseline = _row("DataLoader + ToTensor (PIL)", "baseline", f"B={s.batch_size}, {s.workers} worker(s)",
                    *_time_epochs(loader, s, to_device=True))
    del loader
    return {"rows": [ours, baseline], "ratio": _ratio(ours, baseline),
            "notes": ["ours yields uint8 (augmentation casts on the device); ToTensor yields float"]}


def _device_images(source: ArraySource, count: int, device: str) -> torch.Tensor:
    """The first ``count`` images as a uint8 (count, 3, H, W) channels-last batch on ``device`` (as BetonLoader gives)."""
    images = torch.from_numpy(source.images[:count]).permute(0, 3, 1, 2)
    return images.to(device).contiguous(memory_format=torch.channels_last)


def bench_augment(s: Settings, source: ArraySource) -> dict:
    """Batched Kornia K views of a uint8 batch against K per-sample torchvision v2 passes in workers."""
    augment = build_augmentation("cifar", s.K, IMAGE_SIZE).to(s.device)
    images = _device_images(source, s.batch_size, s.device)
    _, seconds = _median_seconds(lambda: augment(images), s.iters, s.device)
    ours = _row("Kornia K-view, batched", "ours", f"B={s.batch_size}, K={s.K}, on {s.device}", s.batch_size, seconds)
    loader = _data_loader(_InMemoryImages(source, _KTimes(_simsiam_v2(IMAGE_SIZE), s.K)), s)
    _time_batches(_batches(loader, 1), s, to_device=True)  # starts the workers
    timed = _time_batches(_batches(loader, s.iters), s, to_device=True)
    del loader
    baseline = _row("torchvision v2 per sample x K", "baseline", f"B={s.batch_size}, K={s.K}, {s.workers} worker(s)",
                    *timed)
    return {"rows": [ours, baseline], "ratio": _ratio(ours, baseline), "notes": []}


def bench_loss(s: Settings) -> dict:
    """simmer_loss forward + backward, eager against torch.compile, per K; the rank term alone for scale."""
    generator = torch.Generator().manual_seed(0)
    result = {"rows": [], "notes": ["compiled: torch.compile(simmer_loss, dynamic=False); cold = first step "
                                    "(inductor's on-disk cache makes re-runs faster)"], "ratios": {}}
    for K in s.loss_Ks:
        z = torch.randn(K, s.batch_size, s.proj_dim, generator=generator).to(s.device).requires_grad_()
        setting = f"K={K}, B={s.batch_size}, D={s.proj_dim}"
        _, eager = _median_seconds(lambda: simmer_loss(z)[0].backward(), s.iters, s.device)
        trainer_compiles = s.device == "cuda"  # train.trainer compiles the loss on CUDA only (run.compile=-1)
        eager_row = _row("simmer_loss eager", "variant" if trainer_compiles else "ours", setting, s.batch_size, eager)
        torch._dynamo.reset()
        compiled_loss = torch.compile(simmer_loss, dynamic=False)
        cold, compiled = _median_seconds(lambda: compiled_loss(z)[0].backward(), s.iters, s.device, warmup=2)
        compiled_row = _row("simmer_loss compiled", "ours" if trainer_compiles else "variant", setting, s.batch_size,
                            compiled, cold_s=cold)
        zbar = z.detach().mean(0).requires_grad_()
        _, rank = _median_seconds(lambda: rank_loss(zbar).backward(), s.iters, s.device)
        method = "svdvals" if s.device == "cpu" else "Newton-Schulz"  # rank_loss's svd="auto", as the trainer's
        rank_row = _row(f"  of which rank term ({method}), eager", "part", f"B={s.batch_size}, D={s.proj_dim}",
                        s.batch_size, rank)
        result["rows"] += [eager_row, compiled_row, rank_row]
        result["ratios"][f"loss_compiled_k{K}"] = _ratio(compiled_row, eager_row)
    torch._dynamo.reset()
    return result


def _trainer_config(s: Settings, beton: Path | None = None, run_dir: Path | None = None) -> dict:
    """Pretraining's config (``cfg``, ``data``, ``run``) at the benchmark's sizes; compile and AMP as its defaults."""
    args = [f"--cfg.arch={s.arch}", f"--cfg.batch_size={s.model_batch}", f"--cfg.K={s.K}", f"--cfg.proj_dim={s.proj_dim}",
            f"--cfg.epochs={s.e2e_epochs}", f"--run.device={s.device}", f"--run.compile={-1 if s.compile_model else 0}",
            f"--run.steps_per_epoch={s.e2e_steps}", "--run.knn_every=0", "--run.progress=0", "--run.log_every=1000",
            f"--data.num_workers={s.workers}"]
    if beton is not None:
        args += [f"--data.train_beton={beton}", f"--data.test_beton={beton}", f"--run.dir={run_dir}"]
    return parse_config(args, "", ("cfg", "data", "run"))


def _model_variants(s: Settings) -> list[tuple[bool, bool, bool]]:
    """(compiled, channels_last, amp) combinations; the first is the baseline (eager, NCHW, fp32).

    Compiled only in channels-last (the layout we train with): each compile costs up to a minute.
    """
    compiled = (False, True) if s.compile_model else (False,)
    amp = (False, True) if s.device == "cuda" else (False,)
    return [(c, cl, a) for a in amp for c in compiled for cl in (False, True) if cl or not c]


def bench_model(s: Settings) -> dict:
    """Encoder forward + backward + Adam on K·B views, per (compiled, channels-last, AMP) variant.

    The encoder and its Adam are pretraining's (:func:`train.trainer.build_training`, eager, fp32);
    the step is built here, on purpose unlike the trainer's: each variant changes the layout,
    compilation or precision, and a stand-in loss with no augmentation isolates the encoder. The
    trainer's own step is timed by the end-to-end stage.
    """
    B, views_per_step = s.model_batch, s.K * s.model_batch
    cuda = s.device == "cuda"
    ours = (cuda and s.compile_model, True, cuda)  # what train.trainer runs here (run.compile, run.amp = -1)
    config = _trainer_config(s)
    rows = []
    for compiled, channels_last, amp in _model_variants(s):
        torch.manual_seed(0)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        parts = build_training(config["cfg"], {**config["run"], "compile": 0, "amp": 0}, torch.device(s.device),
                               IMAGE_SIZE)
        encoder, optimizer = parts.encoder.to(memory_format=layout), parts.optimizer
        views = torch.randn(views_per_step, 3, IMAGE_SIZE, IMAGE_SIZE, device=s.device).contiguous(memory_format=layout)

        def project(x: torch.Tensor, encoder=encoder) -> torch.Tensor:  # forward() minus its channels-last cast
            return encoder.projector(encoder.backbone(x))

        forward = torch.compile(project) if compiled else project

        def step() -> None:
            with torch.autocast(s.device, dtype=torch.bfloat16, enabled=amp):
                z = forward(views)
            loss = z.float().square().mean()  # stand-in: isolates the encoder (the loss has its own stage)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        cold, seconds = _median_seconds(step, min(s.iters, 3) if s.device == "cpu" else s.iters, s.device,
                                        warmup=2 if compiled else 1)
        name = ", ".join(("compiled" if compiled else "eager", "channels-last" if channels_last else "NCHW",
                          "bf16 AMP" if amp else "fp32"))
        role = "baseline" if not rows else "ours" if (compiled, channels_last, amp) == ours else "variant"
        rows.append(_row(name, role, f"{s.arch}, B={B}, K={s.K} ({views_per_step} views)", B, seconds,
                         cold_s=cold, views_per_s=views_per_step / seconds))
        torch._dynamo.reset()
    by_name = {row["name"]: row for row in rows}
    base = by_name["eager, NCHW, fp32"]
    ratios = {"model": _ratio(next(row for row in rows if row["role"] == "ours"), base),
              "model_channels_last": _ratio(by_name["eager, channels-last, fp32"], base)}
    if "compiled, channels-last, fp32" in by_name:
        ratios["model_compiled"] = _ratio(by_name["compiled, channels-last, fp32"], by_name["eager, channels-last, fp32"])
    if "eager, channels-last, bf16 AMP" in by_name:
        ratios["model_amp"] = _ratio(by_name["eager, channels-last, bf16 AMP"], by_name["eager, channels-last, fp32"])
    ratios["model_best"] = max(r["images_per_s"] for r in rows) / base["images_per_s"]
    notes = [f"a stand-in loss (mean z²) isolates the encoder; D={s.proj_dim}; ours = what train.trainer runs "
             "on this device (compile and AMP on CUDA only)"]
    if s.device == "cpu" and B < s.batch_size:
        notes.append(f"CPU: reduced batch B={B} (one step at the paper's B=512 takes about a minute on 2 cores); "
                     "AMP only on a GPU")
    return {"rows": rows, "ratios": ratios, "notes": notes}


def _pretrain_rate(s: Settings, beton: Path, run_dir: Path) -> float:
    """images/s of the last epoch of a short real pretraining run (:func:`train.trainer.pretrain`)."""
    with contextlib.redirect_stdout(io.StringIO()):
        pretrain(_trainer_config(s, beton, run_dir))
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return float(log[-1]["images_per_s"])  # the last epoch: warm (the first one includes any compile)


def _device_batch_rate(s: Settings, source: ArraySource) -> tuple[float, float]:
    """(median seconds, cold seconds) of pretraining's step fed with a uint8 batch already on the device.

    The step :func:`train.trainer.build_training` builds (without the online probe, which needs
    labels), with no loader.
    """
    config = _trainer_config(s)
    torch.manual_seed(0)
    step = build_training(config["cfg"], config["run"], torch.device(s.device), IMAGE_SIZE).train_step
    images = _device_images(source, s.model_batch, s.device)
    compiled = s.device == "cuda" and s.compile_model
    cold, seconds = _median_seconds(lambda: step(images), s.iters, s.device, warmup=2 if compiled else 1)
    torch._dynamo.reset()
    return seconds, cold


def bench_end_to_end(s: Settings, beton: Path, source: ArraySource) -> dict:
    """Real pretraining steps (and, on a GPU, device-fed steps); the 800-epoch time they imply."""
    setting = f"{s.arch}, B={s.model_batch}, K={s.K}"

    def implied(rate: float) -> dict:
        return {"cifar10_800_epochs_h": PAPER_EPOCHS * CIFAR10_TRAIN / rate / 3600}

    with tempfile.TemporaryDirectory(prefix="bench-run-") as run_dir:
        rate = _pretrain_rate(s, beton, Path(run_dir))
    steps = f"{s.e2e_steps} steps/epoch" if s.e2e_steps else "whole beton"
    rows = [_row("pretrain(): beton -> augment -> model -> loss -> Adam", "ours",
                 f"{setting}, {steps}, epoch {s.e2e_epochs} of {s.e2e_epochs}", s.model_batch, s.model_batch / rate,
                 **implied(rate))]
    if s.device == "cuda" and s.device_batches:
        seconds, cold = _device_batch_rate(s, source)
        rows.append(_row("device-fed step: uint8 on device -> ... -> Adam", "ours", setting, s.model_batch, seconds,
                         cold_s=cold, **implied(s.model_batch / seconds)))
    notes = [f"800-epoch time = {PAPER_EPOCHS} x {CIFAR10_TRAIN:,} images / images/s"
             + (" (at this reduced batch)" if s.device == "cpu" else "")]
    return {"rows": rows, "notes": notes}


# ---------------------------------------------------------------------------------------------- driver
def _synthetic_beton(s: Settings, folder: Path) -> tuple[Path | None, ArraySource]:
    """``s.images`` synthetic 32-px images, and their beton (None when no selected stage reads one)."""
    source, _ = load_synthetic(s.images, 10, size=IMAGE_SIZE, seed=0)
    if not {"loader", "end_to_end"} & set(s.stages):
        return None, source
    beton = folder / "bench_train.beton"
    with contextlib.redirect_stdout(io.StringIO()):
        write_betons({beton: source}, num_workers=s.workers)
    return beton, source


def _hardware(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    info = {"cpu": cpu, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_table(results: dict) -> str:
    """The printed table: one line per measurement, the ratios below."""
    header = ("stage", "measurement", "setting", "images/s", "ms/step", "cold s")
    lines = []
    for stage, result in results["stages"].items():
        for row in result["rows"]:
            rate = row["images_per_s"]
            ms, rate = f"{row['ms']:.1f}", f"{rate:,.0f}" if rate >= 100 else f"{rate:.1f}"
            cold = f"{row['cold_s']:.1f}" if "cold_s" in row else ""
            lines.append((stage, f"[{row['role']}] {row['name']}", row["setting"], rate, ms, cold))
    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    text = [" | ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
            for line in [header, *lines]]
    text.insert(1, "-+-".join("-" * w for w in widths))
    text.append("")
    text.append("ratios (ours / baseline, images/s): " + ", ".join(f"{k} {v:.2f}x" for k, v in results["ratios"].items()))
    for stage, result in results["stages"].items():
        for note in result.get("notes", []):
            text.append(f"  {stage}: {note}")
    for row in results["stages"].get("end_to_end", {}).get("rows", []):
        text.append(f"  end_to_end: {row['name']}: 800 CIFAR-10 epochs ~ {row['cifar10_800_epochs_h']:.1f} h")
    return "\n".join(text)


def run_benchmark(s: Settings) -> dict:
    """Runs the selected stages in order; returns every figure (the JSON written by :func:`main`)."""
    started = time.perf_counter()
    results = {"device": s.device, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "hardware": _hardware(s.device), "settings": {**{k: (str(v) if isinstance(v, Path) else v)
                                                                 for k, v in asdict(s).items()}, "loss_Ks": s.loss_Ks},
               "stages": {}, "ratios": {}}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as folder:
        beton, source = _synthetic_beton(s, Path(folder))
        runners = {"loader": lambda: bench_loader(s, beton, source), "augment": lambda: bench_augment(s, source),
                   "loss": lambda: bench_loss(s), "model": lambda: bench_model(s),
                   "end_to_end": lambda: bench_end_to_end(s, beton, source)}
        for stage in STAGES:  # a fixed order: the DataLoader baselines fork before torch.compile runs
            if stage not in s.stages:
                continue
            print(f"[bench] {stage} ...", file=sys.stderr, flush=True)
            stage_start = time.perf_counter()
            result = runners[stage]()
            result["seconds"] = time.perf_counter() - stage_start
            results["stages"][stage] = result
            if "ratio" in result:
                results["ratios"][stage] = result["ratio"]
            results["ratios"].update(result.get("ratios", {}))
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, runs the benchmark, prints the table, writes the JSON; returns every figure."""
    given: set[str] = set()
    settings = resolve(parse_config(argv, __doc__, ["bench"], explicit=given)["bench"], given)
    os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")  # forking after ffcv: see the Makefile
    results = run_benchmark(settings)
    results["command"] = "python bench/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_table(results))
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    settings.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {settings.out} ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
