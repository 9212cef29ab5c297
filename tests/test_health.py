"""Tests for the collapse indicators of measure/health.py (``health``) on constructed zbar."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from measure.health import COLLAPSE_RANK, COLLAPSE_RANK_DROP, COLLAPSE_RANK_SHARE, COLLAPSE_STD, health


def _with_singular_values(values: list[float], batch: int = 32, seed: int = 0) -> torch.Tensor:
    """A (batch, len(values)) zbar whose singular values are exactly ``values``: Q diag(values) R."""
    gen = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(batch, len(values), generator=gen, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=torch.float64))
    return (left * torch.tensor(values, dtype=torch.float64)) @ right.T


def _entropy_rank(values: list[float]) -> float:
    p = np.asarray(values, dtype=np.float64) / sum(values)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_thresholds_are_the_documented_ones():
    assert (COLLAPSE_RANK, COLLAPSE_RANK_SHARE, COLLAPSE_RANK_DROP, COLLAPSE_STD) == (2.0, 0.02, 0.4, 1e-3)


def test_a_few_dimensions_of_many_are_flagged_from_the_first_epoch():
    """Effective rank ~5 of 2,048 embeddings in 1,024 dims (SimMER without entropy and rank terms
    on real CIFAR-10): collapsed, though no peak was ever higher and the spread is large."""
    gen = torch.Generator().manual_seed(3)
    few = torch.randn(2048, 5, generator=gen) @ torch.randn(5, 1024, generator=gen)
    figures = health(few)
    assert 4.0 < figures["zbar_effective_rank"] < 20.48 and figures["zbar_std"] > 0.5
    assert figures["collapsed"] is True
    many = torch.randn(2048, 40, generator=gen) @ torch.randn(40, 1024, generator=gen)
    assert health(many)["zbar_effective_rank"] > 20.48 and health(many)["collapsed"] is False


def test_rank_one_zbar_is_flagged():
    gen = torch.Generator().manual_seed(1)
    zbar = torch.randn(64, 1, generator=gen) @ torch.randn(1, 16, generator=gen)  # every row on one line
    figures = health(zbar)
    assert figures["zbar_effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert figures["zbar_std"] > 0.1  # spread out, yet collapsed to one dimension
    assert figures["collapsed"] is True


def test_constant_zbar_is_flagged_with_zero_spread():
    zbar = torch.tensor([0.3, -1.2, 2.0, 0.7]).repeat(16, 1)
    figures = health(zbar)
    assert figures["zbar_std"] == pytest.approx(0.0, abs=1e-7)
    assert figures["zbar_nn_distance"] == pytest.approx(0.0, abs=1e-3)
    assert figures["zbar_effective_rank"] == pytest.approx(1.0, abs=1e-3)
    assert figures["collapsed"] is True


def test_random_full_rank_zbar_is_healthy():
    gen = torch.Generator().manual_seed(2)
    zbar = torch.randn(256, 16, generator=gen)
    figures = health(zbar)
    expected_std = zbar.double().numpy().std(axis=0, ddof=1).mean()
    assert figures["zbar_std"] == pytest.approx(expected_std, rel=1e-5)
    assert 14.0 < figures["zbar_effective_rank"] <= 16.0
    assert figures["zbar_nn_distance"] > 0.5
    assert figures["collapsed"] is False
    assert health(zbar, peak_rank=figures["zbar_effective_rank"])["collapsed"] is False  # at its own peak


def test_health_figures_match_hand_computed_values():
    # Singular values 4, 2, 1, 1 -> p = (1/2, 1/4, 1/8, 1/8), entropy 1.75 ln 2, effective rank 2^1.75.
    zbar = _with_singular_values([4.0, 2.0, 1.0, 1.0]).float()
    figures = health(zbar)
    assert figures["zbar_effective_rank"] == pytest.approx(2 ** 1.75, rel=1e-4)
    assert figures["collapsed"] is False
    given = health(zbar, singular_values=torch.tensor([4.0, 2.0, 1.0, 1.0]))  # the spectrum the trainer has
    assert given["zbar_effective_rank"] == pytest.approx(2 ** 1.75, rel=1e-6)
    # Three points (0, 0), (3, 0), (3, 4): nearest-neighbour distances 3, 3, 4.
    points = health(torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]]))
    assert points["zbar_nn_distance"] == pytest.approx(10 / 3, rel=1e-4)
    stds = np.std([[0.0, 0.0], [3.0, 0.0], [3.0, 4.0]], axis=0, ddof=1)
    assert points["zbar_std"] == pytest.approx(stds.mean(), rel=1e-5)


def test_effective_rank_below_two_is_flagged_even_when_spread_out():
    values = [3.0, 1.0]  # p = (3/4, 1/4): effective rank 1.755
    zbar = _with_singular_values(values).float()
    figures = health(zbar)
    assert figures["zbar_effective_rank"] == pytest.approx(_entropy_rank(values), rel=1e-4)
    assert figures["zbar_effective_rank"] < COLLAPSE_RANK and figures["zbar_std"] > COLLAPSE_STD
    assert figures["collapsed"] is True
    healthy = health(_with_singular_values([1.0, 1.0, 1.0]).float())  # effective rank 3
    assert healthy["zbar_effective_rank"] == pytest.approx(3.0, rel=1e-4) and healthy["collapsed"] is False


def test_dropping_below_40_percent_of_the_peak_rank_is_flagged():
    zbar = _with_singular_values([1.0] * 8).float()  # effective rank exactly 8
    rank = health(zbar)["zbar_effective_rank"]
    assert rank == pytest.approx(8.0, rel=1e-4)
    assert health(zbar, peak_rank=0.0)["collapsed"] is False  # no history yet
    assert health(zbar, peak_rank=8.0)["collapsed"] is False
    assert health(zbar, peak_rank=19.0)["collapsed"] is False  # 8 >= 0.4 * 19 = 7.6
    assert health(zbar, peak_rank=21.0)["collapsed"] is True  # 8 < 0.4 * 21 = 8.4
    assert health(zbar, peak_rank=100.0)["collapsed"] is True
    # The figures themselves do not depend on the history.
    flagged = health(zbar, peak_rank=21.0)
    assert flagged["zbar_effective_rank"] == pytest.approx(rank)


def test_tiny_spread_is_flagged_whatever_the_rank():
    gen = torch.Generator().manual_seed(3)
    zbar = 1e-5 * torch.randn(128, 8, generator=gen)  # full rank, but every point within ~1e-5
    figures = health(zbar)
    assert figures["zbar_effective_rank"] > 6.0  # the rank is scale-free: only the spread rule can fire
    assert figures["zbar_std"] < COLLAPSE_STD
    assert figures["collapsed"] is True
    assert health(zbar * 1e3)["collapsed"] is False  # the same points spread 1000 times wider


def test_figures_are_plain_finite_floats():
    gen = torch.Generator().manual_seed(4)
    figures = health(torch.randn(32, 8, generator=gen, dtype=torch.float64).requires_grad_())
    for key in ("zbar_std", "zbar_effective_rank", "zbar_nn_distance"):
        assert isinstance(figures[key], float) and math.isfinite(figures[key]), key
    assert isinstance(figures["collapsed"], bool)
