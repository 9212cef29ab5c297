"""Evaluation refuses bad input before its work: labels, kNN settings, output paths, report inputs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.config import run_cli
from data_fixtures import tiny_args
from data_prep.sources import ArraySource
from data_prep.writer import write_betons
from eval.knn import main as knn_main
from eval.linear import MIN_STEPS, main as linear_main, warn_if_few_steps
from eval.report import write_report
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(300)
FAST = ["--eval.progress=0", "--data.num_workers=1", "--eval.device=cpu", "--eval.checkpoint=random",
        "--cfg.arch=test_resnet"]


def _beton(path: Path, labels: list[int]) -> Path:
    rng = np.random.default_rng(len(labels))
    images = rng.integers(0, 256, size=(len(labels), 16, 16, 3), dtype=np.uint8)
    names = tuple(f"c{i}" for i in range(max(labels) + 1))
    write_betons({path: ArraySource(images, np.asarray(labels), names)}, num_workers=1)
    return path


@pytest.fixture(scope="module")
def label_betons(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("labels")
    return {"train": _beton(folder / "train.beton", [0, 1] * 16),
            "disjoint": _beton(folder / "disjoint.beton", [2, 3] * 8),
            "partial": _beton(folder / "partial.beton", [0, 1, 2, 3] * 4)}


def _data(train: Path, test: Path) -> list[str]:
    return [f"--data.train_beton={train}", f"--data.test_beton={test}"]


def test_test_labels_absent_from_training_are_refused(label_betons, tmp_path, capsys):
    out = tmp_path / "knn.json"
    args = [*FAST, *_data(label_betons["train"], label_betons["disjoint"]), f"--eval.out={out}", "--knn.k=5"]
    assert run_cli(knn_main, args) == 2
    err = capsys.readouterr().err
    assert "none of the labels of" in err and "disjoint.beton (2, 3)" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_some_test_classes_missing_from_training_warn(label_betons, tmp_path):
    with pytest.warns(UserWarning, match=r"2 test class\(es\) of .*partial.beton never occur"):
        results = knn_main([*FAST, *_data(label_betons["train"], label_betons["partial"]),
                            f"--eval.out={tmp_path / 'knn.json'}", "--knn.k=5"])
    assert results["top1"] <= 0.5 + 1e-9  # half the queries are of classes the bank never saw


@pytest.mark.parametrize("flag, message", [
    ("--knn.k=0", "--knn.k='0' is invalid: expected an integer >= 1"),
    ("--knn.temperature=0", "--knn.temperature='0' is invalid: expected a finite number > 0"),
    ("--knn.temperature=-1", "--knn.temperature='-1' is invalid"),
])
def test_invalid_knn_settings_are_refused(betons, tmp_path, capsys, flag, message):
    out = tmp_path / "knn.json"
    assert run_cli(knn_main, [*FAST, *_data(betons["train"], betons["test"]), f"--eval.out={out}", flag]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("kind", ["folder", "parent_is_a_file"])
def test_unwritable_output_is_refused_before_the_evaluation(betons, tmp_path, capsys, monkeypatch, kind):
    import eval.knn as knn_module

    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation ran although its output cannot be written")

    monkeypatch.setattr(knn_module, "evaluate_knn", no_work)
    if kind == "folder":
        out = tmp_path / "results"
        out.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "knn.json"
    assert run_cli(knn_main, [*FAST, *_data(betons["train"], betons["test"]), f"--eval.out={out}"]) == 2
    err = capsys.readouterr().err
    assert ("is a folder" if kind == "folder" else "cannot write the results to") in err and "Traceback" not in err


def test_linear_protocol_warns_when_it_gets_too_few_steps(betons, tmp_path):
    assert not warn_if_few_steps(MIN_STEPS, 5000)
    with pytest.warns(UserWarning, match=r"only 90 optimiser steps on 1437 images.*--linear.mode=cached"):
        assert warn_if_few_steps(90, 1437)
    with pytest.warns(UserWarning, match=r"only 3 optimiser steps on 96 images"):  # 96 images, one clamped batch
        linear_main([*FAST, *_data(betons["train"], betons["test"]), "--linear.mode=cached", "--linear.epochs=3",
                     f"--eval.out={tmp_path / 'linear.json'}"])


@pytest.fixture(scope="module")
def run_dir(betons, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report") / "run"
    pretrain_main(tiny_args(betons, folder, "--run.knn_every=1"))
    return folder


def test_report_checks_its_inputs_before_drawing(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "checkpoints" / "last.pt").write_bytes((run_dir / "checkpoints" / "last.pt").read_bytes())
    import torch

    checkpoint = torch.load(broken / "checkpoints" / "last.pt", weights_only=False)
    checkpoint["config"]["data"]["test_beton"] = str(tmp_path / "missing.beton")
    torch.save(checkpoint, broken / "checkpoints" / "last.pt")
    from eval.report import main as report_main

    assert run_cli(report_main, [str(broken)]) == 2
    assert "missing.beton" in capsys.readouterr().err
    assert not (broken / "report").exists()  # nothing drawn


def test_report_reads_a_log_with_a_torn_last_line(run_dir, tmp_path):
    torn = tmp_path / "torn"
    shutil.copytree(run_dir, torn)
    with open(torn / "log.jsonl", "a") as handle:
        handle.write('{"epoch": 3, "loss"')
    with pytest.warns(UserWarning, match="last line is incomplete"):
        written = write_report(torn)
    assert (torn / "report" / "losses.png") in written


def test_an_evaluation_joins_the_runs_tensorboard_curves(betons, run_dir, tmp_path):
    knn_main(["--eval.progress=0", "--data.num_workers=1", "--eval.device=cpu", "--knn.k=10",
              f"--eval.checkpoint={run_dir / 'checkpoints' / 'last.pt'}", *_data(betons["train"], betons["test"]),
              f"--eval.out={tmp_path / 'knn.json'}"])
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    top1 = json.loads((tmp_path / "knn.json").read_text())["top1"]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("eval/knn_top1")] == [(12, top1)]
