"""The steady-state training step on the CUDA path makes no host sync (fake CUDA tensors, no GPU).

bench/step_trace.py runs the real parts of a step (build_training on device ``cuda``: the Kornia
augmentation, the encoder under bf16 autocast, the SimMER loss, fused Adam) on fake CUDA tensors,
and the backward pass and probe update on CPU tensors counted as device ops (autograd's engine
needs a real CUDA context). Launch budgets pin today's counts (docs/BENCHMARKS.md) with headroom.
"""
from __future__ import annotations

import pytest

from bench.step_trace import REGIONS, trace_device_regions, trace_step

pytestmark = pytest.mark.timeout(300)
BUDGET = {"augment": 260, "forward": 130, "loss": 170, "backward": 120, "optimiser": 4, "probe": 20}


@pytest.fixture(scope="module")
def regions() -> dict[str, dict]:
    return trace_step("resnet18", batch_size=512, K=4, proj_dim=2048, image_size=32)


def test_no_region_of_the_step_waits_for_the_device(regions):
    assert tuple(regions) == REGIONS
    assert {region: figures["syncs"] for region, figures in regions.items() if figures["syncs"]} == {}


def test_launches_per_region_stay_within_budget(regions):
    launches = {region: figures["launches"] for region, figures in regions.items()}
    assert all(launches[region] > 0 for region in REGIONS), launches
    assert {r: n for r, n in launches.items() if n > BUDGET[r]} == {}, launches


def test_the_trace_sees_the_sync_of_the_exact_svd():
    """The reference rank term (svdvals) reads cuSOLVER's status on the host: the trace must say so."""
    trace = trace_device_regions("test_resnet", batch_size=32, K=2, proj_dim=64, image_size=16,
                                 extra=("--cfg.svd=svdvals",))
    assert [(region, op) for region, op, _ in trace.syncs] == [("loss", "aten._linalg_svd.default")]
