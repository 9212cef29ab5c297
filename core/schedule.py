"""The learning-rate schedule shared by pretraining, the linear protocol and fine-tuning."""
from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total_steps``.

    A linear warm-up over ``warmup_steps`` (step 0 gets ``peak_lr / warmup_steps``, the last warm-up
    step ``peak_lr``), then a cosine decay from ``peak_lr`` to 0 at ``total_steps``.
    """
    if warmup_steps and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of every optimiser here: ``base_lr · batch_size / 256``."""
    return base_lr * batch_size / 256
