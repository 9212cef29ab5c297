"""The SimMER loss: total variance + entropy + rank, as pure functions.

Paper: "SimMER: Simple Maximization of Entropy and Rank for Self-supervised Representation
Learning" (§2, equations 2, 5, 8, 9, 13, 14, 15), with the typos fixed as in SPEC §1.

For a batch of B images with K views each, ``z`` has shape (K, B, D) (view-major: view k of
image b is ``z[k, b]``) and ``zbar = z.mean(0)`` of shape (B, D) is the view-averaged
representation. No normalisation is applied to z.

    L_TV = ((z - zbar) ** 2).mean()                             mean over k, b and d
    L_H  = -(1/B) Σ_b log min_{i≠b} ‖zbar_b − zbar_i‖₂          Kozachenko–Leonenko, no constants
    L_R  = one of
           tlsm               −σ_min(Zbar)
           nuclear            −Σ σ_i                            (default)
           nuclear_spectral   −(1/min(B, D)) · Σσ / σ_max
           nuclear_frobenius  −(1/min(B, D)) · (Σσ / ‖Zbar‖_F)²
           optionally on [Zbar, 1] (a bias column, shape (B, D+1)) instead of Zbar
    L    = L_TV + α_H · L_H + α_R · L_R

Usage::

    from train.loss import simmer_loss
    z = projector(backbone(views)).view(K, B, -1)      # (K, B, D)
    total, parts = simmer_loss(z, alpha_h=0.1, alpha_r=2e-4, rank_variant="nuclear")
    total.backward()                                    # parts: {"tv", "entropy", "rank"}

    compiled = torch.compile(simmer_loss)               # works with fullgraph=True too

Numerics: the loss is computed in float32 (float64 input stays float64) with autocast
disabled, since SVD has no half-precision kernel on CUDA. Nearest neighbours are found without
gradient and the distance to the chosen neighbour is recomputed directly with a small floor, so
duplicate rows give a finite loss and finite gradients. Singular values come from
``torch.linalg.svdvals``, whose backward is stable for repeated or zero singular values.

Distributed: see :func:`simmer_loss`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = [
    "RANK_VARIANTS",
    "effective_rank",
    "entropy_loss",
    "nearest_neighbour_distance",
    "rank_loss",
    "simmer_loss",
    "total_variance",
]

RANK_VARIANTS: tuple[str, ...] = ("tlsm", "nuclear", "nuclear_spectral", "nuclear_frobenius")

# Floor on squared nearest-neighbour distances: log(d) = 0.5 * log(d² + eps).
_DIST2_EPS = 1e-8
# Floor on the normalising denominators of the normalised nuclear-norm variants.
_NORM_EPS = 1e-12


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Cast half/bfloat16 (and integer) tensors to float32; keep float32 and float64 as they are."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def _check_rank_variant(variant: str) -> None:
    if variant not in RANK_VARIANTS:
        raise ValueError(
            f"unknown rank variant {variant!r}; expected one of {', '.join(RANK_VARIANTS)}"
        )


def _check_views(z: torch.Tensor) -> None:
    """Raise ValueError unless z is a (K, B, D) tensor with K >= 2, B >= 2, D >= 1."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor of shape (K, B, D), got {type(z).__name__}")
    if z.dim() != 3:
        raise ValueError(
            "z must have shape (K views, B images, D dims), a 3-D tensor; "
            f"got a {z.dim()}-D tensor of shape {tuple(z.shape)}"
        )
    K, B, D = z.shape
    if K < 2 or B < 2 or D < 1:
        raise ValueError(
            "z must have shape (K, B, D) with K >= 2 views, B >= 2 images and D >= 1 dims; "
            f"got shape {tuple(z.shape)} (K={K}, B={B}, D={D})"
        )


def _check_batch(zbar: torch.Tensor, name: str = "zbar") -> None:
    if zbar.dim() != 2 or zbar.shape[0] < 2 or zbar.shape[1] < 1:
        raise ValueError(
            f"{name} must have shape (B, D) with B >= 2 and D >= 1; got shape {tuple(zbar.shape)}"
        )


