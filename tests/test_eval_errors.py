"""Evaluation refuses bad input before its work: labels, kNN settings, output paths, report inputs."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.config import run_cli
from data_fixtures import tiny_args
from data_prep.sources import ArraySource
from data_prep.writer import write_betons
import eval.finetune as finetune
import eval.linear as linear
from eval.knn import main as knn_main
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


def test_a_corrupt_label_stops_an_evaluation_that_trains_naming_the_batch(label_betons, tmp_path, capsys, monkeypatch):
    """Fine-tuning trains on batches of a training-mode loader: a label the beton cannot hold stops it
    with one line naming the batch, before cross-entropy sees it (a device-side assert on a GPU)."""
    import data_prep.loader as loader_module
    fetch, fetched = loader_module._fetch, []

    def corrupting(iterator):
        pair = fetch(iterator)
        fetched.append(pair is not None)
        if pair is not None and len(fetched) == 3:  # the third batch read
            pair[1][2] = 140647037747088  # a value seen on a GPU: an address read as a label
        return pair
    monkeypatch.setattr(loader_module, "_fetch", corrupting)
    out = tmp_path / "finetune.json"
    args = [*FAST, *_data(label_betons["train"], label_betons["train"]), f"--eval.out={out}",
            "--finetune.epochs=2", "--finetune.batch_size=8"]
    assert run_cli(finetune.main, args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and not out.exists()
    assert "batch 2 of " in err and "train.beton was decoded with label 140647037747088 at position 2 of the batch " \
        "(the order of epoch 1)" in err
    assert "outside [0, 2)" in err


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
    expected = f"{out} is a folder" if kind == "folder" else f"{tmp_path / 'file'} is a file, not a folder"
    assert expected in err and len(err.splitlines()) == 1
    if kind == "folder":
        assert list(out.iterdir()) == []  # nothing written into it
    else:
        assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("images, batch_size, epochs, steps", [
    (1437, 4096, 90, 90),  # the batch clamped to the set: one step an epoch
    (1437, 1000, 90, 180),  # the short last batch is a step too
    (5000, 4096, 90, 180),
])
def test_linear_protocol_warns_when_it_gets_too_few_steps(images, batch_size, epochs, steps):
    message = linear.too_few_steps(images, batch_size, epochs)
    assert message is not None and f"only {steps} optimiser steps" in message
    for flag in ("--linear.mode=cached", "--linear.batch_size=256", "--linear.lr=1.0", "--linear.epochs="):
        assert flag in message
    # the advice it gives is itself enough
    advised = int(message.split("--linear.epochs=")[1].split()[0])
    assert linear.too_few_steps(images, 256, advised) is None


@pytest.mark.parametrize("images, batch_size, epochs", [
    (50000, 4096, 90),  # SimSiam's CIFAR-10 protocol: 13 x 90 = 1,170 steps
    (1437, 256, 90),  # 6 x 90 = 540
    (1437, 1, 1),
])
def test_linear_protocol_is_silent_with_enough_steps(images, batch_size, epochs):
    assert linear.too_few_steps(images, batch_size, epochs) is None
    assert linear.MIN_STEPS == 500


def test_finetune_steps_count_every_batch_but_a_last_single_image():
    assert finetune.steps_per_epoch(4000, 512) == 8  # seven of 512 and one of 416
    assert finetune.steps_per_epoch(4096, 512) == 8
    assert finetune.steps_per_epoch(513, 512) == 1  # the one-image batch is skipped: BatchNorm
    assert finetune.steps_per_epoch(1, 512) == 0


def test_finetune_warns_when_it_gets_too_few_steps():
    message = finetune.too_few_steps(1437, 512, 40)  # 2 full batches and one of 413 an epoch
    assert message is not None and "only 120 optimiser steps" in message
    assert "--finetune.batch_size=128" in message and "--finetune.epochs=" in message
    assert finetune.too_few_steps(4000, 512, 40) is None  # the paper's 40-shot protocol: 8 x 40 = 320 steps
    assert finetune.too_few_steps(1437, 128, 40) is None
    assert "(1 epoch x 3 batches of 512)" in finetune.too_few_steps(1437, 512, 1)
    small = finetune.too_few_steps(64, 16, 15)  # already a small batch: only more epochs are advised
    assert "--finetune.batch_size=16 --finetune.epochs=50 (200 steps)" in small


def test_the_linear_advice_never_asks_for_a_larger_batch():
    assert "--linear.batch_size=64 --linear.lr=1.0 --linear.epochs=250 (500 steps" in linear.too_few_steps(96, 64, 3)


def test_a_real_small_run_warns_and_a_long_enough_one_does_not(betons, tmp_path):
    data = _data(betons["train"], betons["test"])
    with pytest.warns(UserWarning, match=r"only 3 optimiser steps \(3 epochs x 1 batch of 96, the batch clamped"):
        linear.main([*FAST, *data, "--linear.mode=cached", "--linear.epochs=3", f"--eval.out={tmp_path / 'a.json'}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        linear.main([*FAST, *data, "--linear.mode=cached", "--linear.epochs=6", "--linear.batch_size=1",
                     f"--eval.out={tmp_path / 'b.json'}"])  # 6 x 96 = 576 steps
    assert not [w for w in caught if "optimiser steps" in str(w.message)]
    with pytest.warns(UserWarning, match=r"fine-tuning gets only 1 optimiser steps"):
        finetune.main([*FAST, *data, "--finetune.epochs=1", f"--eval.out={tmp_path / 'c.json'}"])


@pytest.fixture(scope="module")
def run_dir(betons, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report") / "run"
    pretrain_main(tiny_args(betons, folder, "--run.knn_every=1"))
    return folder


def _break(run_dir: Path, tmp_path: Path, what: str) -> tuple[Path, list[str], str]:
    """A copy of ``run_dir`` with one bad input; the report's argv and the name its error must give."""
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    argv = [str(broken)]
    if what in ("test_beton", "train_beton"):
        checkpoint = torch.load(broken / "checkpoints" / "last.pt", weights_only=False)
        checkpoint["config"]["data"][what] = str(tmp_path / f"missing_{what}.beton")
        torch.save(checkpoint, broken / "checkpoints" / "last.pt")
        return broken, argv, f"missing_{what}.beton"
    if what == "baseline":
        return broken, [*argv, "--baseline", str(tmp_path / "no_baseline")], "no_baseline"
    if what == "results":
        (broken / "eval_knn.json").write_text('{"top1": 0.5')
        return broken, argv, "eval_knn.json"
    shutil.rmtree(broken)  # no run directory at all
    return broken, argv, "log.jsonl not found"


