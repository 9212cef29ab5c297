"""The GPU check: pretraining's real step on one device, stage by stage, and the paper run it implies.

    python bench/gpu_check.py                          # CUDA: ResNet-18 (CIFAR stem), B=512, K=4, D=2048
    python bench/gpu_check.py --gpu.K=10               # Table 1's K
    python bench/gpu_check.py --gpu.device=cpu --gpu.batch_size=8 --gpu.proj_dim=64 --gpu.images=64 \
        --gpu.steps=2 --gpu.warmup=1 --gpu.compile=0   # CPU smoke test (seconds)

On a synthetic beton written for the purpose, with the trainer's own parts
(:func:`train.trainer.build_training`), it measures the loader; the step eager and compiled, each
split into its stages (augment, forward, loss, backward, optimiser; CUDA events on a GPU) and timed
whole in steady state; the eager step again with the projector's last Linear + BatchNorm in bf16
(``cfg.proj_fp32=0``), which prices the float32 tail, and again without the online probe, which
prices the probe inside a step (its update alone is timed too); the rank term's methods; one
checkpoint (the blocking part in the training thread and the background write); the health
figures on ``gpu.health_images`` held-out images (the embedding and the figures apart); the host
sync of the log every ``gpu.log_every`` steps; the kNN monitor (the trainer's own :class:`~measure.monitor.KnnMonitor`:
the first evaluation, which reads and caches the betons, and a steady one); the peak GPU memory.
It checks that what the loader delivers on the device is what the beton holds (every image's
checksum and label against a CPU read, after training-mode epochs, several passes) and stops if
not. It projects the paper's run (``gpu.epochs`` epochs of ``gpu.train_images`` images) with
compilation, checkpoints, health figures, log syncs and the kNN monitor included (and says what
the health figures, the probe and the log syncs take together), prints a table
and writes every figure as JSON. About 3–5 minutes on one H100.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from core.config import parse_config, run_cli  # noqa: E402
from core.device import resolve_device  # noqa: E402
from core.io import atomic_write  # noqa: E402
from data_prep.loader import BetonLoader  # noqa: E402
from data_prep.sources import load_synthetic  # noqa: E402
from data_prep.writer import write_betons  # noqa: E402
from measure.features import embed_images, feature_batch  # noqa: E402
from measure.health import health, held_out_images  # noqa: E402
from measure.monitor import KnnMonitor, compare_reads, read_checksums  # noqa: E402
from train.checkpoint import CheckpointWriter  # noqa: E402
from train.loss import rank_loss  # noqa: E402
from train.trainer import TrainStep, build_training  # noqa: E402

STAGES = ("augment", "forward", "loss", "backward", "optimiser")


class _Clock:
    """Timestamps that measure device time: CUDA events on a GPU, ``perf_counter`` on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1000


def _staged(step: TrainStep, images: torch.Tensor, clock: _Clock) -> list:
    """One step, with a timestamp between its stages."""
    marks = [clock.mark()]
    views = step.views(images)
    marks.append(clock.mark())
    z = step.forward(views)
    marks.append(clock.mark())
    loss, _ = step.loss(z)
    marks.append(clock.mark())
    step.backward(loss)
    marks.append(clock.mark())
    step.optimise()
    marks.append(clock.mark())
    return marks


def time_step(step: TrainStep, images: torch.Tensor, clock: _Clock, steps: int, warmup: int) -> dict:
    """Cold first step, steady-state ms per step (one sync for ``steps`` steps), and ms per stage."""
    clock.sync()
    start = time.perf_counter()
    step(images)
    clock.sync()
    cold_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        step(images)
    clock.sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(images)
    clock.sync()
    step_ms = (time.perf_counter() - start) * 1000 / steps
    staged = [_staged(step, images, clock) for _ in range(steps)]
    clock.sync()
    stages = {name: statistics.median(clock.ms(marks[i], marks[i + 1]) for marks in staged)
              for i, name in enumerate(STAGES)}
    return {"cold_s": cold_s, "step_ms": step_ms, "stages_ms": stages}


