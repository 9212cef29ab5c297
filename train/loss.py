"""The SimMER loss: total variance + entropy + rank, as pure functions.

Paper: "SimMER: Simple Maximization of Entropy and Rank for Self-supervised Representation
Learning" (§2, equations 2, 5, 8, 9, 13, 14, 15), with the typos fixed as docs/LOSS.md lists them.

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
disabled (SVD has no half-precision kernel on CUDA, and the Newton–Schulz iteration needs
float32 to reach 1e-7). Nearest neighbours are found without
gradient and the distance to the chosen neighbour is recomputed directly with a small floor, so
duplicate rows give a finite loss and finite gradients. The rank term can do without an SVD:
a Newton–Schulz polar factor and repeated squaring, matmuls only, so that a training step on
CUDA never waits for the host (``torch.linalg.svdvals``, kept as ``svd="svdvals"``, reads a
convergence flag back every call); both have gradients that stay finite at repeated or zero
singular values. By default (``svd="auto"``) the GPU takes the Newton–Schulz path and the CPU,
where svdvals is faster, svdvals. See :func:`rank_loss`.

Distributed: see :func:`simmer_loss`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from core.choices import DEFAULT_SVD, RANK_VARIANTS, SVD_METHODS, TV_REDUCTIONS
from measure.health import check_embeddings, nearest_neighbour_index
from train.newton_schulz import NORM_EPS, rank_term_newton_schulz

__all__ = [
    "DEFAULT_SVD",
    "RANK_VARIANTS",
    "SVD_METHODS",
    "TV_REDUCTIONS",
    "entropy_loss",
    "rank_loss",
    "simmer_loss",
    "total_variance",
]

# Floor on squared nearest-neighbour distances: log(d) = 0.5 * log(d² + eps).
_DIST2_EPS = 1e-8


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


def _check_svd(svd: str) -> None:
    if svd not in SVD_METHODS:
        raise ValueError(f"unknown svd method {svd!r}; expected one of {', '.join(SVD_METHODS)}")


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


def _nearest_neighbour_dist2(zbar: torch.Tensor) -> torch.Tensor:
    """Differentiable squared distance from each row to its nearest other row: (B, D) -> (B,)."""
    idx = nearest_neighbour_index(zbar)
    return (zbar - zbar[idx]).pow(2).sum(-1)




def total_variance(z: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Total variance across views (paper eq. 2).

    z: (K, B, D) -> scalar. ``reduction="mean"`` (docs/LOSS.md): ``((z - z.mean(0)) ** 2).mean()``, the
    mean over views, images and dims. ``"sum"`` (the paper's squared L2 norm): summed over the D
    dims, averaged over views and images, so D times the mean; under Adam this equals the mean
    with alpha_h and alpha_r divided by D.
    """
    _check_views(z)
    if reduction not in TV_REDUCTIONS:
        raise ValueError(f"unknown tv reduction {reduction!r}; expected one of {', '.join(TV_REDUCTIONS)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _upcast(z)
        squared = (z - z.mean(0, keepdim=True)).pow(2)
        return squared.mean() if reduction == "mean" else squared.sum(-1).mean()


def entropy_loss(zbar: torch.Tensor, eps: float = _DIST2_EPS) -> torch.Tensor:
    """Kozachenko–Leonenko entropy loss without constants (paper eq. 5).

    zbar: (B, D) -> scalar, ``-(1/B) Σ_b log min_{i≠b} ‖zbar_b − zbar_i‖₂``.

    Each nearest neighbour is chosen without gradient; ``log d`` is computed as
    ``0.5 * log(d² + eps)`` from the directly recomputed squared distance, so coinciding rows
    give a finite value (``-0.5 * log(eps)``) and a zero, finite gradient.
    """
    check_embeddings(zbar)
    with torch.autocast(device_type=zbar.device.type, enabled=False):
        zbar = _upcast(zbar)
        return -0.5 * torch.log(_nearest_neighbour_dist2(zbar) + eps).mean()


def rank_loss(
    zbar: torch.Tensor, variant: str = "nuclear", bias: bool = False, svd: str = DEFAULT_SVD
) -> torch.Tensor:
    """Rank (linear-independence) loss on the singular values of zbar (paper eqs. 8, 9, 13, 14).

    zbar: (B, D) -> scalar. With ``bias=True`` the matrix is ``[zbar, 1]`` of shape (B, D+1),
    and ``m = min(B, D+1)`` below. Otherwise ``m = min(B, D)``; σ are its m singular values.

    - ``tlsm``: ``-σ_min``
    - ``nuclear``: ``-Σσ``
    - ``nuclear_spectral``: ``-(1/m) Σσ / σ_max``
    - ``nuclear_frobenius``: ``-(1/m) (Σσ / ‖·‖_F)²`` with ``‖·‖_F = sqrt(Σσ²)``

    ``svd`` picks how (``SVD_METHODS``):

    - ``"newton_schulz"``: matmuls and elementwise ops only, a fixed number of them,
      so nothing waits for the device (no linalg call, no ``.item()``) and ``torch.compile``
      sees plain matmuls. On the small side (n = m rows, transposing when B > D), a
      Newton–Schulz iteration (13 odd-quintic steps, 14 for float64; see ``_NS_STEPS``) gives
      the polar factor ``Q ≈ U Vᵀ``, and ``Σσ = ⟨Q, A⟩`` with Q held constant, whose gradient
      is Q: the nuclear norm's gradient, finite at repeated and zero singular values (a zero
      σ contributes a zero direction: the minimum-norm subgradient). σ_max and σ_min come from
      the top eigenvector of ``P = A Qᵀ / t = U diag(σ/t) Uᵀ`` (the Gram matrix's square root,
      as accurate as A itself for small σ) or of ``c·I − P``, by 24 repeated squarings (2^24
      power steps); then ``σ = ‖uᵀA‖`` with gradient ``u vᵀ``. Accuracy (float32, against a
      float64 SVD, B=512, D=2048): Σσ within 1e-7 relative, σ_max and a separated σ_min within
      1e-6, gradients within 1e-5; singular values below 1e-6·t (t <= m^(1/8)·σ_max) are
      counted with weight < 1 in Σσ; σ_min of a cluster of singular values that float32
      cannot tell apart (a near-collapsed zbar) is found to about 1e-7·σ_max.
    - ``"svdvals"``: ``torch.linalg.svdvals``, exact to rounding, the reference. On CUDA its
      solver reads a convergence flag back to the host at every call (a sync).
    - ``"auto"`` (default): ``"newton_schulz"`` for a tensor on any device but the CPU,
      ``"svdvals"`` on the CPU (faster there: about 210 ms against 350 ms forward + backward at
      B=512, D=2048 on 2 cores, bench/rank_term.py).

    Raises ValueError for an unknown variant (valid ones: ``RANK_VARIANTS``) or svd method.
    """
    _check_rank_variant(variant)
    _check_svd(svd)
    check_embeddings(zbar)
    with torch.autocast(device_type=zbar.device.type, enabled=False):
        a = _upcast(zbar)
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        if svd == "auto":
            svd = "svdvals" if a.device.type == "cpu" else "newton_schulz"
        if svd == "newton_schulz":
            return rank_term_newton_schulz(a, variant)
        s = torch.linalg.svdvals(a)  # (m,), descending
        m = min(a.shape)
        if variant == "tlsm":
            return -s[-1]
        nuclear = s.sum()
        if variant == "nuclear":
            return -nuclear
        if variant == "nuclear_spectral":
            return -(nuclear / s[0].clamp_min(NORM_EPS)) / m
        # nuclear_frobenius: ‖A‖_F² = Σσ² = Σ a_ij², taken from the entries directly.
        return -(nuclear.pow(2) / a.pow(2).sum().clamp_min(NORM_EPS)) / m


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x from every rank along dim 0: (b, D) -> (N·b, D), rank order.

    The backward (a reduce-scatter with SUM) sums each block's gradient over all ranks and hands
    it to the rank that owns the block. Needs the same b on every rank. The collective is the
    functional ``all_gather_single`` where the installed torch has it (2.14), else
    ``torch.distributed.nn.functional.all_gather`` (torch 2.11, the GPU image's, lacks the former);
    both give the same summed gradient (tested with gloo, with and without the first).
    """
    from torch.distributed import _functional_collectives as functional

    gather = getattr(functional, "all_gather_single", None)
    if gather is not None:
        return gather(x.contiguous(), 0, dist.group.WORLD)
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


def simmer_loss(
    z: torch.Tensor,
    alpha_h: float = 0.1,
    alpha_r: float = 2e-4,
    rank_variant: str = "nuclear",
    rank_bias: bool = False,
    svd: str = DEFAULT_SVD,
    tv_reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The SimMER loss ``L_TV + alpha_h · L_H + alpha_r · L_R`` (paper eq. 15).

    Args:
        z: (K, B, D) representations of K views of B images, any float dtype, any device.
        alpha_h: weight of the entropy term.
        alpha_r: weight of the rank term.
        rank_variant: one of ``RANK_VARIANTS`` (see :func:`rank_loss`).
        rank_bias: append a column of ones to zbar in the rank term.
        svd: how the rank term gets its singular values, one of ``SVD_METHODS``:
            ``"newton_schulz"`` (matmuls only, no host sync), ``"svdvals"`` (the exact
            reference) or ``"auto"`` (the first on a GPU, the second on the CPU); see
            :func:`rank_loss`.
        tv_reduction: ``"mean"`` or ``"sum"`` over the D dims of L_TV (:func:`total_variance`).

    Returns:
        ``(total, parts)``: ``total`` a scalar; ``parts`` a dict of scalar tensors ``tv``,
        ``entropy``, ``rank`` (the unweighted terms). All are float32 (float64 for float64
        input), computed with autocast disabled.

    Raises:
        ValueError: z is not (K, B, D) with K >= 2, B >= 2, D >= 1, or the variant or svd
            method is unknown.

    Distributed: under ``torch.distributed`` (world size N > 1) each rank passes its local z
    (K, b, D); zbar is all-gathered *with gradient*, so the entropy and rank terms are those of
    the global batch N·b and, after DDP's gradient averaging, the gradient equals the
    single-process one on the full batch (the derivation: docs/LOSS.md). ``tv`` stays local.
    The non-distributed path makes no distributed calls, so ``torch.compile(fullgraph=True)``
    traces it as one graph.
    """
    _check_rank_variant(rank_variant)
    _check_svd(svd)
    _check_views(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _upcast(z)
        tv = total_variance(z, tv_reduction)
        zbar = z.mean(0)  # (B, D)
        if _world_size() > 1:
            zbar = _all_gather_with_grad(zbar)  # (N·B, D)
        h = entropy_loss(zbar)
        r = rank_loss(zbar, variant=rank_variant, bias=rank_bias, svd=svd)
        total = tv + alpha_h * h + alpha_r * r
    return total, {"tv": tv, "entropy": h, "rank": r}
