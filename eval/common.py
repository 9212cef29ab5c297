"""What every evaluation protocol shares: the encoder to evaluate, its data, and the results file.

``--eval.checkpoint`` is a pretraining checkpoint (its config gives the architecture, the stem,
the image size and the augmentation preset) or ``random``: a randomly initialised encoder of
``--cfg.arch``, the baseline every result is compared with.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from augment import build_eval_transform, resolve_preset
from core.config import DATA_READING, ConfigError
from core.device import resolve_device
from core.io import atomic_write, check_names, folder_problem
from core.schedule import lr_at
from data_prep.loader import BetonLoader, inspect_beton
from measure.knn import check_label_sets
from train.checkpoint import CheckpointError, load_checkpoint, mismatch_summary
from train.model import ENCODER_DEFAULTS, ENCODER_KEYS, build_encoder_from_cfg

EVAL_SECTIONS = ("eval", *(f"cfg.{key}" for key in (*ENCODER_KEYS, "seed")), *DATA_READING)
"""What the protocols read: their own section, the cfg keys of the encoder (for a random one; a
checkpoint brings its own) and the seed, and the beton-reading data.* keys. Pretraining's loss and
optimiser flags and write_beton.py's conversion flags are not theirs (a config file may hold them)."""


@dataclass
class EvalSetup:
    encoder: nn.Module  # SimMEREncoder on the device (its .backbone is what is evaluated)
    arch_cfg: dict  # the architecture settings used
    preset: str  # augmentation preset (cifar / imagenet)
    image_size: int
    device: torch.device
    source: str  # the checkpoint path, or "random"
    run_dir: Path | None
    step: int = 0  # the checkpoint's optimiser step (where its evaluation goes on the run's curves)

    @property
    def backbone(self) -> nn.Module:
        return self.encoder.backbone

    def eval_loader(self, path: str, batch_size: int, num_workers: int = 0) -> BetonLoader:
        return BetonLoader(path, batch_size, train=False, device=self.device, num_workers=num_workers,
                           image_size=self.image_size)

    def eval_transform(self) -> nn.Module:
        return build_eval_transform(self.preset).to(self.device)


def prepare(config: dict, explicit: set[str]) -> EvalSetup:
    """Loads the encoder that ``config['eval']['checkpoint']`` names; validates the betons."""
    evaluation, cfg, data = config["eval"], config["cfg"], config["data"]
    train_info = inspect_beton(data["train_beton"])
    check_label_sets(train_info, inspect_beton(data["test_beton"]))
    device = resolve_device(evaluation["device"], "eval.device")
    source = evaluation["checkpoint"]
    if source == "random":
        arch_cfg, state, run_dir, step = {key: cfg[key] for key in ENCODER_KEYS}, None, None, 0
        torch.manual_seed(cfg["seed"])
    else:
        checkpoint = load_checkpoint(source)
        saved = checkpoint["config"]["cfg"]
        arch_cfg = {key: saved.get(key, ENCODER_DEFAULTS.get(key, cfg[key])) for key in ENCODER_KEYS}
        mismatched = [f"--cfg.{key}={cfg[key]!r} but the checkpoint has {arch_cfg[key]!r}"
                      for key in ENCODER_KEYS if f"cfg.{key}" in explicit and cfg[key] != arch_cfg[key]]
        if mismatched:
            raise CheckpointError(f"{source} does not match the requested architecture: {'; '.join(mismatched)}")
        state = checkpoint["model"]
        run_dir = Path(source).resolve().parent.parent
        step = int(checkpoint.get("step", 0))
    image_size = arch_cfg["image_size"] or (train_info.fixed_size or (0, 0))[0]
    if not image_size:
        raise ConfigError(f"{data['train_beton']} holds images of several sizes: set cfg.image_size")
    preset = resolve_preset(arch_cfg["augment"], image_size)
    import timm
    if not timm.is_model(arch_cfg["arch"]):
        raise ConfigError(f"cfg.arch={arch_cfg['arch']!r} is not a timm model")
    encoder = build_encoder_from_cfg(arch_cfg, image_size)
    if state is not None:
        try:
            encoder.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(f"{source} does not fit a {arch_cfg['arch']} encoder: "
                                  f"{mismatch_summary(error)}") from None
    return EvalSetup(encoder.to(device), arch_cfg, preset, image_size, device, source, run_dir, step)


