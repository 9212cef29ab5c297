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

__all__ = [
    "DEFAULT_SVD",
    "RANK_VARIANTS",
    "SVD_METHODS",
    "TV_REDUCTIONS",
    "barlow_twins_loss",
    "effective_rank",
    "entropy_loss",
    "nearest_neighbour_distance",
    "nt_xent_loss",
    "rank_loss",
    "simmer_loss",
    "simsiam_loss",
    "total_variance",
    "vicreg_loss",
]

RANK_VARIANTS: tuple[str, ...] = ("tlsm", "nuclear", "nuclear_spectral", "nuclear_frobenius")

# How the rank term gets its singular values (see rank_loss): "auto" is "newton_schulz" on a GPU
# (no host sync) and "svdvals" on the CPU, where it measured faster (docs/BENCHMARKS.md).
SVD_METHODS: tuple[str, ...] = ("auto", "newton_schulz", "svdvals")
DEFAULT_SVD = "auto"

# Floor on squared nearest-neighbour distances: log(d) = 0.5 * log(d² + eps).
_DIST2_EPS = 1e-8
# Floor on the normalising denominators of the normalised nuclear-norm variants.
_NORM_EPS = 1e-12

# Newton–Schulz steps X <- a·X + (b·M + c·M²)·X with M = X Xᵀ, i.e. σ <- p(σ) = aσ + bσ³ + cσ⁵
# on every singular value at once. Designed offline, one step at a time: for the interval
# [l, u] the singular values can be in (starting from [1e-6, 1]), the odd quintic that minimises
# max |1 - p| over [l, 1.001·u] under the side condition p(x) >= min(x, 1), by a linear
# programme on a fine grid; the next interval is p's range. The side condition keeps every
# singular value from being pushed below where it was (or below 1 once it got there): plain
# minimax steps send σ near u to near 0 and back, which made the float32 polar factor 200 times
# less accurate. After the 13 steps the composed map is within 1e-9 of 1 on [1e-6, 1] and
# increasing below (0.4 at 1e-7, 0.04 at 1e-8): singular values under 1e-6 of the scale t
# (t <= n^(1/8)·σ_max) are counted with a weight below one; in float32 they are rounding level.
_NS_STEPS: tuple[tuple[float, float, float], ...] = (
    (7.590798324537381, -18.274388211450624, 12.66740567469613),
    (3.6876696199865573, -2.1066615036520484, 0.3582431386109864),
    (3.6875418886445965, -2.106603971284212, 0.3582389220462101),
    (3.687070841501913, -2.1063916669258362, 0.3582233339969817),
    (3.6853353857416646, -2.105609899457696, 0.358166078564734),
    (3.678953766866028, -2.1027345153858903, 0.3579556537256507),
    (3.6556682168335413, -2.0922319917532493, 0.3571889178312574),
    (3.5730485097120495, -2.054833222123577, 0.35448339638941545),
    (3.3074081789910217, -1.9330453346784844, 0.34598456213618883),
    (2.6820187453708013, -1.6345402553791282, 0.3283814022097728),
    (2.009673427384697, -1.2855309641647183, 0.3272804861538321),
    (1.8677188232381239, -1.2318368694971626, 0.3642976361795526),
    (1.8740309196603206, -1.2480621380398602, 0.3740312187621043),
)
# float64 input: one more step of the classical quintic (15x − 10x³ + 3x⁵)/8, whose error near 1
# shrinks cubically, takes 1e-9 to rounding level.
_NS_STEPS_FLOAT64_EXTRA: tuple[tuple[float, float, float], ...] = ((1.875, -1.25, 0.375),)
# Repeated squarings for the extreme singular vectors: 2^24 power-iteration steps, enough to
# split singular values 1e-7·σ_max apart (measured on a near-collapsed 512 × 2048 zbar: 2^16
# left σ_min 20 % too high, 2^24 brought it to the float32 limit); 4 more for float64.
_SQUARINGS = 24
_SQUARINGS_FLOAT64_EXTRA = 4


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


def _sqrt_sum_sq(x: torch.Tensor) -> torch.Tensor:
    """‖x‖₂ over all entries, as elementwise ops and a sum (no linalg op)."""
    return x.pow(2).sum().sqrt()


