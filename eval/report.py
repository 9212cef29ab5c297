"""Plots of a pretraining run: ``python eval/report.py RUN_DIR``.

Writes into ``RUN_DIR/report/``:

* ``losses.png``: the total loss and the method's logged parts per epoch;
* ``knn.png``: kNN top-1 accuracy per epoch, with the run's k and temperature (and a random
  encoder's, when ``--baseline`` has it);
* ``lr_throughput.png``: learning rate and images/s per epoch;
* ``health.png``: per-dimension std, effective rank and nearest-neighbour distance, with what they
  were computed on (``run.health_images`` held-out images, or the last training batch's zbar);
* ``spectrum.png``: zbar's singular values on a batch of images, trained encoder against a random one;
* ``views.png``: a few images above their K augmented views;
* ``embeddings_tsne.png`` (and ``embeddings_umap.png`` when ``umap-learn`` is installed): a 2-D map
  of up to 2,000 test-set backbone features, coloured and named by class;
* ``retrieval.png``: query test images and their five nearest training images in embedding space,
  each neighbour marked ✓ (same class as the query) or ✗;
* ``results.png``: the evaluation JSONs of the run (``eval_*.json``) against the baseline's.

The images of the last four are spread over each beton (stratified by class, from the run's seed:
:func:`measure.sample.spread_indices`), not its first images: folder and Mini-ImageNet betons are
stored class by class. Class names come from the beton's sidecar (``<beton>.classes.json``, written
with it); a beton without one shows class numbers. A run trained on an unlabelled beton gets every
plot that needs no labels, its pictures drawn from training images (no test beton is needed).

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

from core.config import UserError, argument_parser, run_cli  # noqa: E402
from core.io import read_jsonl  # noqa: E402
from train.rundir import RunDir  # noqa: E402


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


def _epoch_axis(axis) -> None:
    """An x axis of epochs: whole-number ticks, also on a run of a few epochs."""
    from matplotlib.ticker import MaxNLocator

    axis.set_xlabel("epoch")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


_SIMMER_TITLES = {"loss": "total loss  L = L_TV + α_H L_H + α_R L_R", "tv": "total variance L_TV",
                  "entropy": "entropy term L_H", "rank": "rank term L_R"}


def plot_losses(log: list[dict], out: Path, method: str = "simmer", parts: tuple[str, ...] = ("tv", "entropy", "rank")):
    """The total loss and each of the method's logged parts per epoch; returns the figure."""
    plt = _pyplot()
    keys = ("loss", *parts)
    rows = (len(keys) + 1) // 2
    figure, axes = plt.subplots(rows, 2, figsize=(10, 3.5 * rows), sharex=True, squeeze=False)
    for axis, key in zip(axes.flat, keys):
        axis.plot(*_series(log, key), marker="o", markersize=3)
        axis.set_title(_SIMMER_TITLES[key] if method == "simmer" else ("total loss" if key == "loss" else key))
        axis.set_ylabel("value" if key == "loss" else "value (unweighted)")
        axis.grid(alpha=0.3)
        _epoch_axis(axis)
    for axis in list(axes.flat)[len(keys):]:
        axis.set_visible(False)
    figure.suptitle(f"{method} pretraining loss per epoch (mean over steps)")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return figure


