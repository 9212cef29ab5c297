"""Every command-line parameter of the project, declared once (fastargs).

All entry points (`data_prep/write_beton.py`, `train/pretrain.py`, `eval/*.py`, `bench/*.py`)
parse their arguments with :func:`parse_config`, which

* builds a fresh fastargs ``Config`` per call (no process-wide state leaks between runs or tests),
* reads ``-C file.yaml`` files (repeatable) and ``--section.param=value`` flags from ``argv``
  (never from ``sys.argv`` implicitly, never from environment variables),
* rejects keys that no parameter declares (fastargs silently ignores them),
* validates every value against the range or choices declared with it (:class:`Int`,
  :class:`Float`, :class:`Choice`: the same rules for flags and YAML, NaN and 4.7-for-an-int
  refused) and raises :class:`ConfigError` listing what is wrong.

Booleans are ints (0/1): fastargs' ``Param(bool)`` turns ``--x=False`` into ``True``. Checks that
involve several parameters or files stay with each tool (e.g. ``train.trainer.validate_config``).
Library code never reads this module's config: entry points pass explicit arguments.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import traceback
from typing import Callable, Iterable, Sequence

import yaml
from fastargs import Config, Param, Section
from fastargs.exceptions import MissingValueError, ValidationError
from fastargs.validation import Checker

from core.choices import DEFAULT_SVD, METHODS, RANK_VARIANTS, SVD_METHODS, TV_REDUCTIONS

DATASETS = ("cifar10", "cifar100", "miniimagenet", "folder", "synthetic")
WRITE_MODES = ("raw", "jpg", "smart")
AUGMENT_PRESETS = ("auto", "cifar", "imagenet")
DEVICES = ("auto", "cpu", "cuda")
DATA_READING = ("data.train_beton", "data.test_beton", "data.num_workers")  # the data.* keys of tools that read betons


class Int(Checker):
    """An integer within ``[low, high]``. Flags and YAML follow one rule: ``4``, ``"4"`` pass; ``4.7``,
    ``"4.7"``, ``nan`` and booleans are refused (``int(4.7)`` would silently give 4)."""

    def __init__(self, low: int | None = None, high: int | None = None) -> None:
        self.low, self.high = low, high

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(value)
        number = int(value)
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise ValueError(value)
        return number

    def help(self) -> str:
        if self.low is not None and self.high is not None:
            return "0 or 1" if (self.low, self.high) == (0, 1) else f"an integer from {self.low} to {self.high}"
        return "an integer" + (f" >= {self.low}" if self.low is not None else "") + (
            f" <= {self.high}" if self.high is not None else "")


def Flag() -> Int:  # noqa: N802 - a checker, named like the others
    """0 or 1 (fastargs' bool would read ``--x=False`` as True)."""
    return Int(0, 1)


class Float(Checker):
    """A finite number above ``low`` (or at it, unless ``above``) and below ``below`` when given."""

    def __init__(self, low: float | None = None, above: bool = False, below: float | None = None) -> None:
        self.low, self.above, self.below = low, above, below

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(value)
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(value)
        if self.low is not None and (number < self.low or (self.above and number == self.low)):
            raise ValueError(value)
        if self.below is not None and number >= self.below:
            raise ValueError(value)
        return number

    def help(self) -> str:
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.above else '>='} {self.low:g}")
        if self.below is not None:
            bounds.append(f"< {self.below:g}")
        return "a finite number" + (" " + " and ".join(bounds) if bounds else "")


class Choice(Checker):
    """One of ``values`` (listed in their order in messages)."""

    def __init__(self, values: Sequence[str]) -> None:
        self.values = tuple(values)

    def check(self, value):
        if value not in self.values:
            raise ValueError(value)
        return value

    def help(self) -> str:
        return "one of " + ", ".join(self.values)


