"""Every command-line parameter of the project, declared once (fastargs).

All entry points (`data_prep/write_beton.py`, `train/pretrain.py`, `eval/*.py`, `bench/*.py`)
parse their arguments with :func:`parse_config`, which

* builds a fresh fastargs ``Config`` per call (no process-wide state leaks between runs or tests),
* reads ``-C file.yaml`` files (repeatable) and ``--section.param=value`` flags from ``argv``
  (never from ``sys.argv`` implicitly, never from environment variables),
* rejects keys that no parameter declares (fastargs silently ignores them),
* validates every value and raises :class:`ConfigError` listing what is wrong.

Booleans are ints (0/1): fastargs' ``Param(bool)`` turns ``--x=False`` into ``True``.
Library code never reads this module's config: entry points pass explicit arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Iterable, Sequence

import yaml
from fastargs import Config, Param, Section
from fastargs.validation import And, InRange, OneOf
from fastargs.exceptions import MissingValueError, ValidationError

DATASETS = ("cifar10", "cifar100", "miniimagenet", "folder", "synthetic")
WRITE_MODES = ("raw", "jpg", "smart")
RANK_VARIANTS = ("tlsm", "nuclear", "nuclear_spectral", "nuclear_frobenius")
AUGMENT_PRESETS = ("auto", "cifar", "imagenet")
DEVICES = ("auto", "cpu", "cuda")


class UserError(ValueError):
    """A problem with the user's input (config, files, data): reported as one clear line."""


class ConfigError(UserError):
    """An invalid or unknown configuration value."""


