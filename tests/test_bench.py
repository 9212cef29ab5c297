"""bench/throughput.py: the real entry point in process, tiny sizes; checks the JSON it writes.

No timing assertions: speed claims live in the benchmark's output, never in timed tests.
"""
from __future__ import annotations

import json
import math

import pytest

import bench.throughput as throughput
from bench.throughput import STAGES, main
from core.config import ConfigError, run_cli

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
    for stage, result in written["stages"].items():
        assert "skipped" not in result, stage
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


def test_missing_ffcv_and_torchvision_skip_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput, "_have", lambda module: False)
    out = tmp_path / "b.json"
    main(["--bench.quick=1", "--bench.stages=loader,augment,end_to_end", f"--bench.out={out}"])
    written = json.loads(out.read_text())
    assert "ffcv" in written["stages"]["loader"]["skipped"]
    assert [row["role"] for row in _rows(written["stages"]["augment"])] == ["ours"]
    assert any("torchvision" in note for note in written["stages"]["augment"]["notes"])
    e2e = _rows(written["stages"]["end_to_end"])
    assert [row["name"].split(":")[0] for row in e2e] == ["device-fed step"] and _positive(e2e[0]["images_per_s"])
    assert "loader" not in written["ratios"] and "augment" not in written["ratios"]


@pytest.mark.parametrize("argv, message", [
    (["--bench.stages=loader,bogus"], "'bogus'"),
    (["--bench.stages=,"], "(none given)"),
    (["--bench.K=1"], "--bench.K"),
    (["--bench.arch=not_a_model"], "not_a_model"),
    (["--bench.typo=1"], None),
])
def test_bad_arguments_are_one_clear_error(argv, message, tmp_path, capsys):
    args = ["--bench.quick=1", f"--bench.out={tmp_path / 'b.json'}", *argv]
    if message is None:  # argparse rejects undeclared flags itself
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        return
    with pytest.raises(ConfigError, match="bench"):
        main(args)
    assert run_cli(main, args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert not (tmp_path / "b.json").exists()
