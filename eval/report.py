"""Plots of a pretraining run: ``python eval/report.py RUN_DIR``.

Writes into ``RUN_DIR/report/``:

* ``losses.png``: the loss and its three parts (total variance, entropy, rank) per epoch;
* ``knn.png``: kNN top-1 accuracy per epoch (and a random encoder's, when ``--baseline`` has it);
* ``lr_throughput.png``: learning rate and images/s per epoch;
* ``health.png``: zbar's per-dimension std, effective rank and nearest-neighbour distance;
* ``spectrum.png``: zbar's singular values on a test batch, trained encoder against a random one;
* ``results.png``: the evaluation JSONs of the run (``eval_*.json``) against the baseline's.

``--baseline DIR`` is a folder of random-encoder results (e.g. ``runs/random_resnet18``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from core.config import UserError, run_cli  # noqa: E402
from core.io import read_jsonl  # noqa: E402


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_log(path: Path) -> list[dict]:
    """The run's log lines (a torn last line is ignored with a warning); refuses a missing or empty log."""
    if not path.is_file():
        raise UserError(f"{path} not found: is {path.parent} a pretraining run directory?")
    lines = read_jsonl(path)
    if not lines:
        raise UserError(f"{path} is empty: the run has not finished an epoch yet")
    return lines


def read_results(folder: Path | None) -> dict[str, dict]:
    if folder is None or not folder.is_dir():
        return {}
    return {path.stem.removeprefix("eval_"): json.loads(path.read_text()) for path in sorted(folder.glob("eval_*.json"))}


def _series(log: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(line["epoch"], line[key]) for line in log if key in line]
    return [p[0] for p in points], [p[1] for p in points]


