"""Semi-supervised fine-tuning: backbone and linear head trained together on few labels.

    python data_prep/write_beton.py --data.dataset=miniimagenet --data.root=PATH --data.shots=40
    python eval/finetune.py --eval.checkpoint=runs/mini_r18/checkpoints/last.pt \\
        --data.train_beton=data/miniimagenet_train_40shot.beton --data.test_beton=data/miniimagenet_test.beton

Defaults (README, "Evaluation"; paper §3.4): SGD with momentum 0.9, no weight decay, base lr 0.1 for the
head and 0.001 for the backbone, both scaled by B/256, batch 512, 40 epochs, cosine. Training
images get RandomResizedCrop + flip (the augmentation module's ``*_linear`` preset); the
backbone's BatchNorm layers train. Reports top-1 and top-5 on the whole test set.
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
from core.config import ConfigError, parse_config, run_cli  # noqa: E402
from core.progress import epoch_line, progress_bar  # noqa: E402
from core.schedule import scaled_lr  # noqa: E402
from data_prep.loader import BetonLoader, inspect_beton  # noqa: E402
from eval.common import (EVAL_SECTIONS, EvalSetup, batches_per_epoch, classifier_step, default_out,  # noqa: E402
                         prepare, write_results)
from eval.common import too_few_steps as common_too_few_steps  # noqa: E402
from measure.features import autocast_context, extract_features  # noqa: E402
from measure.knn import topk_accuracy  # noqa: E402
from eval.linear import new_classifier  # noqa: E402


def finetune(setup: EvalSetup, loader: BetonLoader, num_classes: int, epochs: int, head_lr: float, backbone_lr: float,
             momentum: float = 0.9, weight_decay: float = 0.0, progress: bool = False) -> nn.Linear:
    """Trains ``setup.backbone`` and a new linear head jointly (SGD, two learning rates, cosine per step)."""
    augment = build_augmentation(f"{setup.preset}_linear", 1, setup.image_size, flatten=True).to(setup.device)
    backbone = setup.backbone.train()
    head = new_classifier(setup.encoder.num_features, num_classes).to(setup.device)
    optimizer = torch.optim.SGD([{"params": backbone.parameters(), "base_lr": backbone_lr},
                                 {"params": head.parameters(), "base_lr": head_lr}],
                                lr=head_lr, momentum=momentum, weight_decay=weight_decay)
    total, step = epochs * steps_per_epoch(loader.num_samples, loader.batch_size), 0
    bar = progress_bar(total=total, enabled=progress, desc="fine-tune", unit="step")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            if len(batch.images) < 2:  # a last batch of one image: BatchNorm cannot train on it
                continue
            views = augment(batch.images)
            with autocast_context(setup.device, setup.device.type == "cuda"):
                logits = head(backbone(views).float())
            loss = classifier_step(optimizer, logits, batch.labels, step, total)
            step += 1
            bar.update(1)
        epoch_line(progress, f"fine-tune epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    bar.close()
    return head


# The paper's 40-shot Mini-ImageNet protocol (4,000 images, batch 512, 40 epochs) takes 8 x 40 = 320
# SGD steps (every image each epoch: the eighth batch has 416); the new head starts from scratch at lr 0.1 x B/256 and needs a few hundred of them.
MIN_STEPS = 200
SMALL_SET_BATCH = 128


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Optimiser steps of a fine-tuning epoch: every batch, the last one short, except a last batch
    of one image (BatchNorm cannot train on one image; :func:`finetune` skips it)."""
    return batches_per_epoch(images, batch_size) - (1 if images % batch_size == 1 else 0)


def too_few_steps(images: int, batch_size: int, epochs: int) -> str | None:
    """The warning when fine-tuning gets fewer than :data:`MIN_STEPS` optimiser steps, else None.

    ``batch_size`` is the one asked for (it is clamped to ``images``; every image is used each
    epoch, the last batch may be short: :func:`steps_per_epoch`).
    """
    few = common_too_few_steps("fine-tuning", images, batch_size, epochs, MIN_STEPS, SMALL_SET_BATCH, steps_per_epoch)
    if few is None:
        return None
    return (f"{few.message} usually leave the new linear head far from converged (the paper's 40-shot protocol "
            f"takes 320). Use a smaller --finetune.batch_size (the learning rates scale with it) or more "
            f"--finetune.epochs, e.g. --finetune.batch_size={few.batch_size} --finetune.epochs={few.epochs} "
            f"({few.steps} steps)")


def main(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, fine-tunes, writes and returns the results."""
    explicit: set[str] = set()
    config = parse_config(argv, __doc__, (*EVAL_SECTIONS, "finetune"), explicit)
    evaluation, tune, data = config["eval"], config["finetune"], config["data"]
    setup = prepare(config, explicit)
    out = default_out(setup, evaluation["out"], "finetune")  # checked before the work
    torch.manual_seed(config["cfg"]["seed"])
    start = time.perf_counter()
    train_info = inspect_beton(data["train_beton"])
    if train_info.num_samples < 2:
        raise ConfigError(f"{data['train_beton']} holds {train_info.num_samples} image(s): fine-tuning trains "
                          "BatchNorm and needs at least 2 labelled images")
    warning = too_few_steps(train_info.num_samples, tune["batch_size"], tune["epochs"])
    if warning:  # said before the work, which it may make pointless
        warnings.warn(warning)
    batch_size = min(tune["batch_size"], train_info.num_samples)
    loader = BetonLoader(data["train_beton"], batch_size, train=True, drop_last=False, device=setup.device,
                         num_workers=data["num_workers"], seed=config["cfg"]["seed"], image_size=setup.image_size)
    test_loader = setup.eval_loader(data["test_beton"], evaluation["batch_size"], data["num_workers"])
    num_classes = max(train_info.num_classes, test_loader.info.num_classes)
    head_lr, backbone_lr = scaled_lr(tune["head_lr"], batch_size), scaled_lr(tune["backbone_lr"], batch_size)
    head = finetune(setup, loader, num_classes, tune["epochs"], head_lr, backbone_lr,
                    tune["momentum"], tune["weight_decay"], progress=bool(evaluation["progress"]))
    features, labels = extract_features(setup.backbone, test_loader, setup.eval_transform(),
                                        progress=bool(evaluation["progress"]), desc="test features")
    with torch.no_grad():
        accuracy = topk_accuracy(head(features), labels)
    results = {"protocol": "finetune", **accuracy, "epochs": tune["epochs"], "batch_size": batch_size,
               "head_lr": head_lr, "backbone_lr": backbone_lr,
               "momentum": tune["momentum"], "weight_decay": tune["weight_decay"], "optimizer": "SGD",
               "labelled_images": train_info.num_samples, "checkpoint": setup.source, "arch": setup.arch_cfg["arch"],
               "train_beton": data["train_beton"], "test_beton": data["test_beton"],
               "seconds": time.perf_counter() - start}
    write_results(out, results, setup)
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