def plot_knn(log: list[dict], out: Path, baseline: dict[str, dict], k: int | None = None,
             temperature: float | None = None):
    """kNN monitor accuracy per epoch, titled with the run's ``run.knn_k`` / ``run.knn_temperature``."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    epochs, values = _series(log, "knn_top1")
    axis.plot(epochs, [100 * v for v in values], marker="o", label="trained encoder")
    if "knn" in baseline:
        axis.axhline(100 * baseline["knn"]["top1"], color="gray", linestyle="--", label="random encoder")
    _epoch_axis(axis)
    axis.set_ylabel("kNN top-1 accuracy (%)")
    settings = f"k={k}, t={temperature:g}, " if k is not None and temperature is not None else ""
    axis.set_title(f"kNN monitor ({settings}train set as memory bank)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return figure


def plot_lr_throughput(log: list[dict], out: Path):
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(*_series(log, "lr"), marker="o", markersize=3)
    left.set_title("learning rate (at the end of each epoch)")
    left.set_ylabel("lr")
    right.plot(*_series(log, "images_per_s"), marker="o", markersize=3, color="tab:green")
    right.set_title("training throughput")
    right.set_ylabel("images / s (each image = K views)")
    for axis in (left, right):
        _epoch_axis(axis)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return figure


def health_source(log: list[dict]) -> str:
    """What the health figures of ``log`` were computed on, as the log lines say."""
    lines = [line for line in log if "zbar_std" in line]
    held_out = [line for line in lines if line.get("health_images")]
    counts = sorted({int(line["health_images"]) for line in held_out})
    images = f"{'/'.join(f'{c:,}' for c in counts)} held-out images in eval mode"
    if len(held_out) == len(lines):
        return images
    if not held_out:
        return "the last training batch's zbar of each epoch"
    return f"{images} from epoch {held_out[0]['epoch']}; the last training batch's zbar in other epochs"


def plot_health(log: list[dict], out: Path):
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 4))
    collapsed = [line["epoch"] for line in log if line.get("collapsed")]
    for axis, (key, title, unit) in zip(axes, [
            ("zbar_std", "std per dimension (mean)", "std"),
            ("zbar_effective_rank", "effective rank", "exp(entropy of σ / Σσ)"),
            ("zbar_nn_distance", "mean nearest-neighbour distance", "L2 distance")]):
        axis.plot(*_series(log, key), marker="o", markersize=3, color="tab:purple")
        for epoch in collapsed:
            axis.axvline(epoch, color="red", alpha=0.2)
        axis.set_title(title)
        _epoch_axis(axis)
        axis.set_ylabel(unit)
        axis.grid(alpha=0.3)
    flagged = "; red: flagged as collapsed" if collapsed else ""
    figure.suptitle(f"representation health ({health_source(log)}{flagged})")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return figure


@dataclass
class Pictures:
    """What the run's encoder shows on its data: computed (or refused) before anything is drawn.

    ``test_*`` are the images shown and mapped (a labelled run's test images; an unlabelled run's
    training images), ``bank_*`` the training images searched for neighbours (the same images
    when the run is unlabelled: a query is then never its own neighbour). Labels are -1 and
    ``class_names`` empty when the run's data is unlabelled.
    """

    spectra: dict[str, torch.Tensor]  # zbar's singular values on a test batch, trained and random encoder
    views: torch.Tensor  # (3, H, W) in [0, 1]: a few test images above their K augmented views
    test_images: torch.Tensor  # (N, 3, h, w) uint8, up to ``max_images`` spread over the beton (shuffled)
    test_features: torch.Tensor  # (N, F) backbone features of those, L2-normalised
    test_labels: torch.Tensor  # (N,)
    bank_images: torch.Tensor  # (M, 3, h, w) uint8, training images searched for neighbours
    bank_features: torch.Tensor  # (M, F), L2-normalised
    bank_labels: torch.Tensor  # (M,)
    class_names: tuple[str, ...]  # label -> name (the beton's sidecar, else the numbers)
    same_images: bool = False  # the bank is the test images themselves (an unlabelled run)

    @property
    def labelled(self) -> bool:
        return bool(self.class_names)


def sample_images(path, count: int, seed: int, batch_size: int = 256,
                  image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` images of the beton at ``path`` spread over it (stratified by class,
    :func:`measure.sample.spread_indices`), in an order shuffled from ``seed``: uint8 images and
    labels. Only those images are decoded."""
    from data_prep.loader import BetonLoader, inspect_beton
    from measure.features import read_images
    from measure.sample import spread_indices

    chosen = spread_indices(inspect_beton(path).labels, count, seed)
    loader = BetonLoader(path, batch_size, train=False, num_workers=1, image_size=image_size, indices=chosen)
    images, labels = read_images(loader)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return images[order], labels[order]


def gather_pictures(run_dir: Path, max_images: int = 2000, batch_size: int = 256) -> Pictures:
    """Loads the run's checkpoint and betons, and computes what the picture plots show.

    A run trained on an unlabelled beton needs no test beton: its pictures come from training images.
    """
    import torch.nn.functional as F

    from augment import build_augmentation, build_eval_transform, resolve_preset
    from data_prep.loader import inspect_beton
    from data_prep.writer import read_class_names
    from measure.features import embed_images
    from train.checkpoint import load_checkpoint
    from train.model import build_encoder_from_cfg
    from train.tracking import views_grid

    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    config = checkpoint["config"]
    cfg = config["cfg"]
    bank = inspect_beton(config["data"]["train_beton"])  # a missing or bad beton stops the report
    labelled = bank.labelled
    test = inspect_beton(config["data"]["test_beton"]) if labelled else bank
    size = cfg["image_size"] or None
    test_images, test_labels = sample_images(test.path, max_images, cfg["seed"], batch_size, size)
    bank_images, bank_labels = sample_images(bank.path, max_images, cfg["seed"], batch_size, size) \
        if labelled else (test_images, test_labels)
    image_size = test_images.shape[-1]
    preset = resolve_preset(cfg["augment"], image_size)
    torch.manual_seed(0)
    augment = build_augmentation(preset, cfg["K"], image_size)
    transform = build_eval_transform(preset)
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
            return F.normalize(embed_images(trained, images, transform, batch_size), dim=1)

        test_features = features(test_images)
        bank_features = features(bank_images) if labelled else test_features
    normalize = augment.normalize
    grid = views_grid(test_images, views, normalize.mean, normalize.std)
    names: tuple[str, ...] = ()
    if labelled:
        classes = test.num_classes
        names = read_class_names(test.path, classes) or read_class_names(bank.path, classes) \
            or tuple(str(i) for i in range(classes))
    return Pictures(spectra, grid, test_images, test_features, test_labels, bank_images, bank_features, bank_labels,
                    names, same_images=not labelled)