def plot_losses(log: list[dict], out: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    titles = {"loss": "total loss  L = L_TV + α_H L_H + α_R L_R", "tv": "total variance L_TV",
              "entropy": "entropy term L_H", "rank": "rank term L_R"}
    for axis, (key, title) in zip(axes.flat, titles.items()):
        axis.plot(*_series(log, key), marker="o", markersize=3)
        axis.set_title(title)
        axis.set_ylabel("value (unweighted)" if key != "loss" else "value")
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("epoch")
    figure.suptitle("SimMER pretraining loss per epoch (mean over steps)")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_knn(log: list[dict], out: Path, baseline: dict[str, dict]) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    epochs, values = _series(log, "knn_top1")
    axis.plot(epochs, [100 * v for v in values], marker="o", label="trained encoder")
    if "knn" in baseline:
        axis.axhline(100 * baseline["knn"]["top1"], color="gray", linestyle="--", label="random encoder")
    axis.set_xlabel("epoch")
    axis.set_ylabel("kNN top-1 accuracy (%)")
    axis.set_title("kNN monitor (k=200, t=0.1, train set as memory bank)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_lr_throughput(log: list[dict], out: Path) -> None:
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(*_series(log, "lr"), marker="o", markersize=3)
    left.set_title("learning rate (at the end of each epoch)")
    left.set_xlabel("epoch")
    left.set_ylabel("lr")
    right.plot(*_series(log, "images_per_s"), marker="o", markersize=3, color="tab:green")
    right.set_title("training throughput")
    right.set_xlabel("epoch")
    right.set_ylabel("images / s (each image = K views)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_health(log: list[dict], out: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    for axis, (key, title, unit) in zip(axes, [
            ("zbar_std", "zbar std per dimension (mean)", "std"),
            ("zbar_effective_rank", "zbar effective rank", "exp(entropy of σ / Σσ)"),
            ("zbar_nn_distance", "mean nearest-neighbour distance", "L2 distance")]):
        axis.plot(*_series(log, key), marker="o", markersize=3, color="tab:purple")
        collapsed = [line["epoch"] for line in log if line.get("collapsed")]
        for epoch in collapsed:
            axis.axvline(epoch, color="red", alpha=0.2)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.set_ylabel(unit)
        axis.grid(alpha=0.3)
    figure.suptitle("representation health (last batch of each epoch; red: flagged as collapsed)")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


@torch.no_grad()
def zbar_spectra(run_dir: Path, batch_size: int = 512) -> dict[str, torch.Tensor]:
    """Singular values of zbar on the first test batch: the run's encoder and a random one of its arch."""
    from augment import build_augmentation, resolve_preset
    from data_prep.loader import BetonLoader, inspect_beton
    from train.checkpoint import load_checkpoint
    from train.model import build_encoder_from_cfg

    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    config = checkpoint["config"]
    cfg = config["cfg"]
    inspect_beton(config["data"]["test_beton"])  # a missing or bad test beton stops the report before any plot
    loader = BetonLoader(config["data"]["test_beton"], batch_size, train=False, num_workers=1,
                         image_size=cfg["image_size"] or None)
    image_size = loader.image_size
    preset = resolve_preset(cfg["augment"], image_size)
    torch.manual_seed(0)
    augment = build_augmentation(preset, cfg["K"], image_size)
    images = next(iter(loader)).images.clone()
    views = augment(images)
    spectra = {}
    for name, state in (("trained", checkpoint["model"]), ("random", None)):
        torch.manual_seed(cfg["seed"])
        encoder = build_encoder_from_cfg(cfg, image_size)
        if state is not None:
            encoder.load_state_dict(state)
        encoder.eval()
        zbar = encoder(views).float().mean(0)
        spectra[name] = torch.linalg.svdvals(zbar)
    return spectra


def plot_spectrum(spectra: dict[str, torch.Tensor], out: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, values in spectra.items():
        axis.semilogy(range(1, len(values) + 1), values.clamp_min(1e-12).numpy(), label=f"{name} encoder")
    axis.set_xlabel("singular value index")
    axis.set_ylabel("singular value of zbar (log scale)")
    axis.set_title("spectrum of zbar on a test batch (flat = high rank)")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_results(results: dict[str, dict], baseline: dict[str, dict], out: Path) -> None:
    plt = _pyplot()
    protocols = sorted(set(results) | set(baseline))
    figure, axis = plt.subplots(figsize=(max(5, 2 + 1.6 * len(protocols)), 4.5))
    width = 0.38
    for offset, (name, source) in ((-width / 2, ("trained", results)), (width / 2, ("random", baseline))):
        values = [100 * source[p]["top1"] if p in source else 0.0 for p in protocols]
        bars = axis.bar([i + offset for i in range(len(protocols))], values, width, label=f"{name} encoder")
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
    axis.set_xticks(range(len(protocols)), protocols)
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title("evaluation: trained against random encoder")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def write_report(run_dir: str | Path, baseline_dir: str | Path | None = None) -> list[Path]:
    """Writes every plot the run's files allow; returns their paths."""
    run_dir = Path(run_dir)
    log = read_log(run_dir / "log.jsonl")
    spectra = None  # the part that reads other files: done (or refused) before anything is drawn
    if (run_dir / "checkpoints" / "last.pt").is_file():
        spectra = zbar_spectra(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    baseline = read_results(Path(baseline_dir) if baseline_dir else None)
    results = read_results(run_dir)
    written = []
    plot_losses(log, out / "losses.png")
    written.append(out / "losses.png")
    if any("knn_top1" in line for line in log):
        plot_knn(log, out / "knn.png", baseline)
        written.append(out / "knn.png")
    plot_lr_throughput(log, out / "lr_throughput.png")
    written.append(out / "lr_throughput.png")
    if any("zbar_std" in line for line in log):
        plot_health(log, out / "health.png")
        written.append(out / "health.png")
    if spectra is not None:
        plot_spectrum(spectra, out / "spectrum.png")
        written.append(out / "spectrum.png")
    if results or baseline:
        plot_results(results, baseline, out / "results.png")
        written.append(out / "results.png")
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a pretraining run directory (holds log.jsonl)")
    parser.add_argument("--baseline", default=None, help="folder of a random encoder's eval_*.json files")
    args = parser.parse_args(argv)
    return write_report(args.run_dir, args.baseline)


if __name__ == "__main__":
    sys.exit(run_cli(main))
