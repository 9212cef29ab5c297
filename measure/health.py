"""Health figures of embeddings and their collapse thresholds: the one implementation.

The trainer logs them every epoch (on held-out images' embeddings in eval mode, RankMe's
protocol, or on the last training batch's zbar), the report plots them, and the SimMER loss
shares the nearest-neighbour search (:func:`nearest_neighbour_index`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from data_prep.loader import BetonLoader, inspect_beton
from measure.features import feature_batch, read_images

COLLAPSE_RANK = 2.0  # effective rank below this: (dimensional) collapse
COLLAPSE_RANK_SHARE = 0.02  # ... or below this fraction of min(N, D): dimensional collapse from the start
COLLAPSE_RANK_DROP = 0.4  # ... or below this fraction of the run's highest effective rank so far
COLLAPSE_STD = 1e-3  # per-dimension std below this: collapse to a point


def check_embeddings(x: torch.Tensor, name: str = "zbar") -> None:
    """Raises ValueError unless ``x`` is (B, D) with B >= 2 and D >= 1."""
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} must have shape (B, D) with B >= 2 and D >= 1; got shape {tuple(x.shape)}")


def nearest_neighbour_index(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row, found without gradient: (B, D) -> (B,) int64.

    Squared distances via the Gram expansion on centred rows (the centring reduces cancellation);
    the diagonal is masked to +inf. Only the choice of neighbour comes from here, never a distance
    that is differentiated.
    """
    with torch.no_grad():
        x = x.detach()
        x = x - x.mean(0, keepdim=True)
        sq = (x * x).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        return d2.masked_fill(eye, math.inf).argmin(1)


def effective_rank(x: torch.Tensor, singular_values: torch.Tensor | None = None) -> torch.Tensor:
    """Effective rank ``exp(-Σ p_i log p_i)`` with ``p_i = σ_i / Σσ`` (Roy & Vetterli, 2007).

    x: (B, D) -> scalar float32, no gradient. Between 1 and min(B, D); 0 for a zero matrix.
    ``singular_values``: x's, when the caller has them (``torch.linalg.svdvals`` in float32).
    For logging only; local (not gathered across ranks).
    """
    check_embeddings(x)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        s = torch.linalg.svdvals(x.detach().float()) if singular_values is None else singular_values.float()
        total = s.sum()
        p = s / total.clamp_min(1e-30)
        plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
        return torch.where(total > 0, torch.exp(-plogp.sum()), torch.zeros_like(total))


def nearest_neighbour_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance from each row of x (B, D) to its nearest other row: scalar float32, no gradient."""
    check_embeddings(x)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        x = x.detach().float()
        return (x - x[nearest_neighbour_index(x)]).pow(2).sum(-1).sqrt().mean()


def health(embeddings: torch.Tensor, peak_rank: float = 0.0,
           singular_values: torch.Tensor | None = None) -> dict[str, float]:
    """Collapse indicators of embeddings (N, D): mean per-dimension std, effective rank, mean NN distance.

    The log keys keep the ``zbar_`` names whatever the embeddings are (held-out images or the
    last training batch). ``collapsed`` is a heuristic: the effective rank is below 2, or below
    2 % of min(N, D) (a few dimensions of many: SimMER without its entropy and rank terms reaches
    this on real CIFAR-10 within an epoch, docs/LOSS.md), or below 40 % of ``peak_rank`` (the
    highest effective rank the run has logged: dimensions are being lost), or the spread is ~0.
    """
    x = embeddings.detach().float()
    figures = {
        "zbar_std": x.std(dim=0).mean().item(),
        "zbar_effective_rank": effective_rank(x, singular_values).item(),
        "zbar_nn_distance": nearest_neighbour_distance(x).item(),
    }
    rank = figures["zbar_effective_rank"]
    figures["collapsed"] = bool(rank < max(COLLAPSE_RANK, COLLAPSE_RANK_SHARE * min(x.shape))
                                or rank < COLLAPSE_RANK_DROP * peak_rank or figures["zbar_std"] < COLLAPSE_STD)
    return figures


def held_out_images(data: dict, count: int, image_size: int, device: torch.device) -> torch.Tensor:
    """The fixed images of the health figures: ``count`` evenly spaced images (all when fewer) of
    ``data['test_beton']``, or of the training beton when there is no test beton; uint8 on ``device``."""
    path = data["test_beton"] if Path(data["test_beton"]).is_file() else data["train_beton"]
    total = inspect_beton(path).num_samples
    chosen = np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(np.int64))
    loader = BetonLoader(path, feature_batch(device, image_size), train=False, device=device,
                         num_workers=data["num_workers"], image_size=image_size, indices=chosen)
    return read_images(loader)[0]
