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

Baselines: the losses of VICReg, Barlow Twins, SimCLR (NT-Xent) and SimSiam, with the same
interface (z of shape (K, B, D) in, ``(total, parts)`` out), end this module; train/methods.py
says which one a run uses.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

if dist.is_available():
    # Imported now, before any process group exists: torch.distributed.nn.functional takes
    # ``group=group.WORLD`` as a default argument, evaluated when it is imported, and
    # _functional_collectives imports it on first use. Imported after init_process_group, it pins
    # the default group for the life of the process: destroy_process_group then cannot free it,
    # and its gloo threads live on into the interpreter's exit, where one dropping a finished
    # collective aborts the process (SIGABRT, "terminate called without an active exception").
    from torch.distributed import _functional_collectives
    from torch.distributed.nn import functional as _nn_functional

from core.choices import DEFAULT_SVD, RANK_VARIANTS, SVD_METHODS, TV_REDUCTIONS
from measure.health import check_embeddings, nearest_neighbour_index
from train.newton_schulz import NORM_EPS, rank_term_newton_schulz

__all__ = [
    "DEFAULT_SVD",
    "RANK_VARIANTS",
    "SVD_METHODS",
    "TV_REDUCTIONS",
    "barlow_twins_loss",
    "entropy_loss",
    "nt_xent_loss",
    "rank_loss",
    "simmer_loss",
    "simsiam_loss",
    "total_variance",
    "vicreg_loss",
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
      Newton–Schulz iteration (13 odd-quintic steps, 14 for float64; see ``train.newton_schulz._NS_STEPS``) gives
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
    gather = getattr(_functional_collectives, "all_gather_single", None)
    if gather is not None:
        return gather(x.contiguous(), 0, dist.group.WORLD)
    return torch.cat(_nn_functional.all_gather(x.contiguous(), group=dist.group.WORLD))


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


def _view_pairs(K: int) -> list[tuple[int, int]]:
    """The unordered view pairs (i, j), i < j: K(K-1)/2 of them."""
    return [(i, j) for i in range(K) for j in range(i + 1, K)]


def _gather_views(z: torch.Tensor) -> torch.Tensor:
    """z (K, b, D) of every rank, concatenated along the batch with gradient: (K, N·b, D)."""
    if _world_size() == 1:
        return z
    K, b, D = z.shape
    gathered = _all_gather_with_grad(z.transpose(0, 1).reshape(b, K * D))  # (N·b, K·D)
    return gathered.reshape(-1, K, D).transpose(0, 1)


def _off_diagonal_sq_sum(c: torch.Tensor) -> torch.Tensor:
    """Σ_{i≠j} c_ij² of square matrices (..., D, D) -> (...)."""
    return c.pow(2).sum((-2, -1)) - torch.diagonal(c, dim1=-2, dim2=-1).pow(2).sum(-1)


def vicreg_loss(
    z: torch.Tensor, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes, Ponce & LeCun, ICLR 2022), as the official code computes it.

    For two views a, b of shape (B, D)::

        invariance = mean((a − b)²)                                   over B and D
        variance   = ½ mean_d relu(1 − sqrt(Var(a)_d + 1e-4)) + the same for b   (unbiased Var)
        covariance = Σ_{i≠j} C(a)_ij² / D + Σ_{i≠j} C(b)_ij² / D,     C = centredᵀ centred / (B − 1)
        total      = sim_weight · invariance + var_weight · variance + cov_weight · covariance

    For K views each term is the mean over the pairs i < j; then invariance is
    ``2K/(K−1) · mean((z − zbar)²)`` (Σ_{i<j} ‖z_i − z_j‖² = K Σ_i ‖z_i − zbar‖²), variance the
    mean of the views' terms and covariance twice the mean of theirs.

    Args:
        z: (K, B, D) representations, any float dtype, any device.

    Returns:
        ``(total, parts)``: parts ``invariance``, ``variance``, ``covariance`` (unweighted), scalars.

    Distributed: the invariance term is local (the mean over ranks is the global one, as the
    official code and simmer's TV); variance and covariance are those of the global batch.
    """
    _check_views(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _upcast(z)
        K = z.shape[0]
        invariance = (2.0 * K / (K - 1)) * total_variance(z)  # the mean over pairs of their squared distance
        z = _gather_views(z)
        n, D = z.shape[1], z.shape[2]
        centred = z - z.mean(1, keepdim=True)  # (K, N, D)
        std = torch.sqrt(centred.pow(2).sum(1) / (n - 1) + 1e-4)  # (K, D)
        variance = torch.relu(1.0 - std).mean()  # mean over views of ½ + ½ per pair
        cov = centred.mT @ centred / (n - 1)  # (K, D, D)
        covariance = 2.0 * (_off_diagonal_sq_sum(cov) / D).mean()
        total = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return total, {"invariance": invariance, "variance": variance, "covariance": covariance}


def barlow_twins_loss(z: torch.Tensor, lambd: float = 0.0051) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Barlow Twins (Zbontar et al., ICML 2021), as the official code computes it.

    Each view is standardised over the batch (biased variance, eps 1e-5: BatchNorm1d without
    affine); for two views a, b the cross-correlation is ``C = aᵀ b / B`` (D, D) and::

        on_diagonal  = Σ_i (1 − C_ii)²
        off_diagonal = Σ_{i≠j} C_ij²
        total        = on_diagonal + lambd · off_diagonal

    For K views each term is the mean over the pairs i < j.

    Args:
        z: (K, B, D) representations, any float dtype, any device.

    Returns:
        ``(total, parts)``: parts ``on_diagonal``, ``off_diagonal`` (unweighted), scalars.

    Distributed: z is gathered, so C is the global batch's (the official code all-reduces C
    after a SyncBatchNorm: the same).
    """
    _check_views(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _gather_views(_upcast(z))
        n = z.shape[1]
        mean = z.mean(1, keepdim=True)
        var = (z - mean).pow(2).mean(1, keepdim=True)
        standard = (z - mean) / torch.sqrt(var + 1e-5)  # (K, N, D)
        on_diagonal, off_diagonal = [], []
        for i, j in _view_pairs(z.shape[0]):
            c = standard[i].mT @ standard[j] / n  # (D, D)
            on_diagonal.append((1.0 - torch.diagonal(c)).pow(2).sum())
            off_diagonal.append(_off_diagonal_sq_sum(c))
        on_diagonal, off_diagonal = torch.stack(on_diagonal).mean(), torch.stack(off_diagonal).mean()
        total = on_diagonal + lambd * off_diagonal
    return total, {"on_diagonal": on_diagonal, "off_diagonal": off_diagonal}


def nt_xent_loss(z: torch.Tensor, temperature: float = 0.5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimCLR's NT-Xent (Chen et al., ICML 2020).

    For two views a, b (B, D), the 2B embeddings ``e = [a; b]`` are L2-normalised and
    ``s_mn = e_m · e_n / temperature``; anchor m's positive p(m) is its other view, the other
    2B − 2 embeddings are its negatives::

        ℓ_m        = −s_{m,p(m)} + log Σ_{n≠m} exp(s_mn)
        positive   = mean_m −s_{m,p(m)}
        logsumexp  = mean_m log Σ_{n≠m} exp(s_mn)
        total      = mean_m ℓ_m = positive + logsumexp

    For K views each term is the mean over the pairs i < j.

    Args:
        z: (K, B, D) representations, any float dtype, any device.

    Returns:
        ``(total, parts)``: parts ``positive``, ``logsumexp``, scalars.

    Distributed: z is gathered, so the negatives are the global batch's.
    """
    _check_views(z)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = _gather_views(_upcast(z))
        n = z.shape[1]
        e = torch.nn.functional.normalize(z, dim=-1)  # (K, N, D)
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
        positive, logsumexp = [], []
        for i, j in _view_pairs(z.shape[0]):
            pair = torch.cat([e[i], e[j]])  # (2N, D)
            s = pair @ pair.mT / temperature
            positive.append(-(e[i] * e[j]).sum(-1).mean() / temperature)  # s_{m,p(m)} is symmetric
            logsumexp.append(torch.logsumexp(s.masked_fill(self_mask, -math.inf), dim=1).mean())
        positive, logsumexp = torch.stack(positive).mean(), torch.stack(logsumexp).mean()
    return positive + logsumexp, {"positive": positive, "logsumexp": logsumexp}


def simsiam_loss(z: torch.Tensor, predictions: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimSiam (Chen & He, CVPR 2021): negative cosine of predictions against stopped targets.

    ``predictions`` p = h(z) come from the predictor MLP (train.model.build_predictor). For two
    views: ``total = ½ D(p_1, sg(z_2)) + ½ D(p_2, sg(z_1))`` with ``D(p, t) = −mean_b cos(p_b, t_b)``
    and sg the stop-gradient; for K views the mean of D(p_i, sg(z_j)) over the ordered pairs
    i ≠ j, i.e. ``−Σ_i p̂_i · (Σ_j ẑ_j − ẑ_i) / (B K (K−1))`` with unit rows p̂, ẑ.

    Args:
        z: (K, B, D) projector outputs (the targets), any float dtype, any device.
        predictions: (K, B, D) predictor outputs.

    Returns:
        ``(total, parts)``: parts ``z_std``, SimSiam's collapse monitor: the per-dimension std over
        the batch of the L2-normalised z, mean over dimensions and views (0 for a collapsed z,
        about 1/sqrt(D) for a spread one). Scalars.

    Distributed: no batch statistics; each rank's loss is its shard's, whose mean over ranks is
    the global batch's.
    """
    _check_views(z)
    if predictions.shape != z.shape:
        raise ValueError(f"predictions must have z's shape {tuple(z.shape)}; got {tuple(predictions.shape)}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        K, B = z.shape[0], z.shape[1]
        target = torch.nn.functional.normalize(_upcast(z).detach(), dim=-1)  # (K, B, D)
        p = torch.nn.functional.normalize(_upcast(predictions), dim=-1)
        others = target.sum(0, keepdim=True) - target  # Σ_{j≠i} ẑ_j
        total = -(p * others).sum() / (B * K * (K - 1))
        z_std = target.std(1).mean()
    return total, {"z_std": z_std}