def batches_per_epoch(images: int, batch_size: int) -> int:
    """Batches of an epoch that uses every image (the last batch may be short)."""
    return -(-images // batch_size)


@dataclass(frozen=True)
class FewSteps:
    """A protocol that gets fewer optimiser steps than it needs, and a smaller batch that gets enough."""

    message: str  # "<protocol> gets only N optimiser steps (E epochs x S batches of B...); fewer than M"
    batch_size: int  # the advised batch
    epochs: int  # the advised epochs
    steps: int  # the steps at the advice


def too_few_steps(protocol: str, images: int, batch_size: int, epochs: int, minimum: int, small_batch: int,
                  steps_per_epoch: Callable[[int, int], int] = batches_per_epoch) -> FewSteps | None:
    """None when ``epochs`` epochs over ``images`` at ``batch_size`` (clamped to ``images``) give at
    least ``minimum`` optimiser steps; else the shortfall and the advice: a batch of at most
    ``small_batch`` (never larger than the one asked for) and enough epochs to reach ``minimum``."""
    if images <= 0:
        return None
    batch = min(batch_size, images)
    per_epoch = steps_per_epoch(images, batch)
    steps = epochs * per_epoch
    if steps >= minimum:
        return None
    clamped = f", the batch clamped to the {images} training images" if batch_size >= images else ""
    batches = "batch" if per_epoch == 1 else "batches"
    epochs_word = "epoch" if epochs == 1 else "epochs"
    message = (f"{protocol} gets only {steps} optimiser steps ({epochs} {epochs_word} x {per_epoch} {batches} of "
               f"{batch}{clamped}); fewer than {minimum}")
    small = min(small_batch, batch)
    small_per_epoch = steps_per_epoch(images, small)
    small_epochs = max(epochs, -(-minimum // max(1, small_per_epoch)))
    return FewSteps(message, small, small_epochs, small_epochs * small_per_epoch)


def classifier_step(optimizer: torch.optim.Optimizer, logits: torch.Tensor, labels: torch.Tensor,
                    step: int, total: int) -> torch.Tensor:
    """One optimiser step of a protocol's classifier: every parameter group's lr set from its
    ``base_lr`` on the cosine schedule (step ``step`` of ``total``), cross-entropy of ``logits`` in
    float32, backward, step. Returns the loss (not synced)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, total, group["base_lr"])
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss


def default_out(setup: EvalSetup, out: str, protocol: str) -> Path:
    """``out`` if given; else ``<run dir>/eval_<protocol>.json`` (``runs/random_<arch>/`` for random).

    Checked before any work: a folder, or a place where no file can be written, is refused.
    """
    folder = setup.run_dir if setup.run_dir is not None else Path("runs") / f"random_{setup.arch_cfg['arch']}"
    path = Path(out) if out else folder / f"eval_{protocol}.json"
    check_names(path, "--eval.out" if out else "the results file")
    if path.is_dir():
        raise ConfigError(f"--eval.out={path} is a folder: name a JSON file")
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"cannot write the results to {path}: {blocking} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as error:
        raise ConfigError(f"cannot write the results to {path}: {error.strerror or error}") from None
    return path


def write_results(path: Path, results: dict, setup: EvalSetup | None = None) -> None:
    """Writes the results JSON atomically and prints the headline.

    When the evaluated checkpoint's run has TensorBoard curves, the accuracies join them
    (``eval/<protocol>_top1``, at the checkpoint's step).
    """
    atomic_write(path, lambda handle: handle.write(json.dumps(results, indent=2) + "\n"), binary=False)
    top5 = f", top-5 {results['top5']:.2%}" if "top5" in results else ""
    print(f"{results['protocol']} ({results['checkpoint']}): top-1 {results['top1']:.2%}{top5} -> {path}", flush=True)
    if setup is not None and setup.run_dir is not None and (setup.run_dir / "tensorboard").is_dir():
        if (problem := folder_problem(setup.run_dir / "tensorboard")) is not None:
            warnings.warn(f"the results are not added to the run's TensorBoard curves: cannot write to "
                          f"{setup.run_dir / 'tensorboard'} ({problem})", stacklevel=2)
            return
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(setup.run_dir / "tensorboard")) as writer:
            for key in ("top1", "top5"):
                if key in results:
                    writer.add_scalar(f"eval/{results['protocol']}_{key}", results[key], setup.step)