def plot_spectrum(spectra: dict[str, torch.Tensor], out: Path):
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, values in spectra.items():
        axis.semilogy(range(1, len(values) + 1), values.clamp_min(1e-12).numpy(), label=f"{name} encoder")
    axis.set_xlabel("singular value index")
    axis.set_ylabel("singular value of zbar (log scale)")
    axis.set_title("spectrum of zbar on a batch of images spread over the beton (flat = high rank)")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return figure


def plot_results(results: dict[str, dict], baseline: dict[str, dict], out: Path):
    """Top-1 of each protocol, trained against random encoder; a protocol one of them lacks has no
    bar there, only the words "not run"."""
    plt = _pyplot()
    protocols = sorted(set(results) | set(baseline))
    figure, axis = plt.subplots(figsize=(max(5, 2 + 1.6 * len(protocols)), 4.5))
    width = 0.38
    for offset, (name, source) in ((-width / 2, ("trained", results)), (width / 2, ("random", baseline))):
        ran = [i for i, p in enumerate(protocols) if p in source]
        bars = axis.bar([i + offset for i in ran], [100 * source[protocols[i]]["top1"] for i in ran], width,
                        label=f"{name} encoder")
        axis.bar_label(bars, fmt="%.1f", fontsize=8)
        for i in sorted(set(range(len(protocols))) - set(ran)):
            axis.text(i + offset, 1, "not run", rotation=90, ha="center", va="bottom", fontsize=8, color="gray")
    axis.set_xticks(range(len(protocols)), protocols)
    axis.set_ylabel("top-1 accuracy (%)")
    axis.set_title("evaluation: trained against random encoder")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return figure


def plot_views(grid: torch.Tensor, out: Path):
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(10, 10 * grid.shape[1] / grid.shape[2] + 0.6))
    axis.imshow(grid.permute(1, 2, 0).numpy())
    axis.set_title("images (top row) and their augmented views")
    axis.axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return figure


def umap_available() -> bool:
    """Whether the optional ``umap-learn`` package can be imported (the report then adds a UMAP map)."""
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


def _embed_2d(features: torch.Tensor, method: str, seed: int):
    if method == "umap":
        import umap

        return umap.UMAP(n_components=2, n_neighbors=max(2, min(15, len(features) - 1)),
                         random_state=seed).fit_transform(features.numpy())
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(features.numpy())


LEGEND_CLASSES = 20


def plot_embedding_map(pictures: Pictures, out: Path, method: str = "tsne", seed: int = 0):
    """A 2-D map (``tsne`` or ``umap``) of the images' backbone features, coloured and named by class."""
    from matplotlib.lines import Line2D

    points = _embed_2d(pictures.test_features, method, seed)
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7.5, 6.5))
    name = {"tsne": "t-SNE", "umap": "UMAP"}[method]
    if pictures.labelled:
        labels = pictures.test_labels.numpy()
        cmap = plt.get_cmap("tab10" if len(pictures.class_names) <= 10 else "tab20")
        axis.scatter(points[:, 0], points[:, 1], c=[cmap(c % cmap.N) for c in labels], s=6, alpha=0.8)
        present = sorted(set(labels.tolist()))
        shown = present[:LEGEND_CLASSES]
        handles = [Line2D([], [], marker="o", linestyle="", color=cmap(c % cmap.N), label=pictures.class_names[c])
                   for c in shown]
        title = "class" if len(shown) == len(present) else f"class ({len(shown)} of {len(present)})"
        axis.legend(handles=handles, title=title, fontsize=7, loc="center left", bbox_to_anchor=(1, 0.5))
        axis.set_title(f"{name} of {len(points)} test-set backbone features ({len(present)} classes)")
    else:
        axis.scatter(points[:, 0], points[:, 1], s=6, alpha=0.8)
        axis.set_title(f"{name} of {len(points)} training-set backbone features (unlabelled)")
    axis.set_xticks([])
    axis.set_yticks([])
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return figure


