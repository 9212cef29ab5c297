"""Tests for train/loss.py: the SimMER loss read as the spec (SPEC §1, paper §2).

Each term is compared with an independent float64 numpy reference written from the paper's
equations; then invariances, gradients, numerical safety, dtypes, torch.compile, the
distributed gather (2 gloo processes), input validation and the paper's qualitative claims.
"""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from train.loss import (
    RANK_VARIANTS,
    effective_rank,
    entropy_loss,
    nearest_neighbour_distance,
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
        zbar[b] /= K  # the paper's 1/B here is a typo for 1/K (SPEC §1)
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


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("variant", RANK_VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K%dB%dD%d" % s)
def test_simmer_loss_matches_reference(shape, variant, bias):
    z = _random_z(shape, seed=2)
    total, parts = simmer_loss(z, alpha_h=0.3, alpha_r=0.05, rank_variant=variant, rank_bias=bias)
    ref_total, ref_parts = ref_simmer(z.numpy(), 0.3, 0.05, variant, bias)
    # Tolerances allow for the entropy term's distance floor (see test_terms_match_reference).
    for name in ("tv", "entropy", "rank"):
        np.testing.assert_allclose(parts[name].item(), ref_parts[name], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(total.item(), ref_total, rtol=1e-6, atol=1e-7)
    # The rank term alone, as a public function, agrees too.
    np.testing.assert_allclose(
        rank_loss(z.mean(0), variant, bias).item(), ref_rank(ref_zbar(z.numpy()), variant, bias),
        rtol=1e-10, atol=1e-12,
    )


@pytest.mark.parametrize("variant", RANK_VARIANTS)
def test_float32_matches_reference(variant):
    z = _random_z((4, 40, 24), seed=3, dtype=torch.float32)
    total, parts = simmer_loss(z, rank_variant=variant)
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


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("variant", RANK_VARIANTS)
def test_gradcheck(variant, bias):
    # Unit weights so that every term contributes visibly to the checked gradient.
    z = _random_z((3, 5, 4), seed=6).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: simmer_loss(z, 1.0, 1.0, variant, bias)[0], (z,), eps=1e-6, atol=1e-5
    )
    zbar = _random_z((6, 3), seed=7).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: rank_loss(a, variant, bias), (zbar,), eps=1e-6)


def test_gradcheck_tv_and_entropy():
    z = _random_z((3, 6, 4), seed=8).requires_grad_()
    assert torch.autograd.gradcheck(total_variance, (z,), eps=1e-6)
    zbar = _random_z((7, 3), seed=9).requires_grad_()
    assert torch.autograd.gradcheck(entropy_loss, (zbar,), eps=1e-6)


def _assert_finite_loss_and_grad(z, variant, bias):
    z = z.clone().requires_grad_()
    total, parts = simmer_loss(z, 0.1, 2e-4, variant, bias)
    total.backward()
    assert torch.isfinite(total), (variant, bias, total)
    for name, value in parts.items():
        assert torch.isfinite(value), (name, value)
    assert torch.isfinite(z.grad).all(), (variant, bias)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("variant", RANK_VARIANTS)
def test_duplicates_and_rank_deficiency_are_finite(variant, bias):
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
        _assert_finite_loss_and_grad(z, variant, bias)


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

    total_e, parts_e = simmer_loss(z_eager, rank_bias=True)
    total_c, parts_c = compiled(z_comp, rank_bias=True)
    (total_e + parts_e["rank"]).backward()
    (total_c + parts_c["rank"]).backward()

    torch.testing.assert_close(total_c, total_e, rtol=1e-5, atol=1e-6)
    for name in parts_e:
        torch.testing.assert_close(parts_c[name], parts_e[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z_comp.grad, z_eager.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes with B/2 each equal 1 process with B.

_DIST_CASES = [(v, False) for v in RANK_VARIANTS] + [("nuclear", True), ("tlsm", True)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        K, B, Din, D = 3, 12, 5, 7
        local = slice(rank * B // world_size, (rank + 1) * B // world_size)
        g = torch.Generator().manual_seed(0)  # the same on every rank
        x = torch.randn(K, B, Din, generator=g, dtype=torch.float64)
        w_init = torch.randn(Din, D, generator=g, dtype=torch.float64)
        for variant, bias in _DIST_CASES:
            for alpha_h, alpha_r in ((1.0, 1.0), (0.1, 2e-4)):
                # Single process, full batch (computed before any gather, no process group use).
                w_ref = w_init.clone().requires_grad_()
                z_full = x @ w_ref
                zbar_full = z_full.mean(0)
                ref_total = (
                    total_variance(z_full)
                    + alpha_h * entropy_loss(zbar_full)
                    + alpha_r * rank_loss(zbar_full, variant, bias)
                )
                ref_total.backward()
                ref_h = entropy_loss(zbar_full.detach())
                ref_r = rank_loss(zbar_full.detach(), variant, bias)

                # This rank: B/2 images, loss through the gathered zbar.
                w = w_init.clone().requires_grad_()
                total, parts = simmer_loss(x[:, local] @ w, alpha_h, alpha_r, variant, bias)
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
                case = f"rank {rank}, {variant}, bias={bias}, alphas={alpha_h, alpha_r}"

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
        dist.barrier()  # both ranks done before either tears its process group down
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_distributed_gather_equals_single_process():
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, _free_port()), nprocs=2, join=True)


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
