"""Pretraining under failures: busy run directories, changed resumes, torn logs, signals, full disks.

Each promise of the README's "Failure modes" section, on the real entry point: in process where
that suffices, in real subprocesses where processes, locks and signals are the point.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.config import run_cli
from data_fixtures import SCRIPT_ENV, tiny_args
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("flag, message", [
    ("--cfg.batch_size=8", "cfg.batch_size: checkpoint 16 vs now 8"),
    ("--run.steps_per_epoch=3", "run.steps_per_epoch: checkpoint 0 vs now 3"),
    ("--cfg.warmup_epochs=1", "cfg.warmup_epochs: checkpoint 0.0 vs now 1.0"),
])
def test_resume_that_would_move_the_schedule_is_refused(betons, tmp_path, capsys, flag, message):
    run_dir = tmp_path / "run"
    pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--run.stop_after_epochs=1"))
    config = (run_dir / "config.yaml").read_text()
    capsys.readouterr()
    assert run_cli(pretrain_main, tiny_args(betons, run_dir, "--run.knn_every=0", flag)) == 2
    err = capsys.readouterr().err
    assert message in err and "cannot resume with another schedule or data" in err and len(err.splitlines()) == 1
    assert (run_dir / "config.yaml").read_text() == config
    summary = pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0"))
    assert summary["epochs_done"] == 2 and [line["epoch"] for line in _log(run_dir)] == [1, 2]
    assert _log(run_dir)[-1]["lr"] < 1e-4  # the cosine ended at 0 on its last step


def test_resume_on_another_dataset_is_refused(betons, separable_betons, tmp_path, capsys):
    run_dir = tmp_path / "run"
    pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--run.stop_after_epochs=1"))
    other = [f"--data.train_beton={separable_betons['train']}"]
    assert run_cli(pretrain_main, tiny_args(betons, run_dir, "--run.knn_every=0", *other)) == 2
    assert "data.train_beton: checkpoint" in capsys.readouterr().err


def test_torn_last_log_line_is_dropped_with_a_warning(betons, tmp_path):
    run_dir = tmp_path / "run"
    pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--run.stop_after_epochs=1"))
    with open(run_dir / "log.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "loss": 0.3')  # a crash in the middle of an append
    with pytest.warns(UserWarning, match="last line is incomplete"):
        pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0"))
    assert [line["epoch"] for line in _log(run_dir)] == [1, 2]


def test_a_log_line_that_is_not_a_record_stops_the_resume_with_one_line(betons, tmp_path, capsys):
    run_dir = tmp_path / "run"
    pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--run.stop_after_epochs=1"))
    (run_dir / "log.jsonl").write_text("42\n" + (run_dir / "log.jsonl").read_text())
    capsys.readouterr()
    assert run_cli(pretrain_main, tiny_args(betons, run_dir, "--run.knn_every=0")) == 2
    err = capsys.readouterr().err
    assert err == f"error: {run_dir / 'log.jsonl'}:1: a JSON int, not a record ({{...}}): '42'\n"


def test_an_unwritable_tensorboard_folder_is_refused_with_one_line(betons, tmp_path):
    import tempfile

    prefix = []
    if os.geteuid() == 0:  # root writes through any permission bits: run as nobody
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop it")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    shared = Path(tempfile.mkdtemp(prefix="simmer-tb-"))  # reachable by the unprivileged user as well
    try:
        os.chmod(shared, 0o777)
        for split in ("train", "test"):
            shutil.copy(betons[split], shared / f"{split}.beton")
            os.chmod(shared / f"{split}.beton", 0o644)
        run_dir = shared / "run"
        (run_dir / "tensorboard").mkdir(parents=True)
        os.chmod(run_dir, 0o777)
        os.chmod(run_dir / "tensorboard", 0o555)
        copies = {split: shared / f"{split}.beton" for split in ("train", "test")}
        result = subprocess.run([*prefix, sys.executable, "train/pretrain.py",
                                 *tiny_args(copies, run_dir, "--run.knn_every=0")],
                                cwd=REPO, env=SCRIPT_ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr == (f"error: cannot write TensorBoard's files to {run_dir / 'tensorboard'} "
                                 "(Permission denied); fix it, or pass --run.logger=none\n")
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_stale_checkpoint_temporaries_are_removed_at_start(betons, tmp_path, capsys):
    run_dir = tmp_path / "run"
    pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--run.stop_after_epochs=1"))
    stale = [run_dir / "checkpoints" / ".last.pt.k2j3h4.tmp", run_dir / ".summary.json.x8y9.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)  # what kill -9 during a write leaves
    capsys.readouterr()
    pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0"))
    assert "removed 2 temporary file(s)" in capsys.readouterr().out
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]


@pytest.mark.parametrize("break_it", ["run_dir_is_a_file", "checkpoints_is_a_file"])
def test_unwritable_run_dir_is_refused_before_any_work(betons, tmp_path, capsys, break_it):
    run_dir = tmp_path / "run"
    if break_it == "run_dir_is_a_file":
        run_dir.write_text("not a folder")
    else:
        run_dir.mkdir()
        (run_dir / "checkpoints").write_text("not a folder")
    assert run_cli(pretrain_main, tiny_args(betons, run_dir)) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (run_dir.is_dir() and (run_dir / "log.jsonl").exists())


class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does (``OSError(ENOSPC)``)."""

    def __init__(self, handle, room: int) -> None:
        self.handle, self.room = handle, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)


@pytest.mark.parametrize("how", ["oserror", "torch_unexpected_pos"])
def test_full_disk_during_a_checkpoint_names_the_problem_and_keeps_the_last_one(betons, tmp_path, capsys,
                                                                                monkeypatch, how):
    run_dir = tmp_path / "run"
    pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--run.stop_after_epochs=1"))
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:  # a checkpoint (not the backbone)
            if how == "oserror":
                handle.write(b"\0" * 4096)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, _FullDisk(handle, 4096), *args, **kwargs)  # torch: "unexpected pos"
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    if how == "torch_unexpected_pos":  # no free space left, as on the real full disk
        monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 0))
    capsys.readouterr()
    assert run_cli(pretrain_main, tiny_args(betons, run_dir, "--run.knn_every=0")) == 2
    err = capsys.readouterr().err
    assert f"cannot write checkpoint {run_dir / 'checkpoints' / 'last.pt'} (No space left on device;" in err
    assert "MiB free" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]


def test_a_real_full_disk_during_a_checkpoint_is_one_line_exit_2(betons, tmp_path):
    """On a real, small file system (a tmpfs; needs the right to mount one, else skipped)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run_dir = disk / "run"
        pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--run.stop_after_epochs=1", "--run.probe=0"))
        before = (run_dir / "checkpoints" / "last.pt").read_bytes()
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * (free - 256 * 1024))  # room for the log lines, not a checkpoint
        result = subprocess.run([sys.executable, "train/pretrain.py",
                                 *tiny_args(betons, run_dir, "--run.knn_every=0", "--run.probe=0")],
                                cwd=REPO, env=SCRIPT_ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr[-3000:]
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot write checkpoint {run_dir / 'checkpoints'}")
        assert "No space left on device" in lines[0] and "previous checkpoint is kept" in lines[0], lines
        assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
