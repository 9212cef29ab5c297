"""Portable weights: ``python train/export.py RUN_DIR --out DIR``.

Writes the run's backbone in the layout timm and the Hugging Face Hub use for timm models:

* ``model.safetensors``: the backbone's weights with timm's own keys (no projector);
* ``config.json``: timm's model config, made by timm's own ``save_config_for_hf``:
  ``architecture``, ``num_classes`` 0 (a backbone: pooled features), ``num_features``,
  ``model_args``, and ``pretrained_cfg`` with the training ``input_size`` (3, H, W), the
  ``mean``/``std`` of the run's augmentation preset (those the evaluations normalise with),
  ``crop_pct`` 1 and ``interpolation``; plus a ``simmer`` block timm ignores: ``cifar_stem``,
  ``maxpool`` (kept or removed: ``cfg.maxpool``), ``stem`` (the replaced modules), ``image_size``,
  ``augment``, ``epoch``, ``step``;
* ``README.md``: a model card: the loading code for this export, the training data, the run's
  evaluation results (``RUN_DIR/eval_*.json``), the licence (MIT) and the paper to cite.

The weights come from ``checkpoints/last.pt`` (the newest; its ``backbone.*`` keys) or, without
it, from ``backbone.pt`` with ``config.yaml``. Loading, with timm only::

    backbone = timm.create_model("local-dir:DIR", pretrained=True)   # timm's own stem: done

With the CIFAR stem (ResNets trained on images of 64 px or less) timm cannot build the model
from the config alone (its ResNet has no argument for a 3x3 stride-1 first conv without
max-pool): ``pretrained=True`` stops with a size mismatch on ``conv1``, or, for deep stems
(``resnet50d``, first conv ``conv1[0]`` of unchanged shape), loads without error into the wrong,
stride-2 stem. So the stem is swapped by hand before the weights are loaded (the export's
README.md has the exact line for its architecture)::

    backbone = timm.create_model("local-dir:DIR")                    # architecture, mean/std; random weights
    backbone.conv1, backbone.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    timm.models.load_checkpoint(backbone, "DIR/model.safetensors")

A run without the stem's max-pool only (``--cfg.maxpool=0``, the paper's Mini-ImageNet ResNet-18)
loads with ``pretrained=True`` but needs ``backbone.maxpool = nn.Identity()`` after it (the weights
do not show it). Or :func:`load_exported` (``DIR`` -> the backbone in eval mode, any stem).

``--push_to_hub REPO`` uploads the folder with ``huggingface_hub`` (needs the network and a
token: ``HF_TOKEN`` or ``hf auth login``); it is not covered by the offline tests.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import safetensors.torch  # noqa: E402
import timm  # noqa: E402
from torch import nn  # noqa: E402

from augment import PRESETS, resolve_preset  # noqa: E402
from core.config import UserError, argument_parser, run_cli  # noqa: E402
from core.io import atomic_write, check_names  # noqa: E402
from data_prep.loader import inspect_beton  # noqa: E402
from train.checkpoint import load_checkpoint, mismatch_summary, safe_load  # noqa: E402
from train.model import apply_cifar_stem, backbone_state, build_backbone, stem_from_cfg  # noqa: E402
from train.rundir import RunDir  # noqa: E402

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
LICENSE_ID = "mit"  # the repository's LICENSE, which covers the exported weights too
# The paper, as CITATION.cff at the repository's root cites it (a test keeps the two equal).
PAPER_TITLE = "SimMER: Simple Maximization of Entropy and Rank for Self-Supervised Representation Learning"
PAPER_AUTHORS = "Anonymous authors"
PAPER_NOTE = "Paper under double-blind review"

# pretrained_cfg fields timm copies from the architecture's default (ImageNet) weights; they describe
# those weights, not these, so the export drops them.
_SOURCE_FIELDS = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "license", "origin_url",
                  "paper_ids", "paper_name", "notes", "test_input_size", "test_crop_pct", "test_pool_size",
                  "label_names", "label_descriptions")


class ExportError(UserError):
    """A run directory that cannot be exported, or an export that cannot be written or pushed."""


@dataclass
class ExportedBackbone:
    backbone: nn.Module  # the timm model with the run's weights (and stem)
    arch: str
    cifar_stem: bool  # first conv replaced by a 3x3 stride-1 one
    maxpool: bool | None  # the stem's max-pool kept (True) or removed (False); None: the architecture has none
    image_size: int
    preset: str  # augmentation preset: its mean/std are the input normalisation
    epoch: int
    step: int | None
    source: Path  # the file the weights came from
    run_dir: Path | None = None  # the run directory (its evaluation results go into the model card)
    train_beton: str = ""  # the training beton the run's config names


def _stem_lines(exported: ExportedBackbone) -> tuple[str, str] | None:
    """The assignment that turns a fresh timm model into the exported backbone's stem, as code (on a
    variable ``backbone``) and as a description; None when the stem is timm's own."""
    targets, modules = [], []
    if exported.cifar_stem:
        first = exported.backbone.conv1
        conv = first if isinstance(first, nn.Conv2d) else first[0]
        targets.append("backbone.conv1" if isinstance(first, nn.Conv2d) else "backbone.conv1[0]")
        modules.append(f"nn.Conv2d({conv.in_channels}, {conv.out_channels}, 3, 1, 1, bias=False)")
    if exported.maxpool is False:
        targets.append("backbone.maxpool")
        modules.append("nn.Identity()")
    if not targets:
        return None
    code = f"{', '.join(targets)} = {', '.join(modules)}"
    return code, "; ".join(f"{t.removeprefix('backbone.')} = {m}" for t, m in zip(targets, modules))