class Text(Checker):
    """A string; with ``empty=False`` a blank one is refused (for names and paths where '' means nothing)."""

    def __init__(self, empty: bool = True) -> None:
        self.empty = empty

    def check(self, value):
        if not isinstance(value, str):
            raise TypeError(value)
        if not self.empty and not value.strip():
            raise ValueError(value)
        return value

    def help(self) -> str:
        return "a string" if self.empty else "a non-empty string"


class UserError(ValueError):
    """A problem with the user's input (config, files, data): reported as one clear line."""


class ConfigError(UserError):
    """An invalid or unknown configuration value."""


def _declare(config: Config) -> None:
    """Declares every section on ``config``. The only place a parameter is defined."""
    Section("data", "Datasets: writing betons and reading them", config_descriptor=config).params(
        dataset=Param(Choice(DATASETS), "source to convert (write_beton.py)", default="cifar10"),
        root=Param(Text(), "raw data location: a folder or an archive; '' = data/raw/<dataset>", default=""),
        out_dir=Param(Text(empty=False), "where write_beton.py puts <dataset>_{train,test}.beton", default="data"),
        download=Param(Flag(), "cifar10/100: download when missing and online (0/1)", default=1),
        shots=Param(Int(0), "also write <dataset>_train_<N>shot.beton with N labelled images per class (0 = no)", default=0),
        shots_file=Param(Text(), "also write <dataset>_train_<file stem>.beton with the training images this file names "
                         "(one index or file name per line; README 'Fixed labelled splits')", default=""),
        seed=Param(Int(0), "seed of the synthetic data and of the N-shot selection", default=0),
        write_mode=Param(Choice(WRITE_MODES), "storage of images larger than 32 px (<=32 px is always raw)", default="raw"),
        jpeg_quality=Param(Int(1, 100), "JPEG quality for write_mode jpg/smart", default=90),
        unlabelled=Param(Flag(), "folder: every image unlabelled (label -1), class folders or not; train split only",
                         default=0),
        file_list=Param(Text(), "folder: a text file naming one image per line, written as an unlabelled train split",
                        default=""),
        max_resolution=Param(Int(0), "folder: bound on the stored longer side (0 = keep)", default=256),
        mini_test_per_class=Param(Int(1), "miniimagenet: test images per class (the rest is train)", default=100),
        synthetic_train=Param(Int(1), "synthetic: training images", default=5000),
        synthetic_test=Param(Int(1), "synthetic: test images", default=1000),
        synthetic_size=Param(Int(8), "synthetic: image side in pixels", default=32),
        num_workers=Param(Int(0), "worker processes for writing and threads for loading (0 = all cores)", default=0),
        train_beton=Param(Text(empty=False), "training beton read by pretraining and evaluation", default="data/cifar10_train.beton"),
        test_beton=Param(Text(empty=False), "test beton read by kNN monitoring and evaluation", default="data/cifar10_test.beton"),
    )
    Section("cfg", "SimMER pretraining (defaults: the paper's CIFAR-10 run)", config_descriptor=config).params(
        K=Param(Int(2), "augmented views per image", default=4),
        batch_size=Param(Int(2), "images per step, global over all processes (each image gives K views)", default=512),
        epochs=Param(Int(1), "training epochs", default=800),
        lr=Param(Float(0, above=True), "Adam base learning rate; the used one is lr * batch_size / 256", default=1e-3),
        weight_decay=Param(Float(0), "Adam weight decay", default=1e-6),
        warmup_epochs=Param(Float(0), "linear warm-up before the cosine decay (epochs)", default=0.0),
        method=Param(Choice(METHODS), "the self-supervised loss: simmer, or a baseline in the same pipeline: "
                     "vicreg, barlow_twins, simclr, simsiam (README: Baselines)", default="simmer"),
        alpha_h=Param(Float(0), "weight of the entropy term", default=0.1),
        alpha_r=Param(Float(0), "weight of the rank term", default=2e-4),
        rank_variant=Param(Choice(RANK_VARIANTS), "rank term: tlsm, nuclear, nuclear_spectral, nuclear_frobenius", default="nuclear"),
        svd=Param(Choice(SVD_METHODS), "how the rank term gets singular values: newton_schulz "
                  "(matmuls only, no host sync on GPU), svdvals (exact reference; syncs on CUDA), auto (newton_schulz "
                  "on GPU, svdvals on CPU)", default=DEFAULT_SVD),
        tv_reduction=Param(Choice(TV_REDUCTIONS), "L_TV over the D dims: mean (docs/LOSS.md) or sum (the paper's squared "
                           "norm; = mean with alpha_h, alpha_r divided by D)", default="mean"),
        vicreg_sim=Param(Float(0), "VICReg: weight of the invariance term", default=25.0),
        vicreg_var=Param(Float(0), "VICReg: weight of the variance term", default=25.0),
        vicreg_cov=Param(Float(0), "VICReg: weight of the covariance term", default=1.0),
        barlow_lambda=Param(Float(0), "Barlow Twins: weight of the off-diagonal term", default=0.0051),
        temperature=Param(Float(0, above=True), "SimCLR: temperature of NT-Xent", default=0.5),
        maxpool=Param(Int(-1, 1), "the ResNet stem's max-pool: 1 keep, 0 remove (the paper's Mini-ImageNet ResNet-18), "
                      "-1 = removed with the CIFAR stem, kept otherwise", default=-1),
        rank_bias=Param(Flag(), "append a column of ones to zbar in the rank term (0/1)", default=0),
        arch=Param(Text(empty=False), "any timm model name (ResNets get the CIFAR stem on images <= 64 px)", default="resnet18"),
        cifar_stem=Param(Int(-1, 1), "3x3 stride-1 stem, no max-pool (1/0; -1 = for ResNets on images <= 64 px)", default=-1),
        proj_dim=Param(Int(1), "projector output width D", default=2048),
        proj_layers=Param(Int(0), "projector layers (0 = 2 for ResNet-18/34, 3 otherwise)", default=0),
        proj_hidden=Param(Int(0), "projector hidden width (0 = the backbone's width)", default=0),
        proj_fp32=Param(Flag(), "under AMP, run the projector's last Linear + BatchNorm in float32 so that z reaches "
                        "the loss unrounded (0/1)", default=1),
        augment=Param(Choice(AUGMENT_PRESETS), "augmentation recipe: cifar, imagenet (adds blur), auto = by image size", default="auto"),
        image_size=Param(Int(0), "training crop side (0 = the stored image side)", default=0),
        seed=Param(Int(0), "seed of the weights, the data order and the augmentations", default=0),
    )
    Section("run", "Where and how a run executes", config_descriptor=config).params(
        dir=Param(Text(empty=False), "run directory (checkpoints, log.jsonl, config); re-running resumes it", default="runs/cifar10_simmer"),
        device=Param(Choice(DEVICES), "auto (cuda when available), cpu or cuda", default="auto"),
        compile=Param(Int(-1, 1), "torch.compile the model and the loss (0/1; -1 = on for CUDA)", default=-1),
        amp=Param(Int(-1, 1), "mixed precision for the encoder (0/1; -1 = on for CUDA): bf16, else fp16 + GradScaler", default=-1),
        knn_every=Param(Int(0), "epochs between kNN evaluations (0 = never; the last epoch always)", default=10),
        knn_k=Param(Int(1), "kNN monitor: neighbours", default=200),
        knn_temperature=Param(Float(0, above=True), "kNN monitor: temperature", default=0.1),
        knn_verify=Param(Flag(), "kNN monitor: compare every image's checksum and label it evaluates with the betons "
                         "read on the CPU, and stop on a mismatch (0/1)", default=0),
        log_every=Param(Int(1), "steps between host syncs for the progress bar and the divergence check", default=20),
        save_every=Param(Int(0), "also keep checkpoints/epoch_<N>.pt every N epochs (0 = only last.pt)", default=0),
        stop_after_epochs=Param(Int(0), "checkpoint and exit after this many epochs in this invocation (0 = run to the end)", default=0),
        steps_per_epoch=Param(Int(0), "stop each epoch after this many steps (0 = the whole beton; for smoke tests)", default=0),
        dry_run=Param(Flag(), "print the resolved config and exit (0/1)", default=0),
        progress=Param(Flag(), "progress bars (0/1)", default=1),
        probe=Param(Flag(), "online linear probe on detached backbone features, logged every epoch (0/1)", default=1),
        health_images=Param(Int(0), "held-out images whose embeddings (eval mode) give the health figures every epoch: "
                            "evenly spaced over the test beton (else the training beton); 0 = the last training "
                            "batch's zbar", default=2048),
        logger=Param(Text(empty=False), "live tracking: tensorboard, wandb, both (tensorboard,wandb) or none", default="tensorboard"),
        wandb_project=Param(Text(), "W&B project (with run.logger=wandb); '' = WANDB_PROJECT, else simmer", default=""),
        wandb_mode=Param(Choice(("", "online", "offline", "disabled")), "W&B mode; offline needs no network (wandb sync "
                         "uploads later); '' = WANDB_MODE, else online", default=""),
    )
    Section("eval", "Evaluation (eval/knn.py, eval/linear.py, eval/finetune.py)", config_descriptor=config).params(
        checkpoint=Param(Text(empty=False), "a pretraining checkpoint (run_dir/checkpoints/last.pt), or 'random' for a "
                         "randomly initialised encoder of cfg.arch", default="runs/cifar10_simmer/checkpoints/last.pt"),
        out=Param(Text(), "results JSON ('' = <run dir>/eval_<protocol>.json, runs/random_<arch>/... for random)", default=""),
        device=Param(Choice(DEVICES), "auto (cuda when available), cpu or cuda", default="auto"),
        batch_size=Param(Int(1), "images per feature-extraction batch", default=512),
        progress=Param(Flag(), "progress bars (0/1)", default=1),
    )
    Section("bench", "bench/throughput.py: stage-by-stage speed against common baselines", config_descriptor=config).params(
        device=Param(Choice(("cpu", "cuda")), "where to measure", default="cpu"),
        out=Param(Text(), "JSON file with every figure ('' = runs/bench/throughput_<device>.json)", default=""),
        stages=Param(Text(empty=False), "comma-separated: loader,augment,loss,model,end_to_end", default="loader,augment,loss,model,end_to_end"),
        batch_size=Param(Int(2), "images per batch", default=512),
        K=Param(Int(2), "views per image (the loss is also timed at K=10)", default=4),
        arch=Param(Text(empty=False), "timm model for the model and end-to-end stages", default="resnet18"),
        model_batch=Param(Int(0), "images per step in the model and end-to-end stages (0 = batch_size on cuda, 32 on cpu)", default=0),
        images=Param(Int(1), "synthetic images in the benchmark's beton", default=10000),
        iters=Param(Int(1), "timed iterations per measurement (after warm-up)", default=5),
        workers=Param(Int(1), "loader threads / DataLoader workers (same for ours and the baseline)", default=2),
        device_batches=Param(Flag(), "GPU: also time pretraining's step on uint8 batches already on the device, no loader (0/1)", default=1),
        quick=Param(Flag(), "tiny sizes (QUICK and QUICK_SIZES in bench/throughput.py; flags given keep their values), a smoke test (0/1)", default=0),
    )
    Section("gpu", "bench/gpu_check.py: the real step timed stage by stage, and the paper run it implies",
            config_descriptor=config).params(
        device=Param(Choice(DEVICES), "auto (cuda when available), cpu or cuda", default="auto"),
        out=Param(Text(), "JSON file with every figure ('' = runs/bench/gpu_check_<device>.json)", default=""),
        arch=Param(Text(empty=False), "timm model", default="resnet18"),
        batch_size=Param(Int(2), "images per step", default=512),
        K=Param(Int(2), "views per image", default=4),
        proj_dim=Param(Int(1), "projector output width D", default=2048),
        image_size=Param(Int(8), "image side of the synthetic beton", default=32),
        images=Param(Int(4), "images in the synthetic training beton (the kNN bank)", default=10000),
        steps=Param(Int(1), "timed steps per measurement, after the warm-up", default=20),
        warmup=Param(Int(1), "untimed steps before timing (the first one compiles)", default=3),
        compile=Param(Flag(), "also time the compiled step (0/1)", default=1),
        epochs=Param(Int(1), "epochs of the projected run", default=800),
        train_images=Param(Int(1), "training images per epoch of the projected run (CIFAR-10: 50,000)", default=50000),
        knn_images=Param(Int(1), "bank + query images of one kNN evaluation in the projected run", default=60000),
        knn_every=Param(Int(0), "epochs between kNN evaluations in the projected run", default=10),
        health_images=Param(Int(2), "held-out images of the health figures, timed once per epoch", default=2048),
        log_every=Param(Int(1), "steps between the log's host syncs, timed against none", default=20),
    )
    Section("tables", "bench/paper_tables.py: run the paper's tables and compare", config_descriptor=config).params(
        table=Param(Text(empty=False), "1, 2, 3, 4, 5 or all", default="all"),
        dry_run=Param(Flag(), "list the rows and their commands, run nothing (0/1)", default=0),
        nproc=Param(Int(1), "GPUs per row: >1 runs each pretraining under torchrun", default=1),
        out=Param(Text(empty=False), "markdown table of measured against paper numbers", default="runs/tables/results.md"),
        paper_top1=Param(Float(0), "the paper's top-1 (%) of the row a config reproduces: set in that YAML, "
                         "not as a flag (0 = none)", default=0.0),
    )
    Section("knn", "Weighted kNN evaluation", config_descriptor=config).params(
        k=Param(Int(1), "neighbours", default=200),
        temperature=Param(Float(0, above=True), "temperature of the exp(similarity / t) vote", default=0.1),
    )
    Section("linear", "Linear evaluation (SimSiam protocol: frozen backbone, LARS)", config_descriptor=config).params(
        mode=Param(Choice(("augment", "cached")), "augment: crop+flip each epoch (the protocol); cached: features "
                   "extracted once without augmentation (fast, a few points lower)", default="augment"),
        epochs=Param(Int(1), "epochs", default=90),
        batch_size=Param(Int(1), "batch size (clamped to the training set's size)", default=4096),
        lr=Param(Float(0, above=True), "base learning rate; the used one is lr * batch_size / 256", default=0.1),
        weight_decay=Param(Float(0), "weight decay", default=0.0),
        momentum=Param(Float(0, below=1), "LARS momentum", default=0.9),
    )
    Section("finetune", "Semi-supervised fine-tuning (backbone + linear head, SGD)", config_descriptor=config).params(
        epochs=Param(Int(1), "epochs", default=40),
        batch_size=Param(Int(2), "batch size (clamped to the training set's size)", default=512),
        head_lr=Param(Float(0, above=True), "base lr of the linear head; used: head_lr * batch_size / 256", default=0.1),
        backbone_lr=Param(Float(0), "base lr of the backbone; used: backbone_lr * batch_size / 256", default=0.001),
        momentum=Param(Float(0, below=1), "SGD momentum", default=0.9),
        weight_decay=Param(Float(0), "weight decay", default=0.0),
    )


