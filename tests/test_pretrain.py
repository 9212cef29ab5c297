"""Pretraining end to end: the real CLI entry point on a tiny synthetic beton, in process."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from data_fixtures import TRAIN_TAGS, tiny_args
from data_fixtures import events as tracked_events
from data_fixtures import steps as tracked_steps
from core.config import run_cli
from train.model import apply_cifar_stem
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
LOSS_KEYS = ("loss", "tv", "entropy", "rank")


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_cli_run_writes_log_checkpoint_config_and_timm_backbone(betons, tmp_path, monkeypatch):
    # run.knn_verify: every image and label the monitor evaluates (the last epoch's too) equals the CPU read
    import measure.monitor

    compared, compare = [], measure.monitor.compare_reads
    monkeypatch.setattr(measure.monitor, "compare_reads", lambda *args: (compared.append(len(args[1])), compare(*args)))
    summary = pretrain_main(tiny_args(betons, tmp_path / "run", "--run.knn_verify=1"))
    assert compared == [96, 48] * 2  # both betons, at both epochs' evaluations
    run_dir = tmp_path / "run"
    log = read_log(run_dir)
    assert [line["epoch"] for line in log] == [1, 2]
    for line in log:
        for key in (*LOSS_KEYS, "lr", "images_per_s", "knn_top1", "zbar_std", "zbar_effective_rank", "zbar_nn_distance"):
            assert key in line and isinstance(line[key], float) and math.isfinite(line[key]), key
        assert 0.0 <= line["knn_top1"] <= 1.0
        assert (line["knn_top1"] * 48) == pytest.approx(round(line["knn_top1"] * 48), abs=1e-6)  # a count of 48 queries
        assert line["loss"] == pytest.approx(line["tv"] + 0.1 * line["entropy"] + 2e-4 * line["rank"], rel=1e-4, abs=1e-5)
    assert log[0]["loss"] != log[1]["loss"]
    # No warm-up: a cosine from the peak (1e-3 * 16 / 256) over 12 steps; each line logs its last step's lr.
    peak = 1e-3 * 16 / 256
    assert log[0]["lr"] == pytest.approx(peak * (1 + math.cos(math.pi * 5 / 12)) / 2, rel=1e-6)
    assert log[1]["lr"] == pytest.approx(peak * (1 + math.cos(math.pi * 11 / 12)) / 2, rel=1e-6)
    assert summary["knn_top1"] == log[-1]["knn_top1"] and not summary["interrupted"]
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 2 * (96 // 16)
    assert not any(key.startswith("_orig_mod") for key in checkpoint["model"])
    config_text = (run_dir / "config.yaml").read_text()
    assert config_text.count("test_resnet") == 1
    # what the data really was, from the betons; no conversion-only data.* defaults (cifar10) of write_beton.py
    assert "dataset:" not in config_text and "cifar10" not in config_text
    assert f"#   train: {betons['train']}: dataset train, 96 images, 16x16 px, 10 classes" in config_text
    assert f"#   test: {betons['test']}: dataset test, 48 images, 16x16 px, 10 classes" in config_text
    backbone = apply_cifar_stem(timm.create_model("test_resnet", pretrained=False, num_classes=0))
    backbone.load_state_dict(torch.load(run_dir / "backbone.pt", weights_only=True))
    for name, tensor in backbone.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint["model"][f"backbone.{name}"], msg=name)


def test_warmup_epochs_ramp_the_lr_up_then_decay_it(betons, tmp_path):
    """cfg.warmup_epochs=2 of 3 (6 steps each): 12 steps up to the peak, then a cosine over 6 steps."""
    summary = pretrain_main(tiny_args(betons, tmp_path / "run", "--run.knn_every=0", "--cfg.epochs=3",
                                      "--cfg.warmup_epochs=2"))
    log = read_log(tmp_path / "run")
    assert [line["epoch"] for line in log] == [1, 2, 3] and summary["steps"] == 18 and not summary["interrupted"]
    peak = 1e-3 * 16 / 256
    assert log[0]["lr"] == pytest.approx(peak * 6 / 12, rel=1e-6)  # step 6 of the 12 warm-up steps
    assert log[1]["lr"] == pytest.approx(peak, rel=1e-6)  # the last warm-up step reaches the peak
    assert log[2]["lr"] == pytest.approx(peak * (1 + math.cos(math.pi * 5 / 6)) / 2, rel=1e-6)  # step 5 of 6 down
    for line in log:
        for key in LOSS_KEYS:
            assert math.isfinite(line[key]), key
    assert "warmup_epochs: 2.0" in (tmp_path / "run" / "config.yaml").read_text()


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


def test_resume_is_exact(betons, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain_main(tiny_args(betons, straight, "--run.knn_every=0"))
    first = pretrain_main(tiny_args(betons, resumed, "--run.knn_every=0", "--run.stop_after_epochs=1"))
    assert first["interrupted"] and len(read_log(resumed)) == 1
    assert not (resumed / "backbone.pt").exists()
    pretrain_main(tiny_args(betons, resumed, "--run.knn_every=0"))
    for a, b in zip(read_log(straight), read_log(resumed), strict=True):
        assert a["epoch"] == b["epoch"]
        for key in LOSS_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    straight_weights, resumed_weights = _weights(straight), _weights(resumed)
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def _script(args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "NUMBA_THREADING_LAYER": "omp", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "train" / "pretrain.py"), *args], cwd=cwd, env=env, text=True, **popen)


def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly_with_every_step_logged_once(betons, tmp_path):
    """SIGTERM mid-epoch: the step finishes, a checkpoint is written, exit 0; the resume equals a
    straight run (losses, the probe's figures, weights), and TensorBoard holds every step once.

    All runs are subprocesses so that they share one numerical environment (thread pools).
    """
    run_dir = tmp_path / "run"
    args = tiny_args(betons, run_dir, "--run.knn_every=2", "--run.progress=1", "--run.log_every=1")  # 2 epochs of 6 steps
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout_path, "w") as out, open(stderr_path, "w") as stderr:
        process = _script(args, tmp_path, stdout=out, stderr=stderr)
        deadline = time.time() + 120
        while time.time() < deadline and "training epochs 1-2 of 6 steps" not in stdout_path.read_text():
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # the step under way finishes, then the run stops
        process.wait(timeout=120)
    stdout = stdout_path.read_text()
    assert process.returncode == 0, stderr_path.read_text()[-2000:]
    stopped = re.search(r"stopped in epoch 1 after step (\d)/6", stdout)
    assert stopped, stdout
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["batch_in_epoch"] == int(stopped.group(1)) < 6
    assert not (run_dir / "log.jsonl").read_text()
    resume = _script(args, tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    straight = _script(tiny_args(betons, tmp_path / "straight", "--run.knn_every=2"), tmp_path,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed_out, _ = resume.communicate(timeout=200)
    assert resume.wait() == 0 and straight.wait(timeout=200) == 0
    assert f"resuming {run_dir / 'checkpoints' / 'last.pt'} at epoch 1, step {int(stopped.group(1)) + 1}" in resumed_out
    resumed, straight_log = read_log(run_dir), read_log(tmp_path / "straight")
    for line, expected in zip(resumed, straight_log, strict=True):
        assert line["loss"] == pytest.approx(expected["loss"], rel=1e-6, abs=1e-7)
        # the online probe's counts of the steps before the stop were carried in the mid-epoch checkpoint
        assert line["probe_train_top1"] == expected["probe_train_top1"]
    for name, tensor in _weights(tmp_path / "straight").items():
        torch.testing.assert_close(_weights(run_dir)[name], tensor, rtol=1e-6, atol=1e-7, msg=name)

    events = tracked_events(run_dir)
    for tag in TRAIN_TAGS:
        assert tracked_steps(events, tag) == list(range(1, 13)), tag
    assert tracked_steps(events, "epoch/loss") == [6, 12]
    assert tracked_steps(events, "epoch/knn_top1") == [12]
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



def test_health_figures_come_from_the_held_out_images_in_eval_mode(betons, tmp_path):
    """RankMe's protocol: the figures are those of the final encoder on fixed test images, so the
    effective rank is not bounded by the batch (4 here) as a training batch's zbar is."""
    from augment import build_eval_transform, resolve_preset
    from core.config import parse_config
    from data_prep.loader import BetonLoader, inspect_beton
    from measure.features import embed_images
    from train.checkpoint import load_checkpoint
    from train.model import build_encoder_from_cfg
    from measure.health import health, held_out_images

    args = tiny_args(betons, tmp_path / "run", "--run.knn_every=0", "--cfg.epochs=1", "--run.logger=none",
                     "--cfg.proj_dim=64", "--run.health_images=40", "--cfg.batch_size=4", "--run.steps_per_epoch=4")
    pretrain_main(args)
    line = read_log(tmp_path / "run")[-1]
    config = parse_config(args, "", ("cfg", "data", "run"))
    size = inspect_beton(betons["test"]).fixed_size[0]
    images = held_out_images(config["data"], 40, size, torch.device("cpu"))
    every = torch.cat([batch.images for batch in BetonLoader(betons["test"], 48, train=False, num_workers=1)])
    spaced = np.unique(np.linspace(0, 47, 40).round().astype(np.int64))  # 40 evenly spaced of the 48
    assert images.dtype == torch.uint8 and torch.equal(images, every[spaced])
    encoder = build_encoder_from_cfg(config["cfg"], size)
    encoder.load_state_dict(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"])
    expected = health(embed_images(encoder, images, build_eval_transform(resolve_preset("auto", size)), 512))
    assert line["health_images"] == 40
    for key in ("zbar_std", "zbar_effective_rank", "zbar_nn_distance"):
        assert line[key] == pytest.approx(expected[key], rel=1e-4), key
    assert line["zbar_effective_rank"] > 4  # more than a batch of 4 can show
    pretrain_main(tiny_args(betons, tmp_path / "batch", "--run.knn_every=0", "--cfg.epochs=1", "--run.logger=none",
                            "--cfg.proj_dim=64", "--run.health_images=0", "--cfg.batch_size=4", "--run.steps_per_epoch=4"))
    old_style = read_log(tmp_path / "batch")[-1]
    assert "health_images" not in old_style and old_style["zbar_effective_rank"] <= 4


def test_collapse_is_flagged_without_entropy_and_rank(betons, tmp_path):
    # lr 0.05, 30 epochs: with seeds 0 and 1 the collapsing run ends at 35 % and 27 % of its peak
    # effective rank and the default at 100 % and 91 % (the flag is at 40 %).
    common = ("--run.knn_every=0", "--cfg.epochs=30", "--cfg.lr=0.05", "--run.logger=none", "--run.probe=0")
    with pytest.warns(UserWarning, match="collapsed .*check cfg.alpha_h / cfg.alpha_r"):
        pretrain_main(tiny_args(betons, tmp_path / "collapse", *common, "--cfg.alpha_h=0", "--cfg.alpha_r=0"))
    assert not read_log(tmp_path / "collapse")[0]["collapsed"]
    pretrain_main(tiny_args(betons, tmp_path / "default", *common))
    collapsed, healthy = read_log(tmp_path / "collapse")[-1], read_log(tmp_path / "default")[-1]
    assert collapsed["collapsed"] and not healthy["collapsed"]
    assert healthy["zbar_effective_rank"] > 1.5 * collapsed["zbar_effective_rank"]


@pytest.mark.parametrize("flag, message", [
    ("--cfg.K=1", "--cfg.K='1' is invalid: expected an integer >= 2"),
    ("--cfg.K=4.7", "--cfg.K='4.7' is invalid: expected an integer >= 2"),
    ("--cfg.batch_size=1", "--cfg.batch_size='1' is invalid: expected an integer >= 2"),
    ("--cfg.lr=nan", "--cfg.lr='nan' is invalid: expected a finite number > 0"),
    ("--cfg.lr=inf", "--cfg.lr='inf' is invalid"),
    ("--cfg.weight_decay=nan", "--cfg.weight_decay='nan' is invalid: expected a finite number >= 0"),
    ("--cfg.warmup_epochs=nan", "--cfg.warmup_epochs='nan' is invalid"),
    ("--cfg.alpha_h=nan", "--cfg.alpha_h='nan' is invalid"),
    ("--run.knn_k=-5", "--run.knn_k='-5' is invalid: expected an integer >= 1"),
    ("--run.knn_temperature=0", "--run.knn_temperature='0' is invalid: expected a finite number > 0"),
    ("--cfg.rank_bias=2", "--cfg.rank_bias='2' is invalid: expected 0 or 1"),
    ("--cfg.rank_variant=trace", "cfg.rank_variant='trace' is invalid"),
    ("--cfg.arch=resnet_of_dreams", "not a timm model"),
    ("--cfg.arch=vit_tiny_patch16_224", "cfg.arch='vit_tiny_patch16_224' cannot take 16-px images (Input height (16)"),
    ("--data.train_beton=/nonexistent/x.beton", "beton not found"),
    ("--run.device=tpu", "run.device='tpu' is invalid"),
])
def test_bad_configs_fail_before_any_work(betons, tmp_path, capsys, flag, message):
    assert run_cli(pretrain_main, tiny_args(betons, tmp_path / "run", flag)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content, message", [
    (b"cfg:\n  K: 4.7\n", "--cfg.K=4.7 is invalid: expected an integer >= 2"),  # the same rule as the flag
    (b"cfg:\n  lr: .nan\n", "--cfg.lr=nan is invalid"),
    (b"cfg:\n  arch: r\xe9snet\n", "is not UTF-8 text"),
    (b"cfg:\n  K:\n", "cfg.K has no value"),  # an empty value is not the default
    (b"cfg:\n  lr: ~\n  K: 4\n", "cfg.lr has no value"),
    (b"run:\n  dir:\ncfg:\n  proj_dim:\n", "cfg.proj_dim, run.dir have no value"),
    (b"cfg:\n  arch: ''\n", "--cfg.arch='' is invalid: expected a non-empty string"),
    (b"cfg:\n  lr: 0.1\n   K: 3\n", "is not valid YAML: line 3, column 5: mapping values are not allowed here"),
    (b"cfg:\n  lr: [0.1\n", "is not valid YAML: line 3, column 1: expected ',' or ']'"),
    (b"cfg:\n\tlr: 1\n", "is not valid YAML: line 2, column 1: found character '\\t' that cannot start any token"),
])
def test_bad_yaml_values_are_refused_like_flags(tmp_path, capsys, content, message):
    config = tmp_path / "bad.yaml"
    config.write_bytes(content)
    assert run_cli(pretrain_main, ["-C", str(config), f"--run.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--run.dir="], "--run.dir='' is invalid: expected a non-empty string"),
    (["--run.dir=  "], "--run.dir='  ' is invalid: expected a non-empty string"),
    (["--cfg.lrr=0.1", "--foo"], "unknown argument(s): --cfg.lrr=0.1 (did you mean --cfg.lr?), --foo; see --help"),
    (["--cfg.warm=1"], "unknown argument(s): --cfg.warm=1 (did you mean --cfg.warmup_epochs?)"),  # no abbreviations
    (["configs/demo.yaml"], "configs/demo.yaml (a config file goes after -C)"),
    (["-C"], "argument -C/--config-file: expected one argument"),
])
def test_flag_mistakes_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # an empty run dir would have meant this folder
    assert run_cli(pretrain_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_an_empty_section_is_no_mistake(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("run:\n#  dir: commented out\ncfg:\n  K: 6\n")
    assert pretrain_main(["-C", str(config), "--run.dry_run=1"])["cfg"]["K"] == 6


def test_unknown_yaml_key_and_dry_run(betons, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("cfg:\n  K: 4\n  alpha_hh: 0.1\n")
    assert run_cli(pretrain_main, ["-C", str(bad)]) == 2
    assert "cfg.alpha_hh" in capsys.readouterr().err
    config = pretrain_main(["-C", str(REPO / "configs" / "demo.yaml"), "--cfg.K=10", "--run.dry_run=1"])
    out = capsys.readouterr().out
    assert config["cfg"]["K"] == 10 and "K: 10" in out and "synthetic_train.beton" in out
    assert set(config["data"]) == {"train_beton", "test_beton", "num_workers"}  # write_beton.py's keys do nothing here
    with pytest.raises(SystemExit):
        pretrain_main(["--help"])
    help_text = capsys.readouterr().out
    assert "--data.train_beton" in help_text and "--data.dataset" not in help_text and "--data.shots" not in help_text


def test_a_run_already_past_fewer_epochs_says_it_is_complete(betons, tmp_path, capsys):
    run_dir = tmp_path / "run"
    pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--run.stop_after_epochs=1"))
    capsys.readouterr()
    summary = pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--cfg.epochs=1"))
    out = capsys.readouterr().out
    assert f"{run_dir} is already complete (1/1 epochs)" in out and "training epochs" not in out
    assert summary["epochs_done"] == 1 and summary["steps"] == 6 and (run_dir / "backbone.pt").exists()


def test_incompatible_checkpoint_is_refused_and_k_change_allowed(betons, tmp_path, capsys):
    run_dir = tmp_path / "run"
    pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--run.stop_after_epochs=1"))
    assert run_cli(pretrain_main, tiny_args(betons, run_dir, "--run.knn_every=0", "--cfg.proj_dim=64")) == 2
    assert "another architecture" in capsys.readouterr().err
    summary = pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--cfg.K=3"))
    assert summary["steps"] == 12 and [line["epoch"] for line in read_log(run_dir)] == [1, 2]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(betons, tmp_path, capsys):
    run_dir = tmp_path / "run"
    pretrain_main(tiny_args(betons, run_dir, "--run.knn_every=0", "--run.stop_after_epochs=1"))
    before = (run_dir / "checkpoints" / "last.pt").read_bytes()
    assert run_cli(pretrain_main, tiny_args(betons, run_dir, "--run.knn_every=0", "--cfg.lr=1e30")) == 2
    error = capsys.readouterr().err
    assert "non-finite" in error and "Lower cfg.lr or check cfg.alpha_h / cfg.alpha_r." in error
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == before


def test_cpu_run_of_a_long_config_warns_with_an_estimate(betons, tmp_path):
    with pytest.warns(UserWarning, match=r"would take about [\d.]+ h.*configs/demo.yaml"):
        summary = pretrain_main(tiny_args(betons, tmp_path / "run", "--run.knn_every=0", "--cfg.epochs=200000",
                                          "--run.stop_after_epochs=1"))
    assert summary["interrupted"] and summary["steps"] == 6