def time_loader(loader: BetonLoader, clock: _Clock, batches: int) -> float:
    """ms per batch delivered on the device (whole epochs, after one warm-up epoch)."""
    for _ in loader:
        pass
    done, start = 0, time.perf_counter()
    while done < batches:
        for _ in loader:
            done += 1
    clock.sync()
    return (time.perf_counter() - start) * 1000 / done


def time_rank_term(batch: int, dim: int, device: torch.device, clock: _Clock, steps: int) -> dict[str, float]:
    """ms of the rank term forward + backward on a (batch, dim) zbar, per method of computing it."""
    import train.loss as loss_module

    methods = getattr(loss_module, "SVD_METHODS", ("svdvals",))
    zbar = torch.randn(batch, dim, device=device, generator=None).requires_grad_()
    result = {}
    for method in methods:
        options = {"svd": method} if len(methods) > 1 else {}
        rank_loss(zbar, **options).backward()
        clock.sync()
        start = time.perf_counter()
        for _ in range(steps):
            rank_loss(zbar, **options).backward()
        clock.sync()
        result[method] = (time.perf_counter() - start) * 1000 / steps
    return result


def time_probe(step: TrainStep, batch: int, device: torch.device, clock: _Clock, steps: int) -> float:
    """ms of one online-probe update alone, back to back (bound by the host's launches on a GPU; inside
    a step the probe's kernels queue behind the backward pass, so its price there is the step with the
    probe against the step without)."""
    features = torch.randn(batch, step.probe.head.in_features, device=device)
    labels = torch.randint(0, step.probe.head.out_features, (batch,), device=device)
    step.probe.update(features, labels)
    clock.sync()
    start = time.perf_counter()
    for _ in range(steps):
        step.probe.update(features, labels)
    clock.sync()
    return (time.perf_counter() - start) * 1000 / steps


def time_difference(step: TrainStep, other: TrainStep, images: torch.Tensor, clock: _Clock, steps: int,
                    rounds: int = 5) -> dict[str, float]:
    """How much longer ``step`` takes than ``other`` in steady state: the two timed in turn for
    ``rounds`` rounds of ``steps`` steps each, so that drift affects both alike; the median of the
    rounds' differences (``in_step_ms``, not clamped: a negative value says it is within the noise)
    and the spread of those differences (``spread_ms``, largest minus smallest)."""
    differences = []
    for _ in range(rounds):
        times = []
        for candidate in (step, other):
            clock.sync()
            start = time.perf_counter()
            for _ in range(steps):
                candidate(images)
            clock.sync()
            times.append((time.perf_counter() - start) * 1000 / steps)
        differences.append(times[0] - times[1])
    return {"in_step_ms": statistics.median(differences), "spread_ms": max(differences) - min(differences)}


def time_checkpoint(step: TrainStep, encoder: torch.nn.Module, folder: Path, clock: _Clock) -> dict[str, float]:
    """ms of one checkpoint as the trainer takes it every epoch (the second one: the pinned host
    buffers exist): the part that blocks the training thread, the device time of the copy, and the
    whole background write."""
    writer = CheckpointWriter()
    state = {"model": encoder.state_dict(), "optimizer": step.optimizer.state_dict(), "step": 0}
    writer.save(folder / "last.pt", state)
    writer.wait()
    clock.sync()
    start, mark = time.perf_counter(), clock.mark()
    writer.save(folder / "last.pt", state)
    blocking = time.perf_counter() - start
    end_mark = clock.mark()
    writer.wait()
    total = time.perf_counter() - start
    return {"blocking_ms": blocking * 1000, "device_ms": clock.ms(mark, end_mark), "write_ms": total * 1000,
            "mb": (folder / "last.pt").stat().st_size / 2**20}


