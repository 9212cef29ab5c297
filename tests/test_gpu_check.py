"""bench/gpu_check.py on the CPU with tiny settings: every figure measured, the projection consistent."""
from __future__ import annotations

import json
import math

import pytest

from bench.gpu_check import STAGES, main, project

pytestmark = pytest.mark.timeout(300)
TINY = ["--gpu.device=cpu", "--gpu.arch=test_resnet", "--gpu.batch_size=8", "--gpu.K=2", "--gpu.proj_dim=32",
        "--gpu.image_size=16", "--gpu.images=48", "--gpu.steps=2", "--gpu.warmup=1", "--gpu.compile=0"]


def _positive(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_tiny_cpu_check_measures_every_stage_and_projects_the_run(tmp_path, capsys):
    out = tmp_path / "check.json"
    returned = main([*TINY, f"--gpu.out={out}", "--gpu.epochs=10", "--gpu.train_images=80", "--gpu.knn_every=5"])
    written = json.loads(out.read_text())
    assert written["device"] == "cpu" and written["settings"]["batch_size"] == 8
    eager = written["eager"]
    assert list(eager["stages_ms"]) == list(STAGES) and all(_positive(ms) for ms in eager["stages_ms"].values())
    assert _positive(eager["step_ms"]) and _positive(eager["cold_s"]) and "compiled" not in written
    assert _positive(written["eager_proj_bf16"]["step_ms"])  # prices the float32 projector tail
    assert _positive(written["loader_ms"]) and _positive(written["probe"]["alone_ms"])
    assert _positive(written["eager_no_probe"]["step_ms"])  # the probe's price inside a step
    assert math.isfinite(written["probe"]["in_step_ms"]) and written["probe"]["spread_ms"] >= 0
    assert set(written["rank_term_ms"]) and all(_positive(ms) for ms in written["rank_term_ms"].values())
    checkpoint = written["checkpoint"]
    assert 0 < checkpoint["blocking_ms"] <= checkpoint["write_ms"] and checkpoint["mb"] > 0
    assert written["knn"]["images"] == 48 + 9 and 0 <= written["knn"]["top1"] <= 1
    projection = written["projection"]
    assert projection["steps_per_epoch"] == 10
    assert projection == pytest.approx(project(returned, returned["settings"]))
    step_s = max(eager["step_ms"], written["loader_ms"]) / 1000
    assert projection["train_s"] == pytest.approx(10 * 10 * step_s)
    knn = written["knn"]
    assert knn["cached"] and knn["first_s"] >= knn["seconds"] > 0
    assert knn["read_s_per_image"] == pytest.approx(written["loader_ms"] / 1000 / 8) and knn["fixed_s"] >= 0
    assert projection["knn_s"] == pytest.approx(knn["fixed_s"] + (knn["read_s_per_image"] + 2 * knn["s_per_image"]) * 60000)
    assert knn["fixed_s"] <= knn["first_s"]  # start-up costs are counted once, not scaled by the image count
    health = written["health"]
    assert _positive(health["embed_ms"]) and _positive(health["figures_ms"]) and written["log_sync_ms"] >= 0
    assert health["ms"] == pytest.approx(health["embed_ms"] + health["figures_ms"]) and health["dim"] == 32
    assert set(health["singular_values_ms"]) == {"svdvals", "gram_eigvalsh_float64"}
    assert all(_positive(ms) for ms in health["singular_values_ms"].values())
    assert projection["health_s"] == pytest.approx(10 * health["ms"] / 1000)
    assert projection["probe_s"] == pytest.approx(10 * 10 * max(0.0, written["probe"]["in_step_ms"]) / 1000)
    assert projection["monitors_share"] == pytest.approx(
        (projection["health_s"] + projection["probe_s"] + projection["log_sync_s"]) / projection["total_s"])
    assert written["loader_check"] == {"passes": 3, "images_compared": 3 * (48 + 9), "mismatches": 0}
    assert projection["total_s"] == pytest.approx(sum(projection[k] for k in (
        "train_s", "compile_s", "checkpoints_s", "health_s", "log_sync_s", "knn_s")))
    table = capsys.readouterr().out
    assert "step, eager (steady state)" in table and "projected run: 10 epochs x 10 steps" in table
    assert "the float32 tail (cfg.proj_fp32=1): eager step" in table