def read_run(run_dir: str | os.PathLike, image_size: int | None = None) -> ExportedBackbone:
    """The backbone of the run in ``run_dir``, built as timm builds it and loaded with the run's weights.

    ``image_size`` is needed only when the run's ``cfg.image_size`` is 0 (the stored size) and its
    training beton can no longer be read.

    Raises:
        ExportError: no such directory, no checkpoint nor backbone in it, an unreadable config,
            or weights that do not fit the architecture the config names.
    """
    files = RunDir(run_dir)
    if not files.path.is_dir():
        raise ExportError(f"run directory not found: {files.path}")
    if files.last_checkpoint.is_file():
        checkpoint = load_checkpoint(files.last_checkpoint)
        config, source = checkpoint["config"], files.last_checkpoint
        epoch, step = int(checkpoint.get("epoch", 0)), checkpoint.get("step")
        state = {key.removeprefix("backbone."): value for key, value in checkpoint["model"].items()
                 if key.startswith("backbone.")}
    elif files.backbone.is_file():
        config = files.read_config()
        if config is None:
            raise ExportError(f"{files.backbone} has no {files.config.name} beside it: the architecture is unknown")
        state = safe_load(files.backbone, "backbone weights")
        if not isinstance(state, dict):
            raise ExportError(f"{files.backbone} holds a {type(state).__name__}, not a backbone's weights")
        source, summary = files.backbone, _read_summary(files.summary)
        epoch, step = int(summary.get("epochs_done", 0)), summary.get("steps")
    else:
        raise ExportError(f"{files.path} holds neither {files.last_checkpoint.relative_to(files.path)} nor "
                          f"{files.backbone.name}: is it a pretraining run directory?")
    if not isinstance(config, dict) or not isinstance(config.get("cfg"), dict) or "arch" not in config["cfg"]:
        raise ExportError(f"{source}: its config has no cfg.arch")
    cfg = config["cfg"]
    size = _image_size(cfg, config.get("data", {}), image_size)
    arch = cfg["arch"]
    if not timm.is_model(arch):
        raise ExportError(f"{source} was trained with cfg.arch={arch!r}, which this timm does not know")
    cifar_stem, pool_choice = stem_from_cfg(cfg, size)
    try:
        backbone = build_backbone(arch, cifar_stem, pool_choice)
    except ValueError as error:
        raise ExportError(f"{source}: {error}") from None
    pool = getattr(backbone, "maxpool", None)
    maxpool = None if pool is None else not isinstance(pool, nn.Identity)
    try:
        backbone.load_state_dict(state)
    except RuntimeError as error:
        raise ExportError(f"{source} does not fit a {arch} backbone ({'CIFAR' if cifar_stem else 'timm'} stem, "
                          f"{size} px): {mismatch_summary(error)}") from None
    preset = resolve_preset(cfg.get("augment", "auto"), size)
    return ExportedBackbone(backbone.eval(), arch, cifar_stem, maxpool, size, preset, epoch, step, source,
                            files.path, str(config.get("data", {}).get("train_beton", "")))