def time_health(parts, images: torch.Tensor, clock: _Clock) -> dict[str, float | int]:
    """ms of one epoch's health figures: the held-out images embedded in eval mode (``embed_ms``),
    then the figures (``figures_ms``: effective rank, spread, nearest neighbours), and both (``ms``)."""
    amp = parts.train_step.amp_dtype is not None
    batch = feature_batch(images.device, images.shape[-1])
    health(embed_images(parts.encoder, images, parts.eval_transform, batch, amp=amp))
    clock.sync()
    start = time.perf_counter()
    embeddings = embed_images(parts.encoder, images, parts.eval_transform, batch, amp=amp)
    clock.sync()
    embedded = time.perf_counter()
    health(embeddings)
    clock.sync()
    end = time.perf_counter()
    return {"ms": (end - start) * 1000, "embed_ms": (embedded - start) * 1000, "figures_ms": (end - embedded) * 1000,
            "images": len(images), "dim": embeddings.shape[1],
            "singular_values_ms": time_singular_values(embeddings.detach().float(), clock)}


def time_singular_values(x: torch.Tensor, clock: _Clock) -> dict[str, float]:
    """ms of the singular values of ``x`` (N, D) that the effective rank needs: ``svdvals`` in float32
    (what :func:`measure.health.effective_rank` computes) against the eigenvalues of the float64 Gram
    matrix (``eigvalsh``; as accurate, and on a GPU possibly faster: the figure decides)."""
    def gram() -> torch.Tensor:
        wide = x.double()
        return torch.linalg.eigvalsh(wide.T @ wide if x.shape[1] <= x.shape[0] else wide @ wide.T).clamp_min(0).sqrt()

    result = {}
    for name, compute in (("svdvals", lambda: torch.linalg.svdvals(x)), ("gram_eigvalsh_float64", gram)):
        compute()
        clock.sync()
        start = time.perf_counter()
        compute()
        clock.sync()
        result[name] = (time.perf_counter() - start) * 1000
    return result


def time_log_sync(step: TrainStep, images: torch.Tensor, clock: _Clock, steps: int, every: int) -> float:
    """ms per step that the log's host sync (``.tolist()`` every ``every`` steps) adds, against none."""
    def run(sync: bool) -> float:
        clock.sync()
        start = time.perf_counter()
        for index in range(steps):
            parts, _ = step(images)
            if sync and (index + 1) % every == 0:
                parts.tolist()
        clock.sync()
        return (time.perf_counter() - start) * 1000 / steps
    run(True)
    return max(0.0, run(True) - run(False))


def check_loader(paths, device: torch.device, image_size: int, batch_size: int, passes: int) -> dict:
    """Reads each beton on ``device`` in eval mode ``passes`` times, after a training-mode epoch of
    the first one each time (the loader lifecycle of a run), and compares every image's checksum and
    label with the beton read on the CPU; raises :class:`~data_prep.loader.CorruptBatchError` on a mismatch."""
    references = [read_checksums(BetonLoader(path, 512, train=False, device="cpu", image_size=image_size))
                  for path in paths]
    train = BetonLoader(paths[0], batch_size, train=True, device=device, image_size=image_size)
    readers = [BetonLoader(path, feature_batch(device, image_size), train=False, device=device, image_size=image_size)
               for path in paths]
    images = 0
    for _ in range(passes):
        for batch in train:
            batch.images.float().mean()
        for reader, reference in zip(readers, references):
            checksums, labels = read_checksums(reader)
            compare_reads(reference, checksums, labels, reader.batch_size, reader.info.path)
            images += len(labels)
    return {"passes": passes, "images_compared": images, "mismatches": 0}