def _declare(config: Config) -> None:
    """Declares every section on ``config``. The only place a parameter is defined."""
    Section("data", "Datasets: writing betons and reading them", config_descriptor=config).params(
        dataset=Param(OneOf(DATASETS), "source to convert (write_beton.py)", default="cifar10"),
        root=Param(str, "raw data location: a folder or an archive; '' = data/raw/<dataset>", default=""),
        out_dir=Param(str, "where write_beton.py puts <dataset>_{train,test}.beton", default="data"),
        download=Param(int, "cifar10/100: download when missing and online (0/1)", default=1),
        shots=Param(int, "also write <dataset>_train_<N>shot.beton with N labelled images per class (0 = no)", default=0),
        seed=Param(int, "seed of the synthetic data and of the N-shot selection", default=0),
        write_mode=Param(OneOf(WRITE_MODES), "storage of images larger than 32 px (<=32 px is always raw)", default="raw"),
        jpeg_quality=Param(And(int, InRange(1, 100)), "JPEG quality for write_mode jpg/smart", default=90),
        max_resolution=Param(int, "folder: bound on the stored longer side (0 = keep)", default=256),
        mini_test_per_class=Param(int, "miniimagenet: test images per class (the rest is train)", default=100),
        synthetic_train=Param(int, "synthetic: training images", default=5000),
        synthetic_test=Param(int, "synthetic: test images", default=1000),
        synthetic_size=Param(int, "synthetic: image side in pixels", default=32),
        num_workers=Param(int, "worker processes for writing and threads for loading (0 = all cores)", default=0),
        train_beton=Param(str, "training beton read by pretraining and evaluation", default="data/cifar10_train.beton"),
        test_beton=Param(str, "test beton read by kNN monitoring and evaluation", default="data/cifar10_test.beton"),
    )
    Section("cfg", "SimMER pretraining (defaults: the paper's CIFAR-10 run)", config_descriptor=config).params(
        K=Param(int, "augmented views per image", default=4),
        batch_size=Param(int, "images per step, global over all processes (each image gives K views)", default=512),
        epochs=Param(int, "training epochs", default=800),
        lr=Param(float, "Adam base learning rate; the used one is lr * batch_size / 256", default=1e-3),
        weight_decay=Param(float, "Adam weight decay", default=1e-6),
        warmup_epochs=Param(float, "linear warm-up before the cosine decay (epochs)", default=0.0),
        alpha_h=Param(float, "weight of the entropy term", default=0.1),
        alpha_r=Param(float, "weight of the rank term", default=2e-4),
        rank_variant=Param(OneOf(RANK_VARIANTS), "rank term: tlsm, nuclear, nuclear_spectral, nuclear_frobenius", default="nuclear"),
        rank_bias=Param(int, "append a column of ones to zbar in the rank term (0/1)", default=0),
        arch=Param(str, "any timm model name (ResNets get the CIFAR stem on images <= 64 px)", default="resnet18"),
        cifar_stem=Param(int, "3x3 stride-1 stem, no max-pool (1/0; -1 = for ResNets on images <= 64 px)", default=-1),
        proj_dim=Param(int, "projector output width D", default=2048),
        proj_layers=Param(int, "projector layers (0 = 2 for ResNet-18/34, 3 otherwise)", default=0),
        proj_hidden=Param(int, "projector hidden width (0 = the backbone's width)", default=0),
        augment=Param(OneOf(AUGMENT_PRESETS), "augmentation recipe: cifar, imagenet (adds blur), auto = by image size", default="auto"),
        image_size=Param(int, "training crop side (0 = the stored image side)", default=0),
        seed=Param(int, "seed of the weights, the data order and the augmentations", default=0),
    )
    Section("run", "Where and how a run executes", config_descriptor=config).params(
        dir=Param(str, "run directory (checkpoints, log.jsonl, config); re-running resumes it", default="runs/cifar10_simmer"),
        device=Param(OneOf(DEVICES), "auto (cuda when available), cpu or cuda", default="auto"),
        compile=Param(int, "torch.compile the model and the loss (0/1; -1 = on for CUDA)", default=-1),
        amp=Param(int, "mixed precision for the encoder (0/1; -1 = on for CUDA): bf16, else fp16 + GradScaler", default=-1),
        knn_every=Param(int, "epochs between kNN evaluations (0 = never; the last epoch always)", default=10),
        knn_k=Param(int, "kNN monitor: neighbours", default=200),
        knn_temperature=Param(float, "kNN monitor: temperature", default=0.1),
        log_every=Param(int, "steps between host syncs for the progress bar and the divergence check", default=20),
        save_every=Param(int, "also keep checkpoints/epoch_<N>.pt every N epochs (0 = only last.pt)", default=0),
        stop_after_epochs=Param(int, "checkpoint and exit after this many epochs in this invocation (0 = run to the end)", default=0),
        steps_per_epoch=Param(int, "stop each epoch after this many steps (0 = the whole beton; for smoke tests)", default=0),
        dry_run=Param(int, "print the resolved config and exit (0/1)", default=0),
        progress=Param(int, "progress bars (0/1)", default=1),
    )
    Section("eval", "Evaluation (eval/knn.py, eval/linear.py, eval/finetune.py)", config_descriptor=config).params(
        checkpoint=Param(str, "a pretraining checkpoint (run_dir/checkpoints/last.pt), or 'random' for a "
                         "randomly initialised encoder of cfg.arch", default="runs/cifar10_simmer/checkpoints/last.pt"),
        out=Param(str, "results JSON ('' = <run dir>/eval_<protocol>.json, runs/random_<arch>/... for random)", default=""),
        device=Param(OneOf(DEVICES), "auto (cuda when available), cpu or cuda", default="auto"),
        batch_size=Param(int, "images per feature-extraction batch", default=512),
        progress=Param(int, "progress bars (0/1)", default=1),
    )
    Section("bench", "bench/throughput.py: stage-by-stage speed against common baselines", config_descriptor=config).params(
        device=Param(OneOf(("cpu", "cuda")), "where to measure", default="cpu"),
        out=Param(str, "JSON file with every figure ('' = runs/bench/throughput_<device>.json)", default=""),
        stages=Param(str, "comma-separated: loader,augment,loss,model,end_to_end", default="loader,augment,loss,model,end_to_end"),
        batch_size=Param(int, "images per batch", default=512),
        K=Param(int, "views per image (the loss is also timed at K=10)", default=4),
        arch=Param(str, "timm model for the model and end-to-end stages", default="resnet18"),
        model_batch=Param(int, "images per step in the model and end-to-end stages (0 = batch_size on cuda, 32 on cpu)", default=0),
        images=Param(int, "synthetic images in the benchmark's beton", default=10000),
        iters=Param(int, "timed iterations per measurement (after warm-up)", default=5),
        workers=Param(int, "loader threads / DataLoader workers (same for ours and the baseline)", default=2),
        device_batches=Param(int, "GPU: also time uint8 batches already on the device, no ffcv needed (0/1)", default=1),
        quick=Param(int, "tiny sizes, for a smoke test of the script itself (0/1)", default=0),
    )
    Section("tables", "bench/paper_tables.py: run the paper's tables and compare", config_descriptor=config).params(
        table=Param(str, "1, 2, 3, 4, 5 or all", default="all"),
        dry_run=Param(int, "list the rows and their commands, run nothing (0/1)", default=0),
        nproc=Param(int, "GPUs per row: >1 runs each pretraining under torchrun", default=1),
        out=Param(str, "markdown table of measured against paper numbers", default="runs/tables/results.md"),
    )
    Section("knn", "Weighted kNN evaluation", config_descriptor=config).params(
        k=Param(int, "neighbours", default=200),
        temperature=Param(float, "temperature of the exp(similarity / t) vote", default=0.1),
    )
    Section("linear", "Linear evaluation (SimSiam protocol: frozen backbone, LARS)", config_descriptor=config).params(
        mode=Param(OneOf(("augment", "cached")), "augment: crop+flip each epoch (the protocol); cached: features "
                   "extracted once without augmentation (fast, a few points lower)", default="augment"),
        epochs=Param(int, "epochs", default=90),
        batch_size=Param(int, "batch size (clamped to the training set's size)", default=4096),
        lr=Param(float, "base learning rate; the used one is lr * batch_size / 256", default=0.1),
        weight_decay=Param(float, "weight decay", default=0.0),
        momentum=Param(float, "LARS momentum", default=0.9),
    )
    Section("finetune", "Semi-supervised fine-tuning (backbone + linear head, SGD)", config_descriptor=config).params(
        epochs=Param(int, "epochs", default=40),
        batch_size=Param(int, "batch size (clamped to the training set's size)", default=512),
        head_lr=Param(float, "base lr of the linear head; used: head_lr * batch_size / 256", default=0.1),
        backbone_lr=Param(float, "base lr of the backbone; used: backbone_lr * batch_size / 256", default=0.001),
        momentum=Param(float, "SGD momentum", default=0.9),
        weight_decay=Param(float, "weight decay", default=0.0),
    )


