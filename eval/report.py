"""Plots of a pretraining run: ``python eval/report.py RUN_DIR``.

Writes into ``RUN_DIR/report/``:

* ``losses.png``: the loss and its parts per epoch (SimMER: total variance, entropy, rank; a
  baseline of ``cfg.method``: its own parts);
* ``knn.png``: kNN top-1 accuracy per epoch (and a random encoder's, when ``--baseline`` has it);
* ``lr_throughput.png``: learning rate and images/s per epoch;
* ``health.png``: per-dimension std, effective rank and nearest-neighbour distance of the held-out
  embeddings (``run.health_images``; the last training batch's zbar in older runs);
* ``spectrum.png``: zbar's singular values on a test batch, trained encoder against a random one;
* ``views.png``: a few test images above their K augmented views;
* ``embeddings_tsne.png``: a t-SNE map of (up to 2,000) test-set backbone features, coloured by class;
* ``retrieval.png``: query test images and their five nearest training images in embedding space;
* ``results.png``: the evaluation JSONs of the run (``eval_*.json``) against the baseline's.

``--baseline DIR`` is a folder of random-encoder results (e.g. ``runs/random_resnet18``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
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


def read_results(folder: Path | None, required: bool = False) -> dict[str, dict]:
    """The evaluation results (``eval_*.json``) in ``folder`` by protocol; a broken one is refused by name.

    A missing folder gives ``{}``, or is refused when ``required`` (a ``--baseline`` that was asked for).
    """
    if folder is None or not folder.is_dir():
        if required:
            raise UserError(f"--baseline {folder} is not a folder (expected one with a random encoder's eval_*.json)")
        return {}
    results = {}
    for path in sorted(folder.glob("eval_*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"cannot read {path}: {error}") from None
        if not isinstance(result, dict) or not isinstance(result.get("top1"), (int, float)):
            raise UserError(f"{path} holds no top1: not the results of eval/knn.py, linear.py or finetune.py")
        results[path.stem.removeprefix("eval_")] = result
    return results


def _series(log: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(line["epoch"], line[key]) for line in log if key in line]
    return [p[0] for p in points], [p[1] for p in points]


def _method_of(log: list[dict]):
    """The method whose loss parts the log's lines hold (SimMER when none matches)."""
    from train.methods import METHODS, get_method

    keys = set().union(*log) if log else set()
    return next((get_method(name) for name in METHODS if set(get_method(name).parts) <= keys), get_method("simmer"))