def project(figures: dict, options: dict) -> dict[str, float]:
    """The paper run's time from the measured figures: steps, compilation, checkpoints, kNN."""
    steps_per_epoch = options["train_images"] // options["batch_size"]
    step = figures["compiled"] if "compiled" in figures else figures["eager"]
    step_s = max(step["step_ms"], figures["loader_ms"]) / 1000  # the loader runs alongside; the slower one sets the pace
    epoch_s = steps_per_epoch * step_s
    checkpoint = figures["checkpoint"]
    checkpoint_s = max(checkpoint["blocking_ms"], checkpoint.get("device_ms", 0.0)) / 1000 \
        + max(0.0, checkpoint["write_ms"] / 1000 - epoch_s)
    evaluations = math.ceil(options["epochs"] / options["knn_every"]) if options["knn_every"] else 0
    knn = figures["knn"]
    parts = {
        "train_s": options["epochs"] * epoch_s,
        "compile_s": max(0.0, step["cold_s"] - step_s),
        "checkpoints_s": options["epochs"] * checkpoint_s,
        "health_s": options["epochs"] * figures["health"]["ms"] / 1000 if "health" in figures else 0.0,
        "log_sync_s": options["epochs"] * steps_per_epoch * figures.get("log_sync_ms", 0.0) / 1000,
        # the first evaluation reads the betons (at the loader's measured rate) and caches them, plus a
        # fixed start-up cost counted once; each evaluation embeds the images (a streamed monitor reads them again)
        "knn_s": (knn.get("fixed_s", 0.0) + options["knn_images"] * (
            knn.get("read_s_per_image", 0.0) * (1 if knn.get("cached", True) else evaluations)
            + evaluations * knn["s_per_image"])) if evaluations else 0.0,
    }
    total = sum(parts.values())
    # the probe runs inside every step: its price is part of the training time, not added to it
    probe_s = options["epochs"] * steps_per_epoch * max(0.0, figures.get("probe", {}).get("in_step_ms", 0.0)) / 1000
    return {**parts, "total_s": total, "total_h": total / 3600, "steps_per_epoch": steps_per_epoch,
            "probe_s": probe_s, "knn_share": parts["knn_s"] / total, "checkpoint_share": parts["checkpoints_s"] / total,
            "monitors_share": (parts["health_s"] + parts["log_sync_s"] + probe_s) / total}