def plot_retrieval(pictures: Pictures, out: Path, queries: int = 8, neighbours: int = 5, seed: int = 0):
    """Query images (left) and their nearest training images in embedding space (cosine).

    Queries are spread over the classes. With labels, each caption names the class, and a
    neighbour's caption is green with ✓ when its class is the query's, red with ✗ otherwise.
    """
    from measure.sample import spread_indices

    rows = spread_indices(pictures.test_labels.numpy(), min(queries, len(pictures.test_images)), seed)
    neighbours = min(neighbours, len(pictures.bank_images) - int(pictures.same_images))
    similarity = pictures.test_features[rows] @ pictures.bank_features.T
    if pictures.same_images:  # a query is not its own neighbour
        similarity[torch.arange(len(rows)), torch.as_tensor(rows)] = -float("inf")
    top = similarity.topk(neighbours, dim=1)
    plt = _pyplot()
    figure, axes = plt.subplots(len(rows), neighbours + 1, figsize=(1.5 * (neighbours + 1), 1.5 * len(rows)),
                                squeeze=False)
    names = pictures.class_names
    for row, query in enumerate(rows.tolist()):
        label = int(pictures.test_labels[query])
        cells = [(pictures.test_images[query], "query" + (f"\n{names[label]}" if names else ""), "black")]
        for index, value in zip(top.indices[row].tolist(), top.values[row].tolist()):
            caption, colour = f"{value:.2f}", "black"
            if names:
                match = int(pictures.bank_labels[index]) == label
                caption += f" {'✓' if match else '✗'}\n{names[int(pictures.bank_labels[index])]}"
                colour = "tab:green" if match else "tab:red"
            cells.append((pictures.bank_images[index], caption, colour))
        for column, (image, caption, colour) in enumerate(cells):
            axes[row][column].imshow(image.permute(1, 2, 0).numpy())
            axes[row][column].set_title(caption, fontsize=6, color=colour)
            axes[row][column].axis("off")
    kind = "other training images" if pictures.same_images else "training images"
    marks = "; ✓ same class as the query, ✗ another" if names else ""
    figure.suptitle(f"nearest {kind} (cosine similarity of backbone features{marks})", fontsize=9)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return figure


def _method_parts(method: str) -> tuple[str, ...]:
    """The loss parts that ``method`` logs (SimMER's for a method this version does not know)."""
    from train.methods import get_method

    try:
        return get_method(method).parts
    except ValueError:
        return get_method("simmer").parts


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
    config = RunDir(run_dir).read_config() or {}  # {} for an older run without one
    pictures = gather_pictures(run_dir) if (run_dir / "checkpoints" / "last.pt").is_file() else None
    method = config.get("cfg", {}).get("method", "simmer")
    parts = _method_parts(method)
    run = config.get("run", {})
    seed = config.get("cfg", {}).get("seed", 0)
    plots = [("losses.png", lambda path: plot_losses(log, path, method, parts)),
             ("lr_throughput.png", lambda path: plot_lr_throughput(log, path))]
    if any("knn_top1" in line for line in log):
        plots.append(("knn.png", lambda path: plot_knn(log, path, baseline, run.get("knn_k"), run.get("knn_temperature"))))
    if any("zbar_std" in line for line in log):
        plots.append(("health.png", lambda path: plot_health(log, path)))
    if pictures is not None:
        plots += [("spectrum.png", lambda path: plot_spectrum(pictures.spectra, path)),
                  ("views.png", lambda path: plot_views(pictures.views, path)),
                  ("embeddings_tsne.png", lambda path: plot_embedding_map(pictures, path, "tsne", seed)),
                  ("retrieval.png", lambda path: plot_retrieval(pictures, path, seed=seed))]
        if umap_available():
            plots.append(("embeddings_umap.png", lambda path: plot_embedding_map(pictures, path, "umap", seed)))
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
    parser = argument_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a pretraining run directory (holds log.jsonl)")
    parser.add_argument("--baseline", default=None, help="folder of a random encoder's eval_*.json files")
    args = parser.parse_args(argv)
    return write_report(args.run_dir, args.baseline)


if __name__ == "__main__":
    sys.exit(run_cli(main))
