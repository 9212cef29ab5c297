"""Unlabelled images: written with label -1, pretrained on, with the kNN monitor and probe off."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import run_cli
from data_fixtures import tiny_args
from data_prep.loader import BetonLoader, inspect_beton
from data_prep.write_beton import main as write_main
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(300)


def _images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = folder / (f"sub/img{index:03d}.png" if index % 3 == 0 else f"img{index:03d}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _write(args: list[str], out: Path) -> dict:
    return write_main(["--data.dataset=folder", f"--data.out_dir={out}", "--data.num_workers=1", *args])


def test_a_folder_without_class_folders_is_one_unlabelled_split(tmp_path, capsys):
    _images(tmp_path / "photos", 40)
    written = _write([f"--data.root={tmp_path / 'photos'}"], tmp_path / "out")
    assert list(written) == [str(tmp_path / "out" / "folder_train.beton")] and written[str(tmp_path / "out" / "folder_train.beton")] == 40
    assert "unlabelled images: only" in capsys.readouterr().out
    info = inspect_beton(tmp_path / "out" / "folder_train.beton")
    assert not info.labelled and info.num_classes == 0 and set(info.labels.tolist()) == {-1}
    batch = next(iter(BetonLoader(tmp_path / "out" / "folder_train.beton", 8, train=False)))
    assert batch.labels.tolist() == [-1] * 8


def test_unlabelled_flag_and_file_list(tmp_path, capsys):
    for name in ("cat", "dog"):
        _images(tmp_path / "root" / "train" / name, 6, seed=len(name))
    _write([f"--data.root={tmp_path / 'root'}", "--data.unlabelled=1"], tmp_path / "flag")
    assert set(inspect_beton(tmp_path / "flag" / "folder_train.beton").labels.tolist()) == {-1}
    assert not (tmp_path / "flag" / "folder_test.beton").exists()
    listed = _images(tmp_path / "listed", 9, seed=3)
    (tmp_path / "listed" / "files.txt").write_text("\n".join(str(p.relative_to(tmp_path / "listed")) for p in listed[:7]))
    _write([f"--data.file_list={tmp_path / 'listed' / 'files.txt'}"], tmp_path / "list")
    assert inspect_beton(tmp_path / "list" / "folder_train.beton").num_samples == 7
    (tmp_path / "listed" / "bad.txt").write_text("img001.png\nnope.png\n")
    assert run_cli(write_main, ["--data.dataset=folder", f"--data.file_list={tmp_path / 'listed' / 'bad.txt'}",
                                f"--data.out_dir={tmp_path / 'bad'}"]) == 2
    assert "names 1 missing file(s)" in capsys.readouterr().err and not (tmp_path / "bad" / "folder_train.beton").exists()
    assert run_cli(write_main, ["--data.dataset=folder", f"--data.root={tmp_path / 'photos_missing'}",
                                "--data.unlabelled=1", "--data.shots=2", f"--data.out_dir={tmp_path / 'x'}"]) == 2


def test_pretraining_on_unlabelled_images_switches_the_monitor_and_probe_off(tmp_path, capsys):
    _images(tmp_path / "photos", 48)
    _write([f"--data.root={tmp_path / 'photos'}"], tmp_path / "out")
    betons = {"train": tmp_path / "out" / "folder_train.beton", "test": tmp_path / "out" / "no_test.beton"}
    summary = pretrain_main(tiny_args(betons, tmp_path / "run"))  # kNN every epoch and the probe asked for
    out = capsys.readouterr().out
    assert "is unlabelled: the kNN monitor and the online probe are off" in out
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in log] == [1, 2] and not summary["interrupted"]
    assert not any(key.startswith(("knn", "probe")) for line in log for key in line)
    assert (tmp_path / "run" / "backbone.pt").is_file()


def test_a_file_list_saved_with_a_utf8_bom_is_read(tmp_path):
    listed = _images(tmp_path / "listed", 5)
    names = "\n".join(str(p.relative_to(tmp_path / "listed")) for p in listed)
    (tmp_path / "listed" / "files.txt").write_bytes(b"\xef\xbb\xbf" + names.encode())  # Windows Notepad's UTF-8
    _write([f"--data.file_list={tmp_path / 'listed' / 'files.txt'}"], tmp_path / "out")
    assert inspect_beton(tmp_path / "out" / "folder_train.beton").num_samples == 5


@pytest.fixture(scope="module")
def unlabelled_beton(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unlabelled")
    _images(folder / "photos", 24)
    _write([f"--data.root={folder / 'photos'}"], folder / "out")
    return folder / "out" / "folder_train.beton"


def test_inspect_beton_describes_an_unlabelled_beton(unlabelled_beton, capsys):
    from data_prep.inspect_beton import main as inspect_main

    assert run_cli(inspect_main, [str(unlabelled_beton)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:4] == [str(unlabelled_beton), "24", "none", "unlabelled"]


@pytest.mark.parametrize("protocol", ["knn", "linear", "finetune"])
@pytest.mark.parametrize("which", ["train", "both"])
def test_evaluation_on_an_unlabelled_beton_is_one_line_exit_2(unlabelled_beton, betons, tmp_path, capsys,
                                                              protocol, which):
    import importlib

    main = importlib.import_module(f"eval.{protocol}").main
    test = unlabelled_beton if which == "both" else betons["test"]
    argv = ["--eval.checkpoint=random", "--cfg.arch=test_resnet", "--eval.device=cpu", "--eval.progress=0",
            f"--data.train_beton={unlabelled_beton}", f"--data.test_beton={test}", f"--eval.out={tmp_path / 'r.json'}"]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {unlabelled_beton} is unlabelled (every label -1): evaluation needs labelled training "
                   "and test betons (--data.train_beton, --data.test_beton); pretraining does not\n")
    assert not (tmp_path / "r.json").exists()