def run_check(options: dict) -> dict:
    """Every measurement of the check, as one dict (what :func:`main` writes as JSON)."""
    device = resolve_device(options["device"], "gpu.device")
    clock = _Clock(device)
    flags = [f"--cfg.arch={options['arch']}", f"--cfg.batch_size={options['batch_size']}", f"--cfg.K={options['K']}",
             f"--cfg.proj_dim={options['proj_dim']}"]
    figures: dict = {"device": str(device), "name": torch.cuda.get_device_name(device) if clock.cuda else "cpu",
                     "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "settings": options}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        train, test = load_synthetic(options["images"], max(2, options["images"] // 5), size=options["image_size"], seed=0)
        paths = {Path(folder) / "train.beton": train, Path(folder) / "test.beton": test}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            write_betons(paths, num_workers=0)
        beton, test_beton = paths
        loader = BetonLoader(beton, options["batch_size"], train=True, device=device)
        figures["loader_ms"] = time_loader(loader, clock, options["steps"])
        images = next(iter(loader)).images.clone()
        del loader
        for mode in ("eager", "compiled") if options["compile"] else ("eager",):
            config = parse_config([*flags, f"--run.compile={int(mode == 'compiled')}"], "", ("cfg", "run"))
            torch.manual_seed(0)
            parts = build_training(config["cfg"], config["run"], device, options["image_size"], num_classes=10)
            if mode == "eager":
                probed = parts
            figures[mode] = time_step(parts.train_step, images, clock, options["steps"], options["warmup"])
            if clock.cuda:
                figures[mode]["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.reset_peak_memory_stats(device)
        # the projector's last Linear + BatchNorm in bf16 instead of float32 (cfg.proj_fp32=0): its cost
        config = parse_config([*flags, "--run.compile=0", "--cfg.proj_fp32=0"], "", ("cfg", "run"))
        torch.manual_seed(0)
        rounded = build_training(config["cfg"], config["run"], device, options["image_size"], num_classes=10)
        figures["eager_proj_bf16"] = time_step(rounded.train_step, images, clock, options["steps"], options["warmup"])
        del rounded
        # the eager step without the online probe: what the probe adds to a step. The probe runs
        # eagerly beside a compiled step too, so this difference prices it in either.
        config = parse_config([*flags, "--run.compile=0", "--run.probe=0"], "", ("cfg", "run"))
        torch.manual_seed(0)
        unprobed = build_training(config["cfg"], config["run"], device, options["image_size"], num_classes=10)
        figures["eager_no_probe"] = time_step(unprobed.train_step, images, clock, options["steps"], options["warmup"])
        figures["probe"] = {"alone_ms": time_probe(probed.train_step, options["batch_size"], device, clock, options["steps"]),
                            **time_difference(probed.train_step, unprobed.train_step, images, clock, options["steps"])}
        del unprobed, probed
        figures["rank_term_ms"] = time_rank_term(options["batch_size"], options["proj_dim"], device, clock, options["steps"])
        figures["checkpoint"] = time_checkpoint(parts.train_step, parts.encoder, Path(folder), clock)
        figures["log_sync_ms"] = time_log_sync(parts.train_step, images, clock, options["steps"], options["log_every"])
        figures["loader_check"] = check_loader((beton, test_beton), device, options["image_size"],
                                               options["batch_size"], passes=3)
        monitor = KnnMonitor(beton, test_beton, device, options["image_size"], k=min(200, options["images"]))
        seconds = []
        for _ in range(2):  # the first evaluation reads and caches the betons; the second is a steady one
            clock.sync()
            start = time.perf_counter()
            accuracy = monitor.evaluate(parts.encoder.backbone, parts.eval_transform, amp=clock.cuda)
            clock.sync()
            seconds.append(time.perf_counter() - start)
        monitor_images = sum(loader.num_samples for loader in monitor.loaders)
        held_out = held_out_images({"train_beton": beton, "test_beton": test_beton, "num_workers": 0},
                                   options["health_images"], options["image_size"], device)  # the trainer's own choice
        figures["health"] = time_health(parts, held_out, clock)
        read_s_per_image = figures["loader_ms"] / 1000 / options["batch_size"]  # decoding, at the loader's rate
        figures["knn"] = {"first_s": seconds[0], "seconds": seconds[1], "images": monitor_images,
                          "cached": monitor.cached, "s_per_image": seconds[1] / monitor_images,
                          "read_s_per_image": read_s_per_image,
                          # what the first evaluation took beyond a steady one and the reading: loader start-up
                          # and pipeline compilation, paid once whatever the number of images
                          "fixed_s": max(0.0, seconds[0] - seconds[1] - monitor_images * read_s_per_image),
                          "top1": accuracy["knn_top1"]}
        del monitor, held_out
    figures["projection"] = project(figures, options)
    return figures


def format_table(figures: dict) -> str:
    """The printed summary: one line per measurement, the projection last."""
    options, batch = figures["settings"], figures["settings"]["batch_size"]
    lines = [f"GPU check on {figures['name']} ({figures['device']}): {options['arch']}, B={batch}, K={options['K']}, "
             f"D={options['proj_dim']}, {options['image_size']} px", ""]
    lines.append(f"{'measurement':<36} {'ms':>10} {'images/s':>12}")

    def row(name: str, ms: float, per_batch: bool = True) -> None:
        rate = f"{batch / ms * 1000:,.0f}" if per_batch and ms > 0 else ""
        lines.append(f"{name:<36} {ms:>10.2f} {rate:>12}")

    row("loader (batch on the device)", figures["loader_ms"])
    for mode in ("eager", "compiled"):
        if mode not in figures:
            continue
        result = figures[mode]
        row(f"step, {mode} (steady state)", result["step_ms"])
        for stage, ms in result["stages_ms"].items():
            row(f"  {stage}", ms, per_batch=False)
        memory = f", peak memory {result['peak_memory_gb']:.1f} GiB" if "peak_memory_gb" in result else ""
        lines.append(f"  first step {result['cold_s']:.1f} s{memory}")
    if "eager_proj_bf16" in figures:
        tail = figures["eager"]["step_ms"] / figures["eager_proj_bf16"]["step_ms"] - 1
        row("step, eager, projector tail in bf16", figures["eager_proj_bf16"]["step_ms"])
        lines.append(f"  the float32 tail (cfg.proj_fp32=1): eager step {tail:+.1%} against this")
    probe, eager_ms = figures["probe"], figures["eager"]["step_ms"]
    row("online probe update alone", probe["alone_ms"], per_batch=False)
    row(f"  in a step ({probe['in_step_ms'] / eager_ms:.1%}, with - without)", probe["in_step_ms"], per_batch=False)
    lines.append(f"  (median of 5 alternated rounds; their spread {probe['spread_ms']:.2f} ms)")
    for method, ms in figures["rank_term_ms"].items():
        row(f"rank term fwd+bwd, {method}", ms, per_batch=False)
    checkpoint = figures["checkpoint"]
    row(f"checkpoint ({checkpoint['mb']:.0f} MB): blocking part", checkpoint["blocking_ms"], per_batch=False)
    if "device_ms" in checkpoint:
        row("checkpoint: copy on the device stream", checkpoint["device_ms"], per_batch=False)
    row("checkpoint: background write", checkpoint["write_ms"], per_batch=False)
    if "health" in figures:
        health_figures = figures["health"]
        row(f"health figures, {health_figures['images']} held-out images", health_figures["ms"], per_batch=False)
        row("  embedding", health_figures["embed_ms"], per_batch=False)
        row(f"  figures, ({health_figures['images']}, {health_figures['dim']})", health_figures["figures_ms"],
            per_batch=False)
        labels = {"svdvals": "svdvals (used)", "gram_eigvalsh_float64": "fp64 Gram"}
        for method, ms in health_figures["singular_values_ms"].items():
            row(f"    singular values: {labels.get(method, method)}", ms, per_batch=False)
    if "log_sync_ms" in figures:
        row(f"log sync every {options['log_every']} steps, per step", figures["log_sync_ms"], per_batch=False)
    if "loader_check" in figures:
        check = figures["loader_check"]
        lines.append(f"loader check: {check['images_compared']:,} images in {check['passes']} passes equal the CPU "
                     "read (checksums and labels)")
    knn = figures["knn"]
    first = f"   (first evaluation {knn['first_s']:.2f} s: reads the betons)" if "first_s" in knn else ""
    lines.append(f"{'kNN monitor, ' + format(knn['images'], ',') + ' images':<36} {knn['seconds'] * 1000:>10.1f}{first}")
    p = figures["projection"]
    lines += ["", f"projected run: {options['epochs']} epochs x {p['steps_per_epoch']} steps = {p['total_h']:.2f} h "
              f"= {p['total_s'] / 60:.1f} min (training {p['train_s'] / 60:.1f} min, compilation {p['compile_s'] / 60:.1f} "
              f"min, checkpoints {p['checkpoints_s'] / 60:.1f} min = {p['checkpoint_share']:.1%}, health + probe + log syncs "
              f"{(p['health_s'] + p.get('probe_s', 0.0) + p['log_sync_s']) / 60:.1f} min = {p.get('monitors_share', 0.0):.1%}, kNN every "
              f"{options['knn_every']} epochs {p['knn_s'] / 60:.1f} min = {p['knn_share']:.1%})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, runs the check, prints the table, writes the JSON; returns every figure."""
    options = parse_config(argv, __doc__, ("gpu",))["gpu"]
    figures = run_check(options)
    figures["command"] = "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_table(figures))
    out = Path(options["out"] or f"runs/bench/gpu_check_{figures['device'].split(':')[0]}.json")
    atomic_write(out, lambda handle: json.dump(figures, handle, indent=2), binary=False)
    print(f"wrote {out}")
    return figures


if __name__ == "__main__":
    sys.exit(run_cli(main))