@pytest.mark.parametrize("what", ["test_beton", "train_beton", "baseline", "results", "run_dir"])
def test_report_checks_its_inputs_before_drawing(run_dir, tmp_path, capsys, monkeypatch, what):
    import eval.report as report

    def no_drawing(*args, **kwargs):
        raise AssertionError("a plot was drawn although an input is missing")

    for name in ("plot_losses", "plot_lr_throughput", "plot_knn", "plot_health"):
        monkeypatch.setattr(report, name, no_drawing)
    broken, argv, named = _break(run_dir, tmp_path, what)
    assert run_cli(report.main, argv) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.splitlines()) == 1
    assert not (broken / "report").exists()


def test_a_plot_that_fails_leaves_the_previous_report_as_it_was(run_dir, tmp_path, monkeypatch):
    import eval.report as report

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "report").mkdir()
    (copy / "report" / "losses.png").write_bytes(b"the previous report")

    def failing(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(report, "plot_results", failing)  # the last plot
    (copy / "eval_knn.json").write_text(json.dumps({"protocol": "knn", "top1": 0.5}))
    with pytest.raises(RuntimeError, match="drawing failed"):
        report.write_report(copy)
    assert [p.name for p in (copy / "report").iterdir()] == ["losses.png"]  # no new plot
    assert (copy / "report" / "losses.png").read_bytes() == b"the previous report"
    assert not list(copy.glob(".report.*"))  # the drawing folder is gone


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
