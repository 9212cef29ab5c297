"""The rank term without an SVD: a Newton–Schulz polar factor and repeated squaring, matmuls only.

:func:`rank_term_newton_schulz` gives the nuclear norm (and σ_max, σ_min for the normalised and
``tlsm`` variants) of a (B, D) matrix with a fixed number of matmuls and elementwise ops: no
linalg call, no data-dependent control flow, no host sync, so a training step on CUDA never
waits for the host and ``torch.compile`` sees plain matmuls. ``train.loss.rank_loss`` calls it
for ``svd="newton_schulz"`` (the GPU default); its docstring states the accuracy.
"""
from __future__ import annotations

import torch

# Floor on the normalising denominators of the normalised nuclear-norm variants.
NORM_EPS = 1e-12

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


def rank_term_newton_schulz(a: torch.Tensor, variant: str) -> torch.Tensor:
    """The rank term of ``a`` (B, D), float32 or float64, from matmuls and elementwise ops only.

    ``variant`` is one of ``RANK_VARIANTS`` (checked by the caller); the value and the gradient are
    those of :func:`train.loss.rank_loss` with ``svd="newton_schulz"``, whose docstring gives the
    method and its accuracy.
    """
    if a.shape[0] > a.shape[1]:
        a = a.mT  # work on the small side: n = min(B, D) rows
    m = a.shape[0]
    with torch.no_grad():
        q, x = _polar_factor(a.detach())
    if variant == "nuclear_frobenius":
        nuclear = (q * a).sum()
        return -(nuclear.pow(2) / a.pow(2).sum().clamp_min(NORM_EPS)) / m
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
    return -((q * a).sum() / sigma.clamp_min(NORM_EPS)) / m
