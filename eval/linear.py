"""Linear evaluation, SimSiam's protocol: frozen backbone, a linear classifier trained with LARS.

    python eval/linear.py --eval.checkpoint=runs/cifar10_simmer/checkpoints/last.pt
    python eval/linear.py --eval.checkpoint=random --cfg.arch=resnet18          # the baseline
    python eval/linear.py --linear.mode=cached ...                              # fast variant

Defaults (README, "Evaluation"): batch 4096, lr 0.1·B/256, weight decay 0, momentum 0.9, cosine, 90 epochs,
LARS (timm's, trust ratio on the weight matrix only, as SimSiam's LARS); the classifier's weights
start N(0, 0.01²), its bias at 0. Training images get RandomResizedCrop + flip (the
augmentation module's ``*_linear`` preset, K=1) every epoch; the backbone runs in eval mode.

``--linear.mode=cached`` extracts the training features once, without augmentation, and trains
on them: minutes instead of hours, usually a few points below the protocol's number. Reports
top-1 and top-5 on the whole test set.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch import nn  # noqa: E402

from augment import build_augmentation  # noqa: E402
from core.config import parse_config, run_cli  # noqa: E402
from core.progress import epoch_line, progress_bar  # noqa: E402
from core.schedule import scaled_lr  # noqa: E402
from data_prep.loader import BetonLoader, inspect_beton  # noqa: E402
from eval.common import (EVAL_SECTIONS, EvalSetup, batches_per_epoch, classifier_step, default_out,  # noqa: E402
                         prepare, write_results)
from eval.common import too_few_steps as common_too_few_steps  # noqa: E402
from measure.features import autocast_context, extract_features  # noqa: E402
from measure.knn import topk_accuracy  # noqa: E402


def new_classifier(num_features: int, num_classes: int) -> nn.Linear:
    """SimSiam's linear head: weights N(0, 0.01²), bias 0."""
    head = nn.Linear(num_features, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head


def lars(head: nn.Linear, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """timm's LARS with the trust ratio on the weight matrix only (not on the bias), as SimSiam's."""
    from timm.optim import Lars

    return Lars([{"params": [head.weight], "always_adapt": True, "base_lr": lr},
                 {"params": [head.bias], "always_adapt": False, "base_lr": lr}],
                lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_on_cached(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, batch_size: int,
                    lr: float, momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                    progress: bool = False) -> nn.Linear:
    """Trains a linear classifier on fixed features (N, F) with LARS and a per-step cosine schedule."""
    generator = torch.Generator().manual_seed(seed)
    head = new_classifier(features.shape[1], num_classes).to(features.device)
    optimizer = lars(head, lr, momentum, weight_decay)
    total, step = epochs * batches_per_epoch(len(features), batch_size), 0
    for epoch in progress_bar(range(epochs), progress, desc="linear (cached)", unit="epoch"):
        order = torch.randperm(len(features), generator=generator).to(features.device)
        for start in range(0, len(features), batch_size):
            index = order[start:start + batch_size]
            loss = classifier_step(optimizer, head(features[index]), labels[index], step, total)
            step += 1
        epoch_line(progress, f"linear (cached) epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return head


def train_with_augmentation(setup: EvalSetup, loader: BetonLoader, num_classes: int, epochs: int, lr: float,
                            momentum: float = 0.9, weight_decay: float = 0.0, progress: bool = False) -> nn.Linear:
    """SimSiam's protocol: each epoch, crop+flip views of the training images through the frozen backbone."""
    augment = build_augmentation(f"{setup.preset}_linear", 1, setup.image_size, flatten=True).to(setup.device)
    backbone = setup.backbone.eval()
    head = new_classifier(setup.encoder.num_features, num_classes).to(setup.device)
    optimizer = lars(head, lr, momentum, weight_decay)
    total, step = epochs * len(loader), 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in progress_bar(loader, progress, desc=f"linear epoch {epoch + 1}/{epochs}", leave=False, unit="batch"):
            with torch.no_grad(), autocast_context(setup.device, setup.device.type == "cuda"):
                features = backbone(augment(batch.images)).float()
            loss = classifier_step(optimizer, head(features), batch.labels, step, total)
            step += 1
        epoch_line(progress, f"linear epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return head


# SimSiam's protocol takes 90 x 13 = 1,170 LARS steps on CIFAR-10 (50,000 images, batch 4,096) and
# 90 x 312 on ImageNet; with a few hundred the cosine schedule is over before the classifier has
# converged, and the accuracy stays near chance (1,437 images: one clamped batch, 90 steps in all).
MIN_STEPS = 500
SMALL_SET_BATCH = 256  # the advice for small sets: cached features, batch 256, base lr 1.0


def too_few_steps(images: int, batch_size: int, epochs: int) -> str | None:
    """The warning when the protocol gets fewer than :data:`MIN_STEPS` optimiser steps, else None.

    ``batch_size`` is the one asked for (it is clamped to ``images``). Both modes use every image
    each epoch (the last batch may be short).
    """
    few = common_too_few_steps("the linear protocol", images, batch_size, epochs, MIN_STEPS, SMALL_SET_BATCH)
    if few is None:
        return None
    return (f"{few.message} usually leave the linear classifier far from converged (SimSiam's protocol takes 1,170 "
            f"on CIFAR-10) and its accuracy near chance. For a set this small use --linear.mode=cached "
            f"--linear.batch_size={few.batch_size} --linear.lr=1.0 --linear.epochs={few.epochs} "
            f"({few.steps} steps; cached features make an epoch cheap)")


def main(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, runs linear evaluation, writes and returns the results."""
    explicit: set[str] = set()
    config = parse_config(argv, __doc__, (*EVAL_SECTIONS, "linear"), explicit)
    evaluation, linear, data = config["eval"], config["linear"], config["data"]
    setup = prepare(config, explicit)
    out = default_out(setup, evaluation["out"], f"linear_{linear['mode']}")  # checked before the work
    show = bool(evaluation["progress"])
    start = time.perf_counter()
    train_info = inspect_beton(data["train_beton"])
    warning = too_few_steps(train_info.num_samples, linear["batch_size"], linear["epochs"])
    if warning:  # said before the work, which it may make pointless
        warnings.warn(warning)
    test_loader = setup.eval_loader(data["test_beton"], evaluation["batch_size"], data["num_workers"])
    transform = setup.eval_transform()
    test_features, test_labels = extract_features(setup.backbone, test_loader, transform, progress=show, desc="test features")
    num_classes = max(train_info.num_classes, int(test_labels.max()) + 1)
    batch_size = min(linear["batch_size"], train_info.num_samples)
    lr = scaled_lr(linear["lr"], batch_size)
    if linear["mode"] == "cached":
        bank_loader = setup.eval_loader(data["train_beton"], evaluation["batch_size"], data["num_workers"])
        features, labels = extract_features(setup.backbone, bank_loader, transform, progress=show, desc="train features")
        head = train_on_cached(features, labels, num_classes, linear["epochs"], batch_size, lr, linear["momentum"],
                               linear["weight_decay"], seed=config["cfg"]["seed"], progress=show)
    else:
        loader = BetonLoader(data["train_beton"], batch_size, train=True, drop_last=False, device=setup.device,
                             num_workers=data["num_workers"], seed=config["cfg"]["seed"], image_size=setup.image_size)
        head = train_with_augmentation(setup, loader, num_classes, linear["epochs"], lr, linear["momentum"],
                                       linear["weight_decay"], progress=show)
    with torch.no_grad():
        accuracy = topk_accuracy(head(test_features), test_labels)
    results = {"protocol": f"linear_{linear['mode']}", **accuracy, "epochs": linear["epochs"], "batch_size": batch_size,
               "lr": lr, "base_lr": linear["lr"], "weight_decay": linear["weight_decay"], "momentum": linear["momentum"],
               "optimizer": "LARS", "checkpoint": setup.source, "arch": setup.arch_cfg["arch"],
               "train_beton": data["train_beton"], "test_beton": data["test_beton"],
               "seconds": time.perf_counter() - start}
    write_results(out, results, setup)
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