def plot_losses(log: list[dict], out: Path) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    method = _method_of(log)
    titles = {name: name for name in method.log_names}
    if method.name == "simmer":
        titles = {"loss": "total loss  L = L_TV + α_H L_H + α_R L_R", "tv": "total variance L_TV",
                  "entropy": "entropy term L_H", "rank": "rank term L_R"}
    for axis in axes.flat[len(titles):]:
        axis.set_visible(False)
    for axis, (key, title) in zip(axes.flat, titles.items()):
        axis.plot(*_series(log, key), marker="o", markersize=3)
        axis.set_title(title)
        axis.set_ylabel("value (unweighted)" if key != "loss" else "value")
        axis.grid(alpha=0.3)
    for axis in axes[1]:
        axis.set_xlabel("epoch")
    figure.suptitle(f"{'SimMER' if method.name == 'simmer' else method.name} pretraining loss per epoch (mean over steps)")
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
    held_out = log[-1].get("health_images") if log else None
    source = f"{held_out:,} fixed images, eval mode" if held_out else "last training batch's zbar"
    figure.suptitle(f"health figures ({source})")
    for axis, (key, title, unit) in zip(axes, [
            ("zbar_std", "std per dimension (mean)", "std"),
            ("zbar_effective_rank", "effective rank", "exp(entropy of σ / Σσ)"),
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


@dataclass
class Pictures:
    """What the run's encoder shows on its data: computed (or refused) before anything is drawn."""

    spectra: dict[str, torch.Tensor]  # zbar's singular values on a test batch, trained and random encoder
    views: torch.Tensor  # (3, H, W) in [0, 1]: a few test images above their K augmented views
    test_images: torch.Tensor  # (N, 3, h, w) uint8, the first ``max_images`` test images
    test_features: torch.Tensor  # (N, F) backbone features of those, L2-normalised
    test_labels: torch.Tensor  # (N,)
    bank_images: torch.Tensor  # (M, 3, h, w) uint8, training images searched for neighbours
    bank_features: torch.Tensor  # (M, F), L2-normalised
    class_names: tuple[str, ...]


def _take(loader, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, taken = [], [], 0
    for batch in loader:
        images.append(batch.images.clone())
        labels.append(batch.labels.clone())
        taken += len(batch.images)
        if taken >= count:
            break
    return torch.cat(images)[:count], torch.cat(labels)[:count]


def gather_pictures(run_dir: Path, max_images: int = 2000, batch_size: int = 256) -> Pictures:
    """Loads the run's checkpoint and betons, and computes what the picture plots show."""
    import torch.nn.functional as F

    from augment import build_augmentation, build_eval_transform, resolve_preset
    from data_prep.loader import BetonLoader, inspect_beton
    from train.checkpoint import load_checkpoint
    from train.model import build_encoder_from_cfg
    from train.tracking import views_grid

    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    config = checkpoint["config"]
    cfg = config["cfg"]
    for path in (config["data"]["test_beton"], config["data"]["train_beton"]):
        inspect_beton(path)  # a missing or bad beton stops the report before any plot
    size = cfg["image_size"] or None
    test = BetonLoader(config["data"]["test_beton"], batch_size, train=False, num_workers=1, image_size=size)
    bank = BetonLoader(config["data"]["train_beton"], batch_size, train=False, num_workers=1, image_size=size)
    image_size = test.image_size
    preset = resolve_preset(cfg["augment"], image_size)
    torch.manual_seed(0)
    augment = build_augmentation(preset, cfg["K"], image_size)
    transform = build_eval_transform(preset)
    test_images, test_labels = _take(test, max_images)
    bank_images, _ = _take(bank, max_images)
    views = augment(test_images[:batch_size])
    encoders = {}
    for name, state in (("trained", checkpoint["model"]), ("random", None)):
        torch.manual_seed(cfg["seed"])
        encoder = build_encoder_from_cfg(cfg, image_size)
        if state is not None:
            encoder.load_state_dict(state)
        encoders[name] = encoder.eval()
    with torch.no_grad():
        spectra = {name: torch.linalg.svdvals(encoder(views).float().mean(0)) for name, encoder in encoders.items()}
        trained = encoders["trained"].backbone

        def features(images: torch.Tensor) -> torch.Tensor:
            return F.normalize(torch.cat([trained(transform(chunk)).float() for chunk in images.split(batch_size)]), dim=1)

        test_features, bank_features = features(test_images), features(bank_images)
    normalize = augment.normalize
    grid = views_grid(test_images, views, normalize.mean, normalize.std)
    names = tuple(str(i) for i in range(int(test_labels.max()) + 1))
    return Pictures(spectra, grid, test_images, test_features, test_labels, bank_images, bank_features, names)


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


def plot_views(grid: torch.Tensor, out: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(10, 10 * grid.shape[1] / grid.shape[2] + 0.6))
    axis.imshow(grid.permute(1, 2, 0).numpy())
    axis.set_title("test images (top row) and their augmented views")
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_embedding_map(features: torch.Tensor, labels: torch.Tensor, out: Path, seed: int = 0) -> None:
    """A 2-D t-SNE map of test-set embeddings, coloured by class."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
    points = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(features.numpy())
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 6.5))
    scatter = axis.scatter(points[:, 0], points[:, 1], c=labels.numpy(), cmap="tab10" if labels.max() < 10 else "tab20",
                           s=6, alpha=0.8)
    axis.legend(*scatter.legend_elements(num=min(20, int(labels.max()) + 1)), title="class", fontsize=7,
                loc="center left", bbox_to_anchor=(1, 0.5))
    axis.set_title(f"t-SNE of {len(features)} test-set backbone features")
    axis.set_xticks([])
    axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def plot_retrieval(pictures: Pictures, out: Path, queries: int = 8, neighbours: int = 5) -> None:
    """Query test images (left) and their nearest training images in embedding space (cosine)."""
    queries = min(queries, len(pictures.test_images))
    neighbours = min(neighbours, len(pictures.bank_images))
    similarity = pictures.test_features[:queries] @ pictures.bank_features.T
    top = similarity.topk(neighbours, dim=1)
    plt = _pyplot()
    figure, axes = plt.subplots(queries, neighbours + 1, figsize=(1.4 * (neighbours + 1), 1.4 * queries), squeeze=False)
    for row in range(queries):
        images = [pictures.test_images[row]] + [pictures.bank_images[i] for i in top.indices[row].tolist()]
        titles = ["query"] + [f"{v:.2f}" for v in top.values[row].tolist()]
        for column, (image, title) in enumerate(zip(images, titles)):
            axes[row][column].imshow(image.permute(1, 2, 0).numpy())
            axes[row][column].set_title(title, fontsize=7)
            axes[row][column].axis("off")
    figure.suptitle("nearest training images (cosine similarity of backbone features)", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def write_report(run_dir: str | Path, baseline_dir: str | Path | None = None) -> list[Path]:
    """Writes every plot the run's files allow; returns their paths.

    Every input is read first: a missing or bad file stops the report before anything is drawn.
    The plots are drawn in a temporary folder and moved into ``report/`` together at the end, so
    a failure leaves no new plot there.
    """
    run_dir = Path(run_dir)
    log = read_log(run_dir / "log.jsonl")
    baseline = read_results(Path(baseline_dir), required=True) if baseline_dir else {}
    results = read_results(run_dir)
    out = run_dir / "report"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: the report is a folder of plots")
    pictures = gather_pictures(run_dir) if (run_dir / "checkpoints" / "last.pt").is_file() else None
    plots = [("losses.png", lambda path: plot_losses(log, path)),
             ("lr_throughput.png", lambda path: plot_lr_throughput(log, path))]
    if any("knn_top1" in line for line in log):
        plots.append(("knn.png", lambda path: plot_knn(log, path, baseline)))
    if any("zbar_std" in line for line in log):
        plots.append(("health.png", lambda path: plot_health(log, path)))
    if pictures is not None:
        plots += [("spectrum.png", lambda path: plot_spectrum(pictures.spectra, path)),
                  ("views.png", lambda path: plot_views(pictures.views, path)),
                  ("embeddings_tsne.png", lambda path: plot_embedding_map(pictures.test_features,
                                                                          pictures.test_labels, path)),
                  ("retrieval.png", lambda path: plot_retrieval(pictures, path))]
    if results or baseline:
        plots.append(("results.png", lambda path: plot_results(results, baseline, path)))
    try:
        drawing = Path(tempfile.mkdtemp(dir=run_dir, prefix=".report."))
    except OSError as error:
        raise UserError(f"cannot write the report into {run_dir}: {error.strerror or error}") from None
    try:
        for name, plot in plots:
            plot(drawing / name)
        out.mkdir(exist_ok=True)
        for name, _ in plots:
            os.replace(drawing / name, out / name)
    finally:
        shutil.rmtree(drawing, ignore_errors=True)
    written = [out / name for name, _ in plots]
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