def new_config() -> Config:
    """A fresh fastargs ``Config`` with every section declared."""
    config = Config()
    _declare(config)
    return config


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def _load_yaml(path: str, known: set[str]) -> dict[str, object]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as handle:
            content = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(content).__name__}")
    flat = _flatten(content)
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(unknown)} (see --help for the valid ones)")
    return flat


def parse_config(argv: Sequence[str] | None, description: str, sections: Iterable[str],
                 explicit: set[str] | None = None) -> dict[str, dict]:
    """Parses ``argv`` (``-C file.yaml`` and ``--section.param=value``) into a nested dict.

    Only the parameters of ``sections`` are accepted and returned. ``argv=None`` reads ``sys.argv``.
    ``explicit``, when given, receives the names (``section.param``) set by a file or a flag.
    Raises :class:`ConfigError` on unknown keys or invalid values; ``--help`` prints every
    parameter with its default and exits 0.
    """
    sections = tuple(sections)
    config = new_config()
    entries = {".".join(path): param for path, param in config.entries.items() if path[0] in sections}

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-C", "--config-file", action="append", default=[], help="a YAML config file (repeatable)")
    lines = []
    for name, param in entries.items():
        parser.add_argument(f"--{name}", dest=name, default=None, help=argparse.SUPPRESS)
        lines.append(f"  --{name:<28} {param.desc} [default: {param.default!r}]")
    parser.epilog = "parameters:\n" + "\n".join(lines)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))

    given: dict[str, object] = {}
    every_key = {".".join(path) for path in config.entries}
    for path in args.config_file:  # a file may hold other entry points' sections too (one file per run)
        given.update({k: v for k, v in _load_yaml(path, every_key).items() if k in entries})
    given.update({name: value for name, value in vars(args).items() if name in entries and value is not None})
    config.collect(given)
    if explicit is not None:
        explicit.update(given)

    errors = config.validate(mode="errordict")
    problems = []
    for path, error in errors.items():
        name = ".".join(path)
        if name not in entries:
            continue
        if isinstance(error, MissingValueError):
            problems.append(f"--{name} is required")
        elif isinstance(error, ValidationError):
            problems.append(f"--{name}={config.content.get(path)!r} is invalid: expected {entries[name].checker.help()}")
    if problems:
        raise ConfigError("; ".join(problems))

    resolved: dict[str, dict] = {section: {} for section in sections}
    for name in entries:
        section, key = name.split(".", 1)
        resolved[section][key] = config[name]
    return resolved


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Runs an entry point: a :class:`UserError` becomes one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug, not a user error: keep the traceback
        traceback.print_exc()
        return 1
    return 0