def _polar_factor(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Polar factor of a wide matrix by Newton–Schulz: a (n, N), n <= N -> (q, x), both (n, N).

    ``q ≈ U Vᵀ`` for ``a = U Σ Vᵀ`` (the reduced SVD; a zero singular value gives a zero
    direction), ``x = a / scale`` with every singular value of x in [0, 1]. Matmuls and
    elementwise ops only, a fixed number of them: no data-dependent control flow, no host sync.
    Call it on a detached tensor.

    Scale: a is first divided by its Frobenius norm (so nothing below overflows), then by
    ``t = (Σ σ⁸)^(1/8)`` of the result, an upper bound on σ_max that is at most n^(1/8)·σ_max,
    computed from ``G = a aᵀ`` and ``G²``, which the first step needs anyway.
    """
    tiny = torch.finfo(a.dtype).tiny
    a = a / _sqrt_sum_sq(a).clamp_min(tiny)
    g = a @ a.mT
    g2 = g @ g
    # t² = (Σσ⁸)^(1/4), at least 1/n unless a = 0 (Σσ² = 1 now); the floor only keeps the zero
    # matrix at zero (0/0 otherwise).
    t2 = _sqrt_sum_sq(g2).sqrt().clamp_min(1e-12)
    x = a / t2.sqrt()
    m, m2 = g / t2, g2 / (t2 * t2)  # x xᵀ and its square, from G and G²
    steps = _NS_STEPS + (_NS_STEPS_FLOAT64_EXTRA if a.dtype == torch.float64 else ())
    q = x
    for i, (c1, c3, c5) in enumerate(steps):
        if i:
            m = q @ q.mT
            m2 = m @ m
        q = c1 * q + (c3 * m + c5 * m2) @ q
    return q, x


def _dominant_eigenvector(m: torch.Tensor) -> torch.Tensor:
    """Unit eigenvector of the largest eigenvalue of a symmetric PSD matrix m (n, n) -> (n,).

    Repeated squaring (m ← m² / trace, ``_SQUARINGS`` times: 2^24 power steps in a fixed
    number of matmuls), then the column of the largest diagonal entry of the result
    (near ``u uᵀ``, so that column is a multiple of u with the largest possible weight), sent
    through m once more and normalised. With a repeated top eigenvalue the result is a unit
    vector of its eigenspace. No argmax is read on the host: the column is picked by
    ``index_select`` with a device tensor.
    """
    tiny = torch.finfo(m.dtype).tiny
    squarings = _SQUARINGS + (_SQUARINGS_FLOAT64_EXTRA if m.dtype == torch.float64 else 0)
    for _ in range(squarings):
        m = m @ m
        m = m / torch.diagonal(m).sum().clamp_min(tiny)
    j = torch.diagonal(m).argmax().reshape(1)
    u = m @ m.index_select(1, j).squeeze(1)
    return u / _sqrt_sum_sq(u).clamp_min(tiny)


def _singular_value_along(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``‖uᵀ a‖`` for a unit vector u (detached), with gradient ``u vᵀ``, ``v = aᵀu / ‖aᵀu‖``.

    When u is a left singular vector of a this is its singular value and ``u vᵀ`` is the
    singular value's gradient. Written as ``⟨u vᵀ, a⟩`` with v detached, so ``uᵀa = 0`` gives
    value 0 and gradient 0 instead of 0/0.
    """
    w = u @ a
    norm = _sqrt_sum_sq(w)
    v = (w / norm.clamp_min(torch.finfo(a.dtype).tiny)).detach()
    return (w * v).sum()


def _rank_loss_newton_schulz(a: torch.Tensor, variant: str) -> torch.Tensor:
    """The rank term of a (B, D) from matmuls and elementwise ops only (see :func:`rank_loss`)."""
    if a.shape[0] > a.shape[1]:
        a = a.mT  # work on the small side: n = min(B, D) rows
    m = a.shape[0]
    with torch.no_grad():
        q, x = _polar_factor(a.detach())
    if variant == "nuclear_frobenius":
        nuclear = (q * a).sum()
        return -(nuclear.pow(2) / a.pow(2).sum().clamp_min(_NORM_EPS)) / m
    if variant == "nuclear":
        return -(q * a).sum()
    with torch.no_grad():
        # x qᵀ = U diag(σ/t) Uᵀ: the square root of x xᵀ, eigenvalues σ/t in [0, 1], computed
        # without squaring the condition number (a Gram matrix would lose small σ in float32).
        p = x @ q.mT
        p = 0.5 * (p + p.mT)
        if variant == "tlsm":
            # Largest eigenvalue of c·I − p <-> smallest σ. c = 1 + 1/64 > σ_max / t keeps
            # c·I − p nonzero when every σ equals t (m = 1).
            p = (1.0 + 1.0 / 64) * torch.eye(m, dtype=p.dtype, device=p.device) - p
        u = _dominant_eigenvector(p)
    sigma = _singular_value_along(a, u)
    if variant == "tlsm":
        return -sigma
    return -((q * a).sum() / sigma.clamp_min(_NORM_EPS)) / m


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


TV_REDUCTIONS: tuple[str, ...] = ("mean", "sum")


def total_variance(z: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Total variance across views (paper eq. 2).

    z: (K, B, D) -> scalar. ``reduction="mean"`` (SPEC §1): ``((z - z.mean(0)) ** 2).mean()``, the
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
    _check_batch(zbar)
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
    _check_batch(zbar)
    with torch.autocast(device_type=zbar.device.type, enabled=False):
        a = _upcast(zbar)
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        if svd == "auto":
            svd = "svdvals" if a.device.type == "cpu" else "newton_schulz"
        if svd == "newton_schulz":
            return _rank_loss_newton_schulz(a, variant)
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


# ------------------------------------------------------------------------------ baseline losses
# The losses of other methods, so that they can be compared with SimMER in the same pipeline
# (--cfg.method, train/methods.py). Each takes z (K, B, D) as simmer_loss does, returns
# (total, parts), computes in float32 with autocast disabled (float64 stays float64), makes no
# host sync, and for K > 2 views averages its two-view form over the view pairs. Batch
# statistics are those of the global batch under torch.distributed (z is all-gathered with
# gradient, as simmer_loss gathers zbar; docs/LOSS.md).


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
        invariance = (2.0 * K / (K - 1)) * (z - z.mean(0, keepdim=True)).pow(2).mean()
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
