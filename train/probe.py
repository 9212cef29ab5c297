"""The online linear probe: a classifier trained during pretraining on detached backbone features.

As in solo-learn and lightly: each step, the backbone features of the first view (already computed
by the encoder's forward, so the probe costs one small Linear) train a linear classifier with its
own Adam; the features are detached, so the encoder's gradients never see the probe. Its train
top-1 is counted on the device during the epoch (no host sync) and logged every epoch; its test
top-1 is measured on the kNN monitor's test features, at the kNN cadence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OnlineProbe(nn.Module):
    """Linear classifier (F -> classes) with its own optimiser; :meth:`update` is one training step."""

    def __init__(self, num_features: int, num_classes: int, lr: float = 1e-3,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        # zeros, made on the device, and no draw from the global RNG: the run is the same with or without a probe
        self.head = nn.Linear(num_features, num_classes, device="meta")
        self.head.weight = nn.Parameter(torch.zeros(num_classes, num_features, device=device))
        self.head.bias = nn.Parameter(torch.zeros(num_classes, device=device))
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr, fused=True)  # its step count stays on the device
        self.correct = None  # (1,) correct training predictions since :meth:`reset`, on the device
        self.seen = 0

    def reset(self) -> None:
        self.correct, self.seen = None, 0

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """One step on ``features`` (B, F), detached here, and ``labels`` (B,) int64."""
        with torch.autocast(features.device.type, enabled=False):
            logits = self.head(features.detach().float())
            loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        correct = (logits.detach().argmax(1) == labels).sum()
        self.correct = correct if self.correct is None else self.correct + correct
        self.seen += len(labels)

    def train_top1(self) -> float | None:
        """Training top-1 since :meth:`reset` (one host sync), or None before any step."""
        return None if self.correct is None else self.correct.item() / max(1, self.seen)

    @torch.no_grad()
    def top1(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 on held-out ``features`` (N, F) and ``labels`` (N,)."""
        return (self.head(features.float()).argmax(1) == labels).float().mean().item()

    def state(self) -> dict:
        """The head, its optimiser and the epoch's counts so far (a mid-epoch checkpoint carries them on)."""
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "correct": None if self.correct is None else int(self.correct.item()), "seen": self.seen}

    def load(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        correct = state.get("correct")  # absent in older checkpoints
        self.correct = None if correct is None else torch.tensor(correct, device=self.head.weight.device)
        self.seen = int(state.get("seen", 0))