def _nearest_neighbour_index(zbar: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row, found without gradient.

    zbar: (B, D) -> (B,) int64. Squared distances via the Gram expansion on centred rows (the
    centring reduces cancellation); the diagonal is masked to +inf. Only the choice of
    neighbour comes from here, never a distance that is differentiated.
    """
    with torch.no_grad():
        x = zbar.detach()
        x = x - x.mean(0, keepdim=True)
        sq = (x * x).sum(1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
        eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
        d2 = d2.masked_fill(eye, math.inf)
        return d2.argmin(1)


def _nearest_neighbour_dist2(zbar: torch.Tensor) -> torch.Tensor:
    """Differentiable squared distance from each row to its nearest other row: (B, D) -> (B,)."""
    idx = _nearest_neighbour_index(zbar)
    return (zbar - zbar[idx]).pow(2).sum(-1)


def total_variance(z: torch.Tensor) -> torch.Tensor:
    """Total variance across views, ``((z - z.mean(0)) ** 2).mean()`` (paper eq. 2).

    z: (K, B, D) -> scalar. The mean runs over views, images and dims (SPEC §1).
    """
    _check_views(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _upcast(z)
        return (z - z.mean(0, keepdim=True)).pow(2).mean()


def entropy_loss(zbar: torch.Tensor, eps: float = _DIST2_EPS) -> torch.Tensor:
    """Kozachenko–Leonenko entropy loss without constants (paper eq. 5).

    zbar: (B, D) -> scalar, ``-(1/B) Σ_b log min_{i≠b} ‖zbar_b − zbar_i‖₂``.

    Each nearest neighbour is chosen without gradient; ``log d`` is computed as
    ``0.5 * log(d² + eps)`` from the directly recomputed squared distance, so coinciding rows
    give a finite value (``-0.5 * log(eps)``) and a zero, finite gradient.
    """
    _check_batch(zbar)
    with torch.autocast(device_type=zbar.device.type, enabled=False):
        zbar = _upcast(zbar)
        return -0.5 * torch.log(_nearest_neighbour_dist2(zbar) + eps).mean()


def rank_loss(zbar: torch.Tensor, variant: str = "nuclear", bias: bool = False) -> torch.Tensor:
    """Rank (linear-independence) loss on the singular values of zbar (paper eqs. 8, 9, 13, 14).

    zbar: (B, D) -> scalar. With ``bias=True`` the matrix is ``[zbar, 1]`` of shape (B, D+1),
    and ``m = min(B, D+1)`` below. Otherwise ``m = min(B, D)``; σ are its m singular values.

    - ``tlsm``: ``-σ_min``
    - ``nuclear``: ``-Σσ``
    - ``nuclear_spectral``: ``-(1/m) Σσ / σ_max``
    - ``nuclear_frobenius``: ``-(1/m) (Σσ / ‖·‖_F)²`` with ``‖·‖_F = sqrt(Σσ²)``

    Raises ValueError for an unknown variant (valid ones: ``RANK_VARIANTS``).
    """
    _check_rank_variant(variant)
    _check_batch(zbar)
    with torch.autocast(device_type=zbar.device.type, enabled=False):
        a = _upcast(zbar)
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        s = torch.linalg.svdvals(a)  # (m,), descending
        m = min(a.shape)
        if variant == "tlsm":
            return -s[-1]
        nuclear = s.sum()
        if variant == "nuclear":
            return -nuclear
        if variant == "nuclear_spectral":
            return -(nuclear / s[0].clamp_min(_NORM_EPS)) / m
        # nuclear_frobenius: ‖A‖_F² = Σσ² = Σ a_ij², taken from the entries directly.
        return -(nuclear.pow(2) / a.pow(2).sum().clamp_min(_NORM_EPS)) / m


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0: (b, D) -> (N·b, D), rank order.

    The backward (a reduce-scatter with SUM) sums each block's gradient over all ranks and hands
    it to the rank that owns the block. Needs the same b on every rank. Uses the functional
    collective that torch 2.14 recommends in place of the deprecated
    ``torch.distributed.nn.functional.all_gather`` (same summed gradient; tested here with gloo).
    """
    from torch.distributed._functional_collectives import all_gather_single

    return all_gather_single(x.contiguous(), 0, dist.group.WORLD)


def simmer_loss(
    z: torch.Tensor,
    alpha_h: float = 0.1,
    alpha_r: float = 2e-4,
    rank_variant: str = "nuclear",
    rank_bias: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SimMER loss ``L_TV + alpha_h · L_H + alpha_r · L_R`` (paper eq. 15).

    Args:
        z: (K, B, D) representations of K views of B images, any float dtype, any device.
        alpha_h: weight of the entropy term.
        alpha_r: weight of the rank term.
        rank_variant: one of ``RANK_VARIANTS`` (see :func:`rank_loss`).
        rank_bias: append a column of ones to zbar in the rank term.

    Returns:
        ``(total, parts)``: ``total`` a scalar; ``parts`` a dict of scalar tensors ``tv``,
        ``entropy``, ``rank`` (the unweighted terms). All are float32 (float64 for float64
        input), computed with autocast disabled.

    Raises:
        ValueError: z is not (K, B, D) with K >= 2, B >= 2, D >= 1, or the variant is unknown.

    Distributed: when ``torch.distributed`` is initialised with world size N > 1, each rank
    passes its local z of shape (K, b, D), the same b on every rank. ``zbar`` is all-gathered
    *with gradient* to (N·b, D) for the entropy and rank terms, which are therefore the same on
    every rank and equal the single-process terms on the full batch B = N·b. ``tv`` stays local
    (the mean over the local elements). So rank r returns ``TV_r + G(zbar_global)`` where
    ``G = alpha_h·L_H + alpha_r·L_R``, and ``mean_r TV_r = TV`` of the full batch.

    Gradients: the gather's backward sums over ranks the gradient each rank's copy of G sends
    to a block of zbar, so rank r's backward gives ``∂TV_r/∂θ + N · (∂G/∂zbar_r)(∂zbar_r/∂θ)``.
    DDP then averages parameter gradients (sum over ranks / N):
    ``(1/N) Σ_r ∂TV_r/∂θ + Σ_r (∂G/∂zbar_r)(∂zbar_r/∂θ) = ∂TV/∂θ + ∂G/∂θ``, exactly the
    single-process gradient on the full batch. The factor N from the summing backward is what
    cancels DDP's 1/N. Likewise the rank-averaged loss value equals the single-process one.
    The non-distributed path makes no distributed calls, so ``torch.compile(fullgraph=True)``
    traces it as one graph.
    """
    _check_rank_variant(rank_variant)
    _check_views(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _upcast(z)
        tv = total_variance(z)
        zbar = z.mean(0)  # (B, D)
        if _world_size() > 1:
            zbar = _all_gather_with_grad(zbar)  # (N·B, D)
        h = entropy_loss(zbar)
        r = rank_loss(zbar, variant=rank_variant, bias=rank_bias)
        total = tv + alpha_h * h + alpha_r * r
    return total, {"tv": tv, "entropy": h, "rank": r}


def effective_rank(zbar: torch.Tensor) -> torch.Tensor:
    """Effective rank ``exp(-Σ p_i log p_i)`` with ``p_i = σ_i / Σσ`` (Roy & Vetterli, 2007).

    zbar: (B, D) -> scalar float32, no gradient. Between 1 and min(B, D); 0 for a zero matrix.
    For logging only; local (not gathered across ranks).
    """
    _check_batch(zbar)
    with torch.no_grad(), torch.autocast(device_type=zbar.device.type, enabled=False):
        s = torch.linalg.svdvals(zbar.detach().float())
        total = s.sum()
        p = s / total.clamp_min(1e-30)
        plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
        return torch.where(total > 0, torch.exp(-plogp.sum()), torch.zeros_like(total))


def nearest_neighbour_distance(zbar: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance from each row of zbar to its nearest other row.

    zbar: (B, D) -> scalar float32, no gradient. For logging only; local (not gathered).
    """
    _check_batch(zbar)
    with torch.no_grad(), torch.autocast(device_type=zbar.device.type, enabled=False):
        return _nearest_neighbour_dist2(zbar.detach().float()).sqrt().mean()
