"""Tests for train/loss.py: the SimMER loss read as the spec (docs/LOSS.md, paper §2).

Each term is compared with an independent float64 numpy reference written from the paper's
equations; then invariances, gradients, numerical safety, dtypes, torch.compile, the
distributed gather (2 gloo processes), input validation and the paper's qualitative claims.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from distributed_helpers import free_port, gloo_threads
from measure.health import effective_rank, nearest_neighbour_distance
from train.loss import (
    DEFAULT_SVD,
    RANK_VARIANTS,
    SVD_METHODS,
    entropy_loss,
    rank_loss,
    simmer_loss,
    total_variance,
)

SHAPES = [  # (K, B, D)
    (2, 2, 1),  # smallest valid
    (2, 5, 3),  # B > D
    (3, 8, 20),  # B < D
    (4, 30, 6),  # B > D, more than 25 rows
    (10, 16, 16),  # square, K = 10 as in the paper's headline run
]


# ---------------------------------------------------------------------------------------------
# Independent float64 reference, plain numpy loops over the paper's equations.


def ref_zbar(z: np.ndarray) -> np.ndarray:
    K, B, D = z.shape
    zbar = np.zeros((B, D))
    for b in range(B):
        for k in range(K):
            zbar[b] += z[k, b]
        zbar[b] /= K  # the paper's 1/B here is a typo for 1/K (docs/LOSS.md)
    return zbar


def ref_tv(z: np.ndarray) -> float:
    K, B, D = z.shape
    zbar = ref_zbar(z)
    total = 0.0
    for b in range(B):
        for k in range(K):
            total += float(np.sum((z[k, b] - zbar[b]) ** 2))
    return total / (K * B * D)


def ref_entropy(zbar: np.ndarray) -> float:
    B = zbar.shape[0]
    dist, _ = cKDTree(zbar).query(zbar, k=2)  # column 0 is the point itself
    return -sum(math.log(dist[b, 1]) for b in range(B)) / B


def ref_rank(zbar: np.ndarray, variant: str, bias: bool) -> float:
    a = np.hstack([zbar, np.ones((zbar.shape[0], 1))]) if bias else zbar
    s = np.linalg.svd(a, compute_uv=False)
    m = min(a.shape)
    nuclear = s.sum()
    if variant == "tlsm":
        return -s.min()
    if variant == "nuclear":
        return -nuclear
    if variant == "nuclear_spectral":
        return -nuclear / s.max() / m
    if variant == "nuclear_frobenius":
        return -((nuclear / math.sqrt(np.sum(s**2))) ** 2) / m
    raise AssertionError(variant)


def ref_simmer(z, alpha_h, alpha_r, variant, bias):
    zbar = ref_zbar(z)
    tv, h, r = ref_tv(z), ref_entropy(zbar), ref_rank(zbar, variant, bias)
    return tv + alpha_h * h + alpha_r * r, {"tv": tv, "entropy": h, "rank": r}


# The two ways to the singular values ("auto" is one of them, chosen by device).
_METHODS = ("newton_schulz", "svdvals")
assert set(_METHODS) < set(SVD_METHODS)


def _random_z(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# Agreement with the reference.


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K%dB%dD%d" % s)
def test_terms_match_reference(shape):
    z = _random_z(shape, seed=1)
    zn = z.numpy()
    zbar = z.mean(0)
    np.testing.assert_allclose(total_variance(z).item(), ref_tv(zn), rtol=1e-10)
    ref_h = ref_entropy(ref_zbar(zn))
    np.testing.assert_allclose(entropy_loss(zbar, eps=0.0).item(), ref_h, rtol=1e-10)
    # The default floor shifts each log-distance by about eps / (2 d²): negligible here.
    np.testing.assert_allclose(entropy_loss(zbar).item(), ref_h, rtol=1e-5)


@pytest.mark.parametrize("svd", _METHODS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("variant", RANK_VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K%dB%dD%d" % s)
def test_simmer_loss_matches_reference(shape, variant, bias, svd):
    z = _random_z(shape, seed=2)
    total, parts = simmer_loss(z, alpha_h=0.3, alpha_r=0.05, rank_variant=variant, rank_bias=bias,
                               svd=svd)
    ref_total, ref_parts = ref_simmer(z.numpy(), 0.3, 0.05, variant, bias)
    # Tolerances allow for the entropy term's distance floor (see test_terms_match_reference).
    for name in ("tv", "entropy", "rank"):
        np.testing.assert_allclose(parts[name].item(), ref_parts[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(total.item(), ref_total, rtol=1e-6, atol=1e-7)
    # The rank term alone, as a public function, agrees too.
    np.testing.assert_allclose(
        rank_loss(z.mean(0), variant, bias, svd=svd).item(),
        ref_rank(ref_zbar(z.numpy()), variant, bias),
        rtol=1e-10, atol=1e-12,
    )


@pytest.mark.parametrize("svd", _METHODS)
@pytest.mark.parametrize("variant", RANK_VARIANTS)
def test_float32_matches_reference(variant, svd):
    z = _random_z((4, 40, 24), seed=3, dtype=torch.float32)
    total, parts = simmer_loss(z, rank_variant=variant, svd=svd)
    assert total.dtype == torch.float32
    ref_total, ref_parts = ref_simmer(z.double().numpy(), 0.1, 2e-4, variant, False)
    for name in ("tv", "entropy", "rank"):
        np.testing.assert_allclose(parts[name].item(), ref_parts[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total.item(), ref_total, rtol=1e-5, atol=1e-6)


def test_default_weights():
    z = _random_z((4, 12, 8), seed=4)
    total, parts = simmer_loss(z)
    expected = parts["tv"] + 0.1 * parts["entropy"] + 2e-4 * parts["rank"]
    torch.testing.assert_close(total, expected)
    ref_total, _ = ref_simmer(z.numpy(), 0.1, 2e-4, "nuclear", False)
    np.testing.assert_allclose(total.item(), ref_total, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# The sync-free rank term (svd="newton_schulz", the default on a GPU) against a float64 SVD, at
# the training sizes: values and gradients, every variant, with and without the bias column.


def ref_rank_and_grad(svd, a: np.ndarray, variant: str):
    """float64 rank term of a and its gradient w.r.t. a, by hand from ``svd = (u, s, vh)`` of a."""
    u, s, vh = svd
    m = min(a.shape)
    nuclear, fro2, uv = s.sum(), np.sum(a**2), u @ vh
    if variant == "tlsm":
        return -s[-1], -np.outer(u[:, -1], vh[-1])
    if variant == "nuclear":
        return -nuclear, -uv
    if variant == "nuclear_spectral":
        grad = -(uv / s[0] - nuclear / s[0] ** 2 * np.outer(u[:, 0], vh[0])) / m
        return -nuclear / s[0] / m, grad
    grad = -(2 * nuclear / fro2 * uv - 2 * nuclear**2 / fro2**2 * a) / m
    return -(nuclear**2) / fro2 / m, grad


def _rank_value_and_grad(zbar: torch.Tensor, variant: str, bias: bool, svd: str = "newton_schulz"):
    zbar = zbar.clone().requires_grad_()
    r = rank_loss(zbar, variant, bias, svd=svd)
    r.backward()
    return r.item(), zbar.grad.double().numpy()


def _test_matrix(kind: str, B: int, D: int) -> torch.Tensor:
    """A float32 (B, D) zbar of the given kind, seeded."""
    g = torch.Generator().manual_seed(20)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "random":
        a = randn(B, D)
    elif kind == "low_rank":  # rank 20
        a = randn(B, 20) @ randn(20, D) / math.sqrt(20)
    elif kind == "duplicate_rows":  # rows 2 = 5 = 9 and 7 = 100: rank B - 3 when B <= D
        a = randn(B, D)
        a[[5, 9]] = a[2].clone()
        a[100] = a[7].clone()
    elif kind == "near_collapsed":  # one shared vector plus 1e-3 noise: σ_2.. ≈ 1e-5 σ_1
        a = randn(1, D) + 1e-3 * randn(B, D)
    else:
        raise AssertionError(kind)
    return a.float()


# Tolerances, about 5x the largest error measured (float32 Newton–Schulz against the float64 SVD
# of the same float32 matrix, over the variants and bias on/off, B=512 x D=2048 and 1024 x 512).
# Values: relative error. Gradients: relative Frobenius error; for rank-deficient input, of the
# part inside the column space (a zero σ's singular vectors, hence the reference gradient, are
# arbitrary there).
_NS_TOL = {
    # kind: (value rtol, gradient tolerance)
    "random": (1e-6, 5e-5),  # measured 2.1e-7, 8.3e-6 (float32 svdvals: 3.5e-7, 2.2e-5)
    "low_rank": (2e-6, 2e-5),  # measured 3.3e-7, 3.3e-6
    "duplicate_rows": (1e-6, 5e-5),  # measured 1.3e-7, 8.2e-6
    "near_collapsed": (1e-6, 1e-3),  # measured 2.6e-7, 1.2e-4 (float32 svdvals: 7e-7, 4e-3)
}
# σ_min of a near-collapsed zbar: its smallest singular values are about 1e-7·σ_max apart, at
# float32's limit. Measured 1.1e-3 and 0.15 (float32 svdvals: 1e-2 and 1.2, a wrong vector).
_NS_TOL_TLSM_NEAR_COLLAPSED = (5e-3, 0.5)


def _check_newton_schulz_against_svd(
    kind: str, B: int, D: int, biases=(False, True), variants=RANK_VARIANTS
) -> None:
    zbar = _test_matrix(kind, B, D)
    rank_deficient = kind == "low_rank" or (kind == "duplicate_rows" and B <= D)
    report = []
    for bias in biases:
        z64 = zbar.double().numpy()
        a = np.hstack([z64, np.ones((B, 1))]) if bias else z64
        svd = np.linalg.svd(a, full_matrices=False)
        u, s, _ = svd
        r = int((s > 1e-4 * s[0]).sum())  # numerical rank
        for variant in variants:
            value, grad = _rank_value_and_grad(zbar, variant, bias)
            ref_value, ref_grad = ref_rank_and_grad(svd, a, variant)
            ref_grad = ref_grad[:, :D]  # w.r.t. zbar, not the bias column
            case = f"{kind} {B}x{D} {variant} bias={bias}"
            assert np.isfinite(value) and np.isfinite(grad).all(), case
            rtol, gtol = _NS_TOL[kind]
            if variant == "tlsm" and rank_deficient:
                # σ_min = 0 up to rounding: found to float32 accuracy relative to σ_max, far
                # below the smallest nonzero σ. Its gradient is any unit u vᵀ of the null space.
                report.append(f"{case}: |error| / σ_max {abs(value - ref_value) / s[0]:.1e}")
                assert abs(value - ref_value) <= 1e-6 * s[0], report[-1]
                assert abs(value) < 1e-4 * s[r - 1], case
                assert np.linalg.norm(grad) <= 1 + 1e-5, case
                continue
            if variant == "tlsm" and kind == "near_collapsed":
                rtol, gtol = _NS_TOL_TLSM_NEAR_COLLAPSED
            if rank_deficient:  # compare inside the column space
                proj = u[:, :r] @ u[:, :r].T
                grad, ref_grad = proj @ grad, proj @ ref_grad
            value_err = abs(value - ref_value) / abs(ref_value)
            grad_err = np.linalg.norm(grad - ref_grad) / np.linalg.norm(ref_grad)
            report.append(f"{case}: value {value_err:.1e}, gradient {grad_err:.1e}")
            assert value_err <= rtol and grad_err <= gtol, report[-1]
    print("\n".join(report))  # the measured errors, shown with pytest -s


@pytest.mark.parametrize(
    "kind, biases, variants",
    [
        ("random", (False, True), RANK_VARIANTS),
        ("near_collapsed", (True,), RANK_VARIANTS),
        ("low_rank", (False,), RANK_VARIANTS),
        ("duplicate_rows", (True,), ("tlsm", "nuclear")),
    ],
)
def test_newton_schulz_matches_svd_at_training_size(kind, biases, variants):
    # B=512, D=2048 (the paper's batch and projector width), float32; 1-5 s per variant on 2 cores.
    _check_newton_schulz_against_svd(kind, 512, 2048, biases, variants)


@pytest.mark.parametrize("kind, biases", [("random", (False,)), ("near_collapsed", (True,))])
def test_newton_schulz_matches_svd_more_rows_than_columns(kind, biases):
    # B > D (a batch gathered over ranks): the iteration runs on the D side. 1024 x 512 has the
    # shape ratio of 4096 x 2048, which takes ~10 s a call on 2 cores (see bench/rank_term.py).
    _check_newton_schulz_against_svd(kind, 1024, 512, biases)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_newton_schulz_repeated_singular_values(dtype):
    # Every σ equal (3 × orthonormal rows, 12 x 40): exact values; the nuclear norm's gradient is
    # the polar factor, nuclear_frobenius is at its maximum (gradient 0), and σ_min's gradient is
    # some unit u vᵀ of the (whole) singular space.
    q, _ = torch.linalg.qr(torch.randn(40, 12, generator=torch.Generator().manual_seed(21),
                                       dtype=torch.float64))
    zbar = (3.0 * q.T).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    expected = {"tlsm": -3.0, "nuclear": -36.0, "nuclear_spectral": -1.0, "nuclear_frobenius": -1.0}
    for variant in RANK_VARIANTS:
        value, grad = _rank_value_and_grad(zbar, variant, False)
        np.testing.assert_allclose(value, expected[variant], **tol)
        assert np.isfinite(grad).all(), variant
        if variant == "nuclear":
            np.testing.assert_allclose(grad, -q.T.numpy(), **tol)
        if variant == "nuclear_frobenius":
            np.testing.assert_allclose(grad, 0.0, **tol)
        if variant == "tlsm":
            np.testing.assert_allclose(np.linalg.norm(grad), 1.0, **tol)
            assert np.linalg.matrix_rank(grad, tol=1e-4) == 1


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every aten op that runs (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Ops that read a value back to the host on CUDA, and the linear-algebra solvers (which check
# `info` there): every `linalg_*` / `_linalg_*` op and the older names.
_SYNCING_PREFIXES = ("_local_scalar_dense", "item", "nonzero", "_assert_async", "masked_select",
                     "svd", "_svd", "eig", "symeig", "cholesky", "qr", "geqrf", "lu", "_lu",
                     "inverse", "triangular_solve", "lstsq")


def _syncing_ops(ops):
    return sorted(op for op in ops if "linalg" in op or op.startswith(_SYNCING_PREFIXES))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("variant", RANK_VARIANTS)
def test_newton_schulz_has_no_linalg_call_and_no_host_sync(variant, bias):
    from torch._subclasses.fake_tensor import FakeTensorMode

    z = _random_z((4, 24, 10), seed=22, dtype=torch.float32).requires_grad_()
    with _RecordOps() as rec:
        total, _ = simmer_loss(z, rank_variant=variant, rank_bias=bias, svd="newton_schulz")
        total.backward()
    assert "mm" in rec.ops
    assert _syncing_ops(rec.ops) == [], _syncing_ops(rec.ops)
    # Forward on CUDA tensors (fake ones: no GPU needed), with the default svd="auto", which
    # must take the sync-free path there.
    assert DEFAULT_SVD == "auto"
    with FakeTensorMode():
        z_cuda = torch.randn(4, 24, 10, device="cuda")
        with _RecordOps() as rec_cuda:
            simmer_loss(z_cuda, rank_variant=variant, rank_bias=bias)
    assert _syncing_ops(rec_cuda.ops) == [], _syncing_ops(rec_cuda.ops)
    # The recorder sees the reference's SVD.
    with _RecordOps() as rec_svd:
        simmer_loss(z, rank_variant=variant, rank_bias=bias, svd="svdvals")[0].backward()
    assert "_linalg_svd" in rec_svd.ops


# ---------------------------------------------------------------------------------------------
# Invariances.


@pytest.mark.parametrize("variant", RANK_VARIANTS)
def test_invariant_to_permuting_images_and_views(variant):
    g = torch.Generator().manual_seed(5)
    z = torch.randn(4, 24, 10, generator=g)
    total, parts = simmer_loss(z, 0.1, 0.01, variant, rank_bias=True)

    images = torch.randperm(24, generator=g)
    views = torch.randperm(4, generator=g)
    for permuted in (z[:, images], z[views], z[views][:, images]):
        t, p = simmer_loss(permuted, 0.1, 0.01, variant, rank_bias=True)
        torch.testing.assert_close(t, total, rtol=1e-5, atol=1e-5)
        for name in parts:
            torch.testing.assert_close(p[name], parts[name], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gradients and numerical safety.


@pytest.mark.parametrize("svd", _METHODS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("variant", RANK_VARIANTS)
def test_gradcheck(variant, bias, svd):
    # Unit weights so that every term contributes visibly to the checked gradient.
    z = _random_z((3, 5, 4), seed=6).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: simmer_loss(z, 1.0, 1.0, variant, bias, svd=svd)[0], (z,), eps=1e-6, atol=1e-5
    )
    zbar = _random_z((6, 3), seed=7).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: rank_loss(a, variant, bias, svd=svd), (zbar,),
                                    eps=1e-6)


def test_gradcheck_tv_and_entropy():
    z = _random_z((3, 6, 4), seed=8).requires_grad_()
    assert torch.autograd.gradcheck(total_variance, (z,), eps=1e-6)
    zbar = _random_z((7, 3), seed=9).requires_grad_()
    assert torch.autograd.gradcheck(entropy_loss, (zbar,), eps=1e-6)


def _assert_finite_loss_and_grad(z, variant, bias, svd=DEFAULT_SVD):
    z = z.clone().requires_grad_()
    total, parts = simmer_loss(z, 0.1, 2e-4, variant, bias, svd=svd)
    total.backward()
    assert torch.isfinite(total), (variant, bias, total)
    for name, value in parts.items():
        assert torch.isfinite(value), (name, value)
    assert torch.isfinite(z.grad).all(), (variant, bias)


@pytest.mark.parametrize("svd", _METHODS)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("variant", RANK_VARIANTS)
def test_duplicates_and_rank_deficiency_are_finite(variant, bias, svd):
    g = torch.Generator().manual_seed(10)
    K, B, D = 3, 16, 8
    dup = torch.randn(K, B, D, generator=g)
    dup[:, 5] = dup[:, 2]  # images 2 and 5 identical in every view: zbar rows coincide
    dup[:, 9] = dup[:, 2]
    low_rank = torch.randn(K, B, 2, generator=g) @ torch.randn(2, D, generator=g)  # rank 2
    wide = torch.randn(K, 4, 1, generator=g) * torch.ones(1, 1, 32)  # B < D, rank 1
    collapsed = torch.ones(K, B, D)  # a constant mapping: every row equal
    zeros = torch.zeros(K, B, D)
    for z in (dup, low_rank, wide, collapsed, zeros):
        _assert_finite_loss_and_grad(z, variant, bias, svd)


def test_duplicate_rows_entropy_value_and_gradient():
    zbar = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]], requires_grad=True)
    h = entropy_loss(zbar, eps=1e-8)
    # Rows 0 and 1 coincide (log of the floored distance), row 2's nearest neighbour is at 5.
    expected = -(2 * 0.5 * math.log(1e-8) + math.log(5.0)) / 3
    np.testing.assert_allclose(h.item(), expected, rtol=1e-6)
    h.backward()
    assert torch.isfinite(zbar.grad).all()


# ---------------------------------------------------------------------------------------------
# Precision, compile.


def test_bf16_under_autocast_is_computed_in_float32():
    g = torch.Generator().manual_seed(11)
    z_bf16 = torch.randn(4, 32, 16, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts = simmer_loss(z_bf16, rank_variant="nuclear_frobenius", rank_bias=True)
    assert total.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in parts.values())
    ref_total, ref_parts = simmer_loss(z_bf16.float(), rank_variant="nuclear_frobenius",
                                       rank_bias=True)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-6)
    for name in parts:
        torch.testing.assert_close(parts[name], ref_parts[name], rtol=1e-5, atol=1e-6)

    # A network running under autocast (bf16 matmul) still gets float32 gradients, all finite.
    w = torch.randn(8, 16, generator=g, requires_grad=True)
    x = torch.randn(4, 32, 8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = x @ w
        assert z.dtype == torch.bfloat16
        total, _ = simmer_loss(z)
    assert total.dtype == torch.float32
    total.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_compiled_equals_eager():
    # One cold compile (~15 s on 2 CPU cores); small shapes.
    compiled = torch.compile(simmer_loss, fullgraph=True)
    z = _random_z((4, 32, 16), seed=12, dtype=torch.float32)
    z_eager = z.clone().requires_grad_()
    z_comp = z.clone().requires_grad_()

    # The sync-free rank term (the default on a GPU; "auto" takes svdvals on the CPU).
    total_e, parts_e = simmer_loss(z_eager, rank_bias=True, svd="newton_schulz")
    total_c, parts_c = compiled(z_comp, rank_bias=True, svd="newton_schulz")
    (total_e + parts_e["rank"]).backward()
    (total_c + parts_c["rank"]).backward()

    torch.testing.assert_close(total_c, total_e, rtol=1e-5, atol=1e-6)
    for name in parts_e:
        torch.testing.assert_close(parts_c[name], parts_e[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_comp.grad, z_eager.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["tlsm", "nuclear_spectral"])
def test_newton_schulz_extreme_singular_values_trace_as_one_graph(variant):
    # The variants that pick a column by argmax: one graph, forward and backward (AOTAutograd,
    # without inductor's code generation; test_compiled_equals_eager compiles the default fully).
    compiled = torch.compile(simmer_loss, fullgraph=True, backend="aot_eager")
    z = _random_z((4, 32, 16), seed=23, dtype=torch.float32)
    z_eager, z_comp = z.clone().requires_grad_(), z.clone().requires_grad_()
    kw = dict(rank_variant=variant, rank_bias=True, svd="newton_schulz")
    total_e, parts_e = simmer_loss(z_eager, **kw)
    total_c, parts_c = compiled(z_comp, **kw)
    (total_e + parts_e["rank"]).backward()
    (total_c + parts_c["rank"]).backward()
    torch.testing.assert_close(parts_c["rank"], parts_e["rank"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_comp.grad, z_eager.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes with B/2 each equal 1 process with B.

_DIST_CASES = (
    [(v, False, "svdvals") for v in RANK_VARIANTS]
    + [("nuclear", True, "svdvals"), ("tlsm", True, "svdvals")]
    + [(v, True, "newton_schulz") for v in RANK_VARIANTS]
)


def _distributed_worker(rank: int, world_size: int, port: int, missing: tuple[str, ...] = ()) -> None:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as functional

    for name in missing:  # as on an older torch (2.11 has no all_gather_single)
        delattr(functional, name)
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        _compare_gathered_with_full_batch(rank, world_size)  # its graphs (which hold the group) go with it
        dist.barrier()  # both ranks done before either tears its process group down
    finally:
        dist.destroy_process_group()
    # The group is freed and its gloo threads joined now, not at the interpreter's exit (where
    # one dropping a finished collective aborts the process): nothing the loss imported pins it.
    assert gloo_threads() == 0, f"rank {rank}: {gloo_threads()} gloo threads outlive the process group"


def _compare_gathered_with_full_batch(rank: int, world_size: int) -> None:
    import torch.distributed as dist

    K, B, Din, D = 3, 12, 5, 7
    local = slice(rank * B // world_size, (rank + 1) * B // world_size)
    g = torch.Generator().manual_seed(0)  # the same on every rank
    x = torch.randn(K, B, Din, generator=g, dtype=torch.float64)
    w_init = torch.randn(Din, D, generator=g, dtype=torch.float64)
    for variant, bias, svd in _DIST_CASES:
        for alpha_h, alpha_r in ((1.0, 1.0), (0.1, 2e-4)):
            # Single process, full batch (computed before any gather, no process group use).
            w_ref = w_init.clone().requires_grad_()
            z_full = x @ w_ref
            zbar_full = z_full.mean(0)
            ref_total = (
                total_variance(z_full)
                + alpha_h * entropy_loss(zbar_full)
                + alpha_r * rank_loss(zbar_full, variant, bias, svd=svd)
            )
            ref_total.backward()
            ref_h = entropy_loss(zbar_full.detach())
            ref_r = rank_loss(zbar_full.detach(), variant, bias, svd=svd)

            # This rank: B/2 images, loss through the gathered zbar.
            w = w_init.clone().requires_grad_()
            total, parts = simmer_loss(x[:, local] @ w, alpha_h, alpha_r, variant, bias, svd)
            total.backward()
            grad = w.grad.clone()
            dist.all_reduce(grad)
            grad /= world_size  # what DDP does
            mean_total = total.detach().clone()
            dist.all_reduce(mean_total)
            mean_total /= world_size
            mean_tv = parts["tv"].detach().clone()
            dist.all_reduce(mean_tv)
            mean_tv /= world_size

            tol = dict(rtol=1e-9, atol=1e-12)
            case = f"rank {rank}, {variant}, bias={bias}, {svd}, alphas={alpha_h, alpha_r}"

            def msg(m, case=case):
                return f"{case}: {m}"

            torch.testing.assert_close(parts["entropy"], ref_h, **tol, msg=msg)
            torch.testing.assert_close(parts["rank"], ref_r, **tol, msg=msg)
            torch.testing.assert_close(
                parts["tv"], total_variance(x[:, local] @ w_init), **tol, msg=msg
            )
            torch.testing.assert_close(mean_tv, total_variance(x @ w_init), **tol, msg=msg)
            torch.testing.assert_close(mean_total, ref_total.detach(), **tol, msg=msg)
            torch.testing.assert_close(grad, w_ref.grad, **tol, msg=msg)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
@pytest.mark.parametrize("missing", [(), ("all_gather_single",)], ids=["torch-2.14", "without-all_gather_single"])
def test_distributed_gather_equals_single_process(missing):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, free_port(), missing), nprocs=2, join=True)


# ---------------------------------------------------------------------------------------------
# Input validation.


def test_validation_errors():
    with pytest.raises(ValueError, match=r"\(K views, B images, D dims\).*2-D.*\(4, 8\)"):
        simmer_loss(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"K >= 2.*K=1"):
        simmer_loss(torch.randn(1, 8, 4))
    with pytest.raises(ValueError, match=r"B >= 2.*B=1"):
        simmer_loss(torch.randn(4, 1, 4))
    with pytest.raises(ValueError, match=r"D >= 1.*D=0"):
        simmer_loss(torch.randn(4, 8, 0))
    valid = r"tlsm, nuclear, nuclear_spectral, nuclear_frobenius"
    with pytest.raises(ValueError, match=rf"unknown rank variant 'frobenius'.*{valid}"):
        simmer_loss(torch.randn(4, 8, 4), rank_variant="frobenius")
    with pytest.raises(ValueError, match=rf"unknown rank variant 'svd'.*{valid}"):
        rank_loss(torch.randn(8, 4), variant="svd")
    with pytest.raises(ValueError, match=r"unknown svd method 'qr'.*auto, newton_schulz, svdvals"):
        simmer_loss(torch.randn(4, 8, 4), svd="qr")
    with pytest.raises(ValueError, match=r"unknown svd method 'eigh'"):
        rank_loss(torch.randn(8, 4), svd="eigh")
    with pytest.raises(ValueError, match=r"zbar must have shape \(B, D\)"):
        entropy_loss(torch.randn(1, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        simmer_loss(np.zeros((2, 2, 2)))


# ---------------------------------------------------------------------------------------------
# Representation health figures.


def test_effective_rank():
    torch.testing.assert_close(effective_rank(torch.eye(8)), torch.tensor(8.0))
    q, _ = torch.linalg.qr(torch.randn(12, 5, generator=torch.Generator().manual_seed(13)))
    torch.testing.assert_close(effective_rank(3.0 * q), torch.tensor(5.0))  # equal σ, 12 × 5
    g = torch.Generator().manual_seed(14)
    rank1 = torch.randn(10, 1, generator=g) @ torch.randn(1, 6, generator=g)
    torch.testing.assert_close(effective_rank(rank1), torch.tensor(1.0), rtol=0, atol=1e-4)
    z = torch.randn(16, 4, generator=g, requires_grad=True)
    er = effective_rank(z.bfloat16())
    assert er.dtype == torch.float32 and not er.requires_grad
    assert 1.0 < er.item() < 4.0


def test_nearest_neighbour_distance():
    zbar = torch.randn(20, 3, generator=torch.Generator().manual_seed(15), requires_grad=True)
    d = nearest_neighbour_distance(zbar)
    dist, _ = cKDTree(zbar.detach().double().numpy()).query(zbar.detach().double().numpy(), k=2)
    np.testing.assert_allclose(d.item(), dist[:, 1].mean(), rtol=1e-5)
    assert d.dtype == torch.float32 and not d.requires_grad


# ---------------------------------------------------------------------------------------------
# Behaviour claimed by the paper (§2.2, §2.3), on a tiny linear "encoder" with no network data:
# z = x @ W, where the K views x[k, b] are noisy copies of a fixed random input b, so a
# collapse (W -> 0) is reachable. Adam with cosine decay, seeded, ~0.3 s per run.

_K, _B, _DIN, _D = 4, 32, 24, 16


def _train_linear_encoder(alpha_h: float, alpha_r: float, steps: int = 300):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(_B, _DIN, generator=g) + 0.3 * torch.randn(_K, _B, _DIN, generator=g)
    w = (torch.randn(_DIN, _D, generator=g) / _DIN**0.5).requires_grad_()
    opt = torch.optim.Adam([w], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    z0 = (x @ w).detach()
    for _ in range(steps):
        z = x @ w
        if alpha_h == 0 and alpha_r == 0:
            loss = total_variance(z)
        else:
            loss, _ = simmer_loss(z, alpha_h=alpha_h, alpha_r=alpha_r)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return z0.mean(0), (x @ w).detach().mean(0)


def _spread(zbar: torch.Tensor) -> float:
    return zbar.std(0).mean().item()


@pytest.fixture(scope="module")
def trained():
    return {
        "tv": _train_linear_encoder(0.0, 0.0),
        "tv+h": _train_linear_encoder(0.1, 0.0),
        "tv+h+r": _train_linear_encoder(0.1, 2e-4),  # the paper's weights
    }


def test_total_variance_alone_collapses(trained):
    zbar0, zbar = trained["tv"]
    assert _spread(zbar) < 1e-2 * _spread(zbar0)
    assert nearest_neighbour_distance(zbar) < 1e-2 * nearest_neighbour_distance(zbar0)


def test_entropy_term_prevents_collapse(trained):
    zbar0, zbar_tv = trained["tv"]
    _, zbar_h = trained["tv+h"]
    nn0 = nearest_neighbour_distance(zbar0)
    nn_h = nearest_neighbour_distance(zbar_h)
    assert nn_h > nn0  # the neighbours moved apart, not together
    assert nn_h > 100 * nearest_neighbour_distance(zbar_tv)


def test_rank_term_raises_effective_rank(trained):
    _, zbar_h = trained["tv+h"]
    _, zbar_hr = trained["tv+h+r"]
    # Entropy alone lets zbar concentrate on fewer directions (paper §2.3); the rank term
    # spreads the spectrum (measured: about 8.8 without, 11.1 with, out of 16).
    assert effective_rank(zbar_hr) > effective_rank(zbar_h) + 1.0


def test_tv_reduction_sum_is_d_times_the_mean_and_reaches_the_total() -> None:
    from train.loss import total_variance

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 8, 5, generator=generator, dtype=torch.float64)
    reference = sum(((z[k, b] - z[:, b].mean(0)) ** 2).sum() for k in range(3) for b in range(8)) / (3 * 8)
    assert total_variance(z, "sum").item() == pytest.approx(reference.item())
    assert total_variance(z, "sum").item() == pytest.approx(5 * total_variance(z, "mean").item())
    total, parts = simmer_loss(z, tv_reduction="sum")
    assert parts["tv"].item() == pytest.approx(reference.item())
    assert total.item() == pytest.approx((parts["tv"] + 0.1 * parts["entropy"] + 2e-4 * parts["rank"]).item())
    with pytest.raises(ValueError, match="unknown tv reduction 'max'"):
        total_variance(z, "max")