def _read_summary(path: Path) -> dict:
    """The finished run's ``summary.json`` (epochs and steps done), or {} when it is missing or torn."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _image_size(cfg: dict, data: dict, requested: int | None) -> int:
    """The side of the training images: ``cfg.image_size``, else the training beton's stored size.

    ``requested`` (``--image_size``) must agree with whichever of these the run recorded: a
    contradiction is refused (a backbone exported at another size would carry the wrong
    ``input_size``). Only when the run used the stored size and its beton can no longer be read
    does ``requested`` supply the size.
    """
    if requested is not None and requested < 1:
        raise ExportError(f"--image_size must be positive, got {requested}")
    configured = int(cfg.get("image_size") or 0)
    if configured:
        if requested not in (None, configured):
            raise ExportError(f"--image_size={requested} but the run was trained at cfg.image_size={configured}; "
                              "drop --image_size")
        return configured
    beton = data.get("train_beton", "")
    try:
        fixed = inspect_beton(beton).fixed_size
    except Exception:  # noqa: BLE001 - moved, deleted or unreadable: the user names the size
        if requested is not None:
            return requested
        raise ExportError(f"the run used the stored image size (cfg.image_size=0) of {beton or 'its beton'}, "
                          "which cannot be read here: pass --image_size") from None
    if fixed is None:
        if requested is not None:
            return requested
        raise ExportError(f"{beton} holds images of several sizes: pass --image_size")
    if requested not in (None, int(fixed[0])):
        raise ExportError(f"--image_size={requested} but the run was trained at the {fixed[0]} px stored in its "
                          f"training beton {beton}; drop --image_size")
    return int(fixed[0])


def hub_config(exported: ExportedBackbone) -> dict:
    """``config.json``: timm's ``save_config_for_hf`` output for the backbone, plus the ``simmer`` block."""
    from timm.models._hub import save_config_for_hf

    mean, std = PRESETS[exported.preset].mean_std  # what build_eval_transform(preset) normalises with
    size = exported.image_size
    data_config = dict(input_size=(3, size, size), mean=mean, std=std, crop_pct=1.0, interpolation="bilinear")
    with tempfile.TemporaryDirectory() as folder:
        save_config_for_hf(exported.backbone, str(Path(folder) / CONFIG_NAME), data_config=data_config)
        config = json.loads((Path(folder) / CONFIG_NAME).read_text())
    for key in _SOURCE_FIELDS:
        config["pretrained_cfg"].pop(key, None)
    lines = _stem_lines(exported)
    config["simmer"] = dict(cifar_stem=exported.cifar_stem, maxpool=exported.maxpool,
                            stem=lines[1] if lines else None, image_size=size, augment=exported.preset,
                            epoch=exported.epoch, step=exported.step)
    return config


def _training_data(exported: ExportedBackbone) -> str:
    """One sentence on the training data: the beton's name, and its images, size and classes when readable."""
    if not exported.train_beton:
        return "The run's config does not name its training data."
    name = Path(exported.train_beton).name
    try:
        info = inspect_beton(exported.train_beton)
    except Exception:  # noqa: BLE001 - moved or deleted since: the name is all there is
        return f"Trained on the beton `{name}` (not readable when this export was made)."
    sizes = "x".join(map(str, info.fixed_size)) + " px" if info.fixed_size else "images of several sizes"
    labels = f"{info.num_classes} classes, labels unused by pretraining" if info.labelled else "unlabelled"
    return f"Trained on the beton `{name}`: {info.num_samples:,} images, {sizes}, {labels}."


