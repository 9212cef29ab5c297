"""Live tracking: TensorBoard event files read back after runs, signals and resumes; W&B offline."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from core.config import run_cli
from data_fixtures import start_pretraining, tiny_args
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(300)
TRAIN_TAGS = ("train/loss", "train/tv", "train/entropy", "train/rank", "train/lr", "train/images_per_s")


def _events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                                 "histograms": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def _steps(events: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def test_every_step_logged_once_across_a_sigterm_and_a_resume(betons, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out.txt"
    args = tiny_args(betons, run_dir, "--run.knn_every=2", "--run.log_every=1")  # 2 epochs of 6 steps
    process = start_pretraining(args, out)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=200) == 0, out.read_text()
    assert "stopped in epoch" in out.read_text()
    pretrain_main(args)
    events = _events(run_dir)
    for tag in TRAIN_TAGS:
        assert _steps(events, tag) == list(range(1, 13)), tag
    assert _steps(events, "epoch/loss") == [6, 12]
    assert _steps(events, "epoch/knn_top1") == [12]
    assert {"epoch/zbar_effective_rank", "epoch/epoch_seconds", "epoch/images_per_s"} <= set(events.Tags()["scalars"])
    assert events.Tags()["histograms"] == ["epoch/zbar_singular_values"]
    assert not {"epoch/collapsed", "epoch/health_images"} & set(events.Tags()["scalars"])  # flags are not curves
    # the hyperparameters (hparams plugin, the accuracy curves as its metrics) and the config as text
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["cfg.K"].number_value == 2 and start.hparams["cfg.arch"].string_value == "test_resnet"
    assert start.hparams["betons.train.images"].number_value == 96
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert "epoch/knn_top1" in [info.name.tag for info in experiment.metric_infos]
    config_text = events.Tensors("config/text_summary")
    assert len(config_text) == 2 and config_text[0].step == 0 < config_text[1].step  # the fresh start, the resume
    assert "arch: test_resnet" in config_text[-1].tensor_proto.string_val[0].decode()
    assert [image.step for image in events.Images("views")] == [0]  # once, at the start of the run
    views = events.Images("views")[0]
    assert views.width == 8 * 17 + 1 and views.height == 3 * 17 + 1  # 8 images above their K=2 views, 16 px


def test_events_a_killed_run_wrote_after_its_checkpoint_are_dropped(betons, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    run_dir = tmp_path / "run"
    args = tiny_args(betons, run_dir, "--run.knn_every=0", "--run.log_every=1")
    orphans = SummaryWriter(log_dir=str(run_dir / "tensorboard"))  # what a run killed before its first checkpoint left
    for step in (1, 2, 3):
        orphans.add_scalar("train/loss", 1e6, step)
    orphans.close()
    pretrain_main([*args, "--run.stop_after_epochs=1"])  # a fresh start; checkpoint at step 6
    orphans = SummaryWriter(log_dir=str(run_dir / "tensorboard"))  # what a run killed in epoch 2 left
    for step in (7, 8, 9):
        orphans.add_scalar("train/loss", 1e6, step)
    orphans.close()
    pretrain_main(args)
    loss = _events(run_dir).Scalars("train/loss")
    assert [event.step for event in loss] == list(range(1, 13))
    assert max(event.value for event in loss) < 1e3


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