def new_config() -> Config:
    """A fresh fastargs ``Config`` with every section declared."""
    config = Config()
    _declare(config)
    return config


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """A nested dict as one level, keys joined by dots: ``{"cfg": {"K": 4}}`` -> ``{"cfg.K": 4}``."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: ``line L, column C: problem (context)``."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
    context = getattr(error, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(problem).split()) + (f" ({context})" if context else "")


def _load_yaml(path: str, known: set[str]) -> dict[str, object]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8-sig") as handle:
            content = yaml.safe_load(handle) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(content).__name__}")
    sections = {key.split(".", 1)[0] for key in known}
    flat = {key: value for key, value in flatten(content).items()
            if not (key in sections and value is None)}  # a section whose keys are all commented out
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(unknown)} (see --help for the valid ones)")
    empty = sorted(key for key, value in flat.items() if value is None)
    if empty:
        raise ConfigError(f"{path}: {', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no value (an empty "
                          "value or ~ would not mean the default): give a value or delete the line")
    return flat


class _ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one :class:`ConfigError` line (argparse prints a usage line and exits)."""

    def error(self, message: str):
        raise ConfigError(message)


def argument_parser(description: str | None = None, **options) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for the tools with positional arguments: a mistake is one
    :class:`ConfigError` line (exit 2 under :func:`run_cli`), abbreviated flags are refused."""
    return _ArgumentParser(description=description, allow_abbrev=False, **options)


def _unknown_flags(extra: list[str], names: Iterable[str]) -> str:
    """The message for flags no parameter declares, with the nearest declared name for each."""
    import difflib

    names = [f"--{name}" for name in names]
    parts = []
    for flag in extra:
        name = flag.split("=", 1)[0]
        close = [n for n in names if n.startswith(name)] if name.startswith("--") else []
        close = close or (difflib.get_close_matches(name, names, n=1) if name.startswith("--") else [])
        hint = (f" (did you mean {close[0]}?)" if len(close) == 1 else
                " (a config file goes after -C)" if name.endswith((".yaml", ".yml")) else "")
        parts.append(flag + hint)
    return f"unknown argument(s): {', '.join(parts)}; see --help for the valid ones"


def parse_config(argv: Sequence[str] | None, description: str, sections: Iterable[str],
                 explicit: set[str] | None = None) -> dict[str, dict]:
    """Parses ``argv`` (``-C file.yaml`` and ``--section.param=value``) into a nested dict.

    Only the parameters of ``sections`` (a section's name, or ``section.param`` for one of its
    parameters, e.g. :data:`DATA_READING`) are accepted and returned. ``argv=None`` reads ``sys.argv``.
    ``explicit``, when given, receives the names (``section.param``) set by a file or a flag.
    Raises :class:`ConfigError` on unknown keys or invalid values; ``--help`` prints every
    parameter with its default and exits 0.
    """
    sections = tuple(sections)
    config = new_config()
    entries = {".".join(path): param for path, param in config.entries.items()
               if path[0] in sections or ".".join(path) in sections}

    parser = argument_parser(description, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("-C", "--config-file", action="append", default=[], help="a YAML config file (repeatable)")
    lines = []
    for name, param in entries.items():
        parser.add_argument(f"--{name}", dest=name, default=None, help=argparse.SUPPRESS)
        lines.append(f"  --{name:<28} {param.desc} [default: {param.default!r}]")
    parser.epilog = "parameters:\n" + "\n".join(lines)
    args, extra = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if extra:
        raise ConfigError(_unknown_flags(extra, entries))

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

    resolved: dict[str, dict] = {section.split(".")[0]: {} for section in sections}
    for name in entries:
        section, key = name.split(".", 1)
        resolved[section][key] = config[name]
    return resolved


# OSErrors that say something about the machine or the paths given, which run_cli reports as one line.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM, errno.EROFS,
                       errno.EIO}


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Runs an entry point: a :class:`UserError` becomes one line on stderr and exit status 2.

    So does an ``OSError`` that the machine or a path causes (no space, no permission, a read-only
    file system, a name too long, an I/O error): one line naming the file. Other exceptions are bugs
    and keep their traceback (exit 1).
    """
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # the machine's doing (a full disk, permissions, a name too long), not a bug
        if error.errno not in _ENVIRONMENT_ERRNOS:
            traceback.print_exc()
            return 1
        where = f" {os.fsdecode(error.filename)}" if error.filename else ""
        print(f"error: cannot write or read{where}: {error.strerror}", file=sys.stderr)
        return 2
    except Exception:  # a bug, not a user error: keep the traceback
        traceback.print_exc()
        return 1
    return 0
