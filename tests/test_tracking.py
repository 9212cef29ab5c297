"""Live tracking: TensorBoard event files read back after runs, kills and resumes; W&B offline.

A SIGTERM and its resume logging every step once: tests/test_pretrain.py (with the resume's exactness)."""
from __future__ import annotations

import time

import pytest
import torch

from core.config import run_cli
from data_fixtures import events as _events
from data_fixtures import steps as _steps
from data_fixtures import tiny_args
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(300)


def test_events_a_killed_run_wrote_after_its_checkpoint_are_dropped(betons, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "run"
    args = tiny_args(betons, run_dir, "--run.knn_every=0", "--run.log_every=1")
    orphans = SummaryWriter(log_dir=str(run_dir / "tensorboard"))  # what a run killed before its first checkpoint left
    for step in (1, 2, 3):
        orphans.add_scalar("train/loss", 1e6, step)
    orphans.close()
    _next_second()
    pretrain_main([*args, "--run.stop_after_epochs=1"])  # a fresh start; checkpoint at step 6
    _next_second()
    orphans = SummaryWriter(log_dir=str(run_dir / "tensorboard"))  # what a run killed in epoch 2 left
    for step in (7, 8, 9):
        orphans.add_scalar("train/loss", 1e6, step)
    orphans.close()
    _next_second()
    pretrain_main(args)
    loss = _events(run_dir).Scalars("train/loss")
    assert [event.step for event in loss] == list(range(1, 13))
    assert max(event.value for event in loss) < 1e3


def _next_second() -> None:
    """Waits into the next whole second, so that the next event file sorts after the last one, as
    a killed run's file and its resume's do. TensorBoard reads a folder's files in name order, and
    names them ``events.out.tfevents.<seconds>.<host>.<pid>.<n>`` with ``n`` counting the process's
    writers unpadded: two writers of one process in the same second, ``n`` 9 and 10, sort wrongly."""
    time.sleep(1.02 - time.time() % 1)


def test_wandb_offline_resume_continues_the_same_run(betons, tmp_path, monkeypatch):
    """W&B's own variables (WANDB_MODE, WANDB_DIR, WANDB_PROJECT) hold where the flags are left empty."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_PROJECT", "from-the-environment")
    import wandb

    real_init, projects = wandb.init, []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: projects.append(kwargs["project"]) or real_init(**kwargs))
    run_dir = tmp_path / "run"
    args = tiny_args(betons, run_dir, "--run.knn_every=0", "--run.logger=tensorboard,wandb")
    pretrain_main([*args, "--run.stop_after_epochs=1"])
    wandb_id = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["wandb_id"]
    assert isinstance(wandb_id, str) and wandb_id
    pretrain_main(args)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["wandb_id"] == wandb_id
    assert not (run_dir / "wandb").exists()
    runs = sorted((tmp_path / "wandb_home" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(path.name.endswith(f"-{wandb_id}") for path in runs)
    assert projects == ["from-the-environment"] * 2
    assert _steps(_events(run_dir), "train/loss")[-1] == 12


def test_no_logger_writes_no_event_files_and_bad_logger_is_refused(betons, tmp_path, capsys, monkeypatch):
    pretrain_main(tiny_args(betons, tmp_path / "quiet", "--run.knn_every=0", "--run.logger=none"))
    assert not (tmp_path / "quiet" / "tensorboard").exists()
    assert run_cli(pretrain_main, tiny_args(betons, tmp_path / "bad", "--run.logger=tensorboard,mlflow")) == 2
    assert "--run.logger='tensorboard,mlflow' is invalid" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # W&B online without credentials: one line before any work (no network is tried)
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    assert run_cli(pretrain_main, tiny_args(betons, tmp_path / "nologin", "--run.logger=wandb")) == 2
    err = capsys.readouterr().err
    assert "W&B is online" in err and "no credentials for api.wandb.ai" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nologin").exists()


def test_a_tracker_that_cannot_start_leaves_no_files(betons, tmp_path, capsys, monkeypatch):
    import wandb

    def unreachable(*args, **kwargs):
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop.\n...")

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr(wandb, "init", unreachable)
    run_dir = tmp_path / "run"
    assert run_cli(pretrain_main, tiny_args(betons, run_dir, "--run.logger=tensorboard,wandb")) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: W&B could not start (Network error (ConnectionError), entering retry loop.); "
                           "track offline with WANDB_MODE=offline, or use --run.logger=tensorboard")
    assert not {"config.yaml", "log.jsonl", "tensorboard"} & {path.name for path in run_dir.iterdir()}
