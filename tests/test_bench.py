"""bench/throughput.py: the real entry point in process, tiny sizes; checks the JSON it writes.

No timing assertions: speed claims live in the benchmark's output, never in timed tests.
"""
from __future__ import annotations

import json
import math

import pytest

from bench.throughput import QUICK, QUICK_SIZES, STAGES, _device_batch_rate, main, resolve
from core.config import ConfigError, parse_config, run_cli
from data_prep.sources import load_synthetic

pytestmark = pytest.mark.timeout(300)


def _rows(result: dict) -> list[dict]:
    return result.get("rows", [])


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_quick_run_measures_every_stage_and_writes_ratios(tmp_path):
    out = tmp_path / "b.json"
    returned = main(["--bench.quick=1", f"--bench.out={out}"])
    written = json.loads(out.read_text())
    assert written["stages"].keys() == set(STAGES) == returned["stages"].keys()
    assert written["device"] == "cpu" and written["settings"]["quick"] is True
    assert {key: written["settings"][key] for key in QUICK} == QUICK
    assert {key: written["settings"][key] for key in QUICK_SIZES} == QUICK_SIZES
    for stage, result in written["stages"].items():
        assert _rows(result), stage
        for row in _rows(result):
            assert _positive(row["images_per_s"]) and _positive(row["ms"]), (stage, row)
            assert row["role"] in ("ours", "baseline", "variant", "part"), row
    for stage in ("loader", "augment"):  # each against its baseline
        roles = [row["role"] for row in _rows(written["stages"][stage])]
        assert roles == ["ours", "baseline"], (stage, roles)
        assert _positive(written["ratios"][stage])
        ours, baseline = _rows(written["stages"][stage])
        assert written["ratios"][stage] == pytest.approx(ours["images_per_s"] / baseline["images_per_s"])
    assert all(_positive(value) for value in written["ratios"].values())
    assert {"loss_compiled_k2", "loss_compiled_k3", "model_channels_last"} <= written["ratios"].keys()
    e2e = _rows(written["stages"]["end_to_end"])[0]
    assert e2e["name"].startswith("pretrain()") and _positive(e2e["cifar10_800_epochs_h"])


def test_selected_stages_only_and_default_out_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = main(["--bench.quick=1", "--bench.stages=augment"])
    written = json.loads((tmp_path / "runs" / "bench" / "throughput_cpu.json").read_text())
    assert list(written["stages"]) == list(result["stages"]) == ["augment"]
    assert set(written["ratios"]) == {"augment"}


def test_quick_leaves_the_flags_given_alone(tmp_path):
    out = tmp_path / "b.json"
    main(["--bench.quick=1", "--bench.stages=augment,loss", "--bench.batch_size=16", "--bench.K=3", f"--bench.out={out}"])
    written = json.loads(out.read_text())
    assert written["settings"]["batch_size"] == 16 and written["settings"]["K"] == 3
    assert written["settings"]["images"] == QUICK["images"] and written["settings"]["loss_Ks"] == [3]
    assert [row["setting"] for row in _rows(written["stages"]["augment"])] == ["B=16, K=3, on cpu", "B=16, K=3, 1 worker(s)"]
    assert [row["setting"] for row in _rows(written["stages"]["loss"])][:2] == ["K=3, B=16, D=64"] * 2
    assert set(written["ratios"]) == {"augment", "loss_compiled_k3"}


def test_device_fed_step_runs_the_trainers_step():
    """The GPU-only end-to-end row (``bench.device_batches``), run here on the CPU at the quick sizes."""
    given: set[str] = set()
    settings = resolve(parse_config(["--bench.quick=1"], "", ["bench"], explicit=given)["bench"], given)
    source, _ = load_synthetic(settings.model_batch, 10, size=32, seed=0)
    seconds, cold = _device_batch_rate(settings, source)
    assert _positive(seconds) and _positive(cold)


@pytest.mark.parametrize("argv, message", [
    (["--bench.stages=loader,bogus"], "'bogus'"),
    (["--bench.stages=,"], "(none given)"),
    (["--bench.K=1"], "--bench.K"),
    (["--bench.arch=not_a_model"], "not_a_model"),
    (["--bench.typo=1"], None),
])
def test_bad_arguments_are_one_clear_error(argv, message, tmp_path, capsys):
    args = ["--bench.quick=1", f"--bench.out={tmp_path / 'b.json'}", *argv]
    if message is None:  # an undeclared flag
        assert run_cli(main, args) == 2
        assert capsys.readouterr().err.startswith("error: unknown argument(s): --bench.typo=1")
        return
    with pytest.raises(ConfigError, match="bench"):
        main(args)
    assert run_cli(main, args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "b.json").exists()