def _evaluations(exported: ExportedBackbone) -> list[str]:
    """Markdown table rows of the run's evaluation results (``RUN_DIR/eval_*.json``); [] when there are none."""
    if exported.run_dir is None:
        return []
    rows = []
    for path in sorted(exported.run_dir.glob("eval_*.json")):
        try:
            result = json.loads(path.read_text())
            top1 = float(result["top1"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a broken or foreign file is not a figure
        top5 = result.get("top5")
        test = Path(str(result.get("test_beton", ""))).name or "?"
        evaluated = Path(str(result.get("checkpoint", "")))
        if evaluated.name and evaluated.name != exported.source.name and evaluated.name != "last.pt":
            measured = f"`{evaluated.name}` of this run"  # e.g. a kept epoch_<N>.pt
        elif path.stat().st_mtime < exported.source.stat().st_mtime:
            measured = "an earlier checkpoint of this run"
        else:
            measured = "these weights"
        rows.append(f"| {result.get('protocol', path.stem.removeprefix('eval_'))} | {top1:.2%} | "
                    f"{'' if top5 is None else f'{float(top5):.2%}'} | `{test}` | {measured} |")
    return rows


def _card_facts(exported: ExportedBackbone) -> list[str]:
    """The card's sections on the training data, the evaluations, the licence and the citation."""
    rows = _evaluations(exported)
    results = (["| protocol | top-1 | top-5 | test set | measured on |", "|---|---|---|---|---|", *rows] if rows else
               ["No evaluation of this run was found (`eval_*.json` in its run directory): run `eval/knn.py` "
                "or `eval/linear.py` on it, then export again."])
    return [
        "## Training data", "", _training_data(exported), "",
        "## Evaluation", "", *results, "",
        "## Licence", "",
        f"MIT (`license: {LICENSE_ID}`), as the code that trained it. The training data keeps its own terms.", "",
        "## Citation", "", "```bibtex", "@misc{simmer,", f"  title  = {{{PAPER_TITLE}}},",
        f"  author = {{{PAPER_AUTHORS}}},", f"  note   = {{{PAPER_NOTE}}},", "}", "```", ""]


def model_card(exported: ExportedBackbone, config: dict, repo: str | None = None) -> str:
    """``README.md`` of the export: what it is, the code that loads it, its training data, the run's
    evaluation results, the licence and the citation."""
    where = f"hf-hub:{repo}" if repo else "local-dir:DIR"
    weights = (f'hf_hub_download("{repo}", "{WEIGHTS_NAME}")' if repo else f'"DIR/{WEIGHTS_NAME}"')
    lines = _stem_lines(exported)
    if exported.cifar_stem:
        code = "\n".join([
            "import timm",
            "from torch import nn" + ("\nfrom huggingface_hub import hf_hub_download" if repo else ""),
            f'backbone = timm.create_model("{where}")  # {config["architecture"]}, num_classes=0; random weights',
            f"{lines[0]}  # the CIFAR stem",
            f"timm.models.load_checkpoint(backbone, {weights})",
            "backbone.eval()"])
        note = (f"Trained with the CIFAR stem ({lines[1]}). timm has no argument for it, "
                "so `pretrained=True` alone does not give this network: it stops with a size mismatch on a "
                "single-conv stem, and on a deep stem (whose first conv keeps its shape) it loads without error "
                "into timm's stride-2 stem with max-pool. Swap the stem, then load.")
    elif lines:
        code = "\n".join(["import timm", "from torch import nn",
                          f'backbone = timm.create_model("{where}", pretrained=True).eval()',
                          f"{lines[0]}  # no stem max-pool; it holds no weights"])
        note = ("Trained without the stem's max-pool. timm has no argument for it: `pretrained=True` loads the "
                "weights without error but keeps the max-pool, so remove it after loading.")
    else:
        code = f'import timm\nbackbone = timm.create_model("{where}", pretrained=True).eval()'
        note = "The architecture is timm's own: `pretrained=True` loads the weights."
    pretrained = config["pretrained_cfg"]
    return "\n".join([
        "---", "library_name: timm", f"license: {LICENSE_ID}", "tags:", "- image-feature-extraction", "- timm", "- self-supervised", "---",
        f"# {config['architecture']} backbone, SimMER self-supervised pretraining", "",
        f"Pooled features of {config['num_features']} dimensions (`num_classes=0`) from epoch {exported.epoch} "
        f"of a SimMER run. Input: RGB {pretrained['input_size'][1]}x{pretrained['input_size'][2]} scaled to [0, 1], "
        f"normalised with mean {pretrained['mean']} and std {pretrained['std']} "
        "(`timm.data.resolve_data_config(model=backbone)` returns them).", "",
        note + ("" if repo else " `DIR` is this folder."), "", "```python", code, "features = backbone(images)  # (N, 3, H, W) normalised -> (N, "
        f"{config['num_features']})", "```", "", *_card_facts(exported)])


def export_backbone(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                    image_size: int | None = None, repo: str | None = None) -> dict:
    """Writes ``model.safetensors``, ``config.json`` and ``README.md`` of the run's backbone into ``out``.

    ``out`` defaults to ``RUN_DIR/export``. Everything is read and checked before the first write;
    each file is written atomically. Returns a summary (paths, architecture, stem, epoch).

    Raises:
        ExportError: see :func:`read_run`; ``out`` is a file or cannot be written.
    """
    check_names(run_dir, "RUN_DIR")
    out = Path(out) if out is not None else Path(run_dir) / "export"
    check_names(out, "--out")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: name a folder")
    exported = read_run(run_dir, image_size)
    config = hub_config(exported)
    state = backbone_state(exported.backbone)
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / WEIGHTS_NAME, lambda handle: handle.write(safetensors.torch.save(state)))
        atomic_write(out / CONFIG_NAME, lambda handle: handle.write(json.dumps(config, indent=2) + "\n"), binary=False)
        atomic_write(out / CARD_NAME, lambda handle: handle.write(model_card(exported, config, repo)), binary=False)
    except OSError as error:
        raise ExportError(f"cannot write the export to {out}: {error.strerror or error}") from None
    stem = ("CIFAR stem" if exported.cifar_stem else "timm stem") + (", no max-pool" if exported.maxpool is False else "")
    print(f"exported {exported.arch} ({stem}, {exported.image_size} px, {exported.preset} mean/std, "
          f"epoch {exported.epoch}, from {exported.source}) -> {out}/{WEIGHTS_NAME}, {CONFIG_NAME}", flush=True)
    return dict(out=str(out), weights=str(out / WEIGHTS_NAME), config=str(out / CONFIG_NAME), arch=exported.arch,
                cifar_stem=exported.cifar_stem, image_size=exported.image_size, epoch=exported.epoch,
                source=str(exported.source))


def load_exported(folder: str | os.PathLike) -> nn.Module:
    """The backbone of an export (a folder written by :func:`export_backbone`), in eval mode on CPU.

    ``timm.create_model("local-dir:FOLDER")`` builds the architecture from ``config.json``
    (``num_classes=0``; ``pretrained_cfg`` carries the input size and mean/std), the CIFAR stem and
    the max-pool follow its ``simmer`` block, then ``model.safetensors`` is loaded strictly.
    (N, 3, H, W) normalised -> (N, F).

    Raises:
        FileNotFoundError: ``folder`` lacks ``config.json`` or ``model.safetensors``.
        RuntimeError: the weights do not fit the architecture.
    """
    folder = Path(folder).resolve()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: is {folder} an export of train/export.py?")
    config = json.loads((folder / CONFIG_NAME).read_text())
    simmer = config.get("simmer", {})
    backbone = timm.create_model(f"local-dir:{folder}")
    pool = getattr(backbone, "maxpool", None)
    if simmer.get("cifar_stem"):
        apply_cifar_stem(backbone)
    if simmer.get("maxpool") is not None and pool is not None:
        backbone.maxpool = pool if simmer["maxpool"] else nn.Identity()
    backbone.load_state_dict(safetensors.torch.load_file(folder / WEIGHTS_NAME))
    return backbone.eval()


def _hub_token() -> str:
    """The Hugging Face token, or one clear error before any work."""
    import huggingface_hub

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ExportError("--push_to_hub needs the network, but HF_HUB_OFFLINE is set")
    token = huggingface_hub.get_token()
    if not token:
        raise ExportError("--push_to_hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def push_folder(folder: str | os.PathLike, repo: str, token: str) -> str:
    """Uploads the export ``folder`` to the Hub model repository ``repo`` (created if missing); returns its URL.

    Not exercised by the offline tests. Any failure (no network, a refused token, a bad name) becomes
    one :class:`ExportError` line; the local export stays complete.
    """
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token, library_name="timm", library_version=timm.__version__)
        repo_id = api.create_repo(repo, exist_ok=True).repo_id
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Add SimMER backbone")
    except Exception as error:  # noqa: BLE001 - network, HTTP and validation errors of huggingface_hub
        first = (str(error).strip().splitlines() or [""])[0]
        raise ExportError(f"cannot push {folder} to the Hub repository {repo!r} ({error.__class__.__name__}: "
                          f"{first}); the local export is complete") from None
    url = f"https://huggingface.co/{repo_id}"
    print(f"pushed {folder} -> {url}", flush=True)
    return url


def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a pretraining run directory (checkpoints/last.pt, or backbone.pt + config.yaml)")
    parser.add_argument("--out", default=None, help="folder to write (default: RUN_DIR/export)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="training image side; only when the run used cfg.image_size=0 and its beton is gone "
                             "(a size that contradicts the run's is refused)")
    parser.add_argument("--push_to_hub", metavar="REPO", default=None,
                        help="also upload the folder to this Hugging Face Hub model repo (needs the network and a "
                             "token, HF_TOKEN or `hf auth login`; not covered by the offline tests)")
    args = parser.parse_args(argv)
    token = _hub_token() if args.push_to_hub else None
    summary = export_backbone(args.run_dir, args.out, args.image_size, repo=args.push_to_hub)
    if args.push_to_hub:
        summary["url"] = push_folder(summary["out"], args.push_to_hub, token)
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
