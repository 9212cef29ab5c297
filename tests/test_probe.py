"""The online linear probe: it learns, it never touches the encoder, it is logged and resumed."""
from __future__ import annotations

import json

import pytest
import torch

from data_fixtures import tiny_args
from train.pretrain import main as pretrain_main
from train.probe import OnlineProbe

pytestmark = pytest.mark.timeout(300)


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_probe_learns_separable_features_and_counts_its_training_accuracy():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(512) % 4
    centres = torch.randn(4, 32, generator=generator) * 3
    features = centres[labels] + torch.randn(512, 32, generator=generator)
    probe = OnlineProbe(32, 4, lr=1e-2)
    assert probe.train_top1() is None
    for start in range(0, 512 * 20, 64):
        index = torch.arange(start, start + 64) % 512
        probe.update(features[index], labels[index])
    assert probe.seen == 512 * 20 and 0.5 < probe.train_top1() <= 1.0
    assert probe.top1(features, labels) >= 0.95
    probe.reset()
    assert probe.train_top1() is None and probe.seen == 0


def test_probe_gradients_never_reach_the_features():
    layer = torch.nn.Linear(8, 16)
    probe = OnlineProbe(16, 3)
    probe.update(layer(torch.randn(10, 8)), torch.randint(0, 3, (10,)))
    assert layer.weight.grad is None and probe.head.weight.grad is not None


def test_pretraining_is_the_same_with_and_without_the_probe(betons, tmp_path):
    with_probe = pretrain_main(tiny_args(betons, tmp_path / "probe", "--run.knn_every=2", "--run.steps_per_epoch=3"))
    without = pretrain_main(tiny_args(betons, tmp_path / "plain", "--run.knn_every=2", "--run.probe=0",
                                      "--run.steps_per_epoch=3"))
    probed, plain = _log(tmp_path / "probe"), _log(tmp_path / "plain")
    for a, b in zip(probed, plain, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)
    assert with_probe["knn_top1"] == pytest.approx(without["knn_top1"])
    assert all(0 <= line["probe_train_top1"] <= 1 for line in probed)
    assert "probe_test_top1" not in probed[0] and 0 <= probed[1]["probe_test_top1"] <= 1  # at the kNN cadence
    assert not any(key.startswith("probe") for line in plain for key in line)
    checkpoint = torch.load(tmp_path / "probe" / "checkpoints" / "last.pt", weights_only=False)
    assert checkpoint["probe"]["head"]["weight"].shape == (10, 96)  # test_resnet: 96 features, 10 classes
    assert checkpoint["probe"]["head"]["weight"].abs().sum() > 0
    assert torch.load(tmp_path / "plain" / "checkpoints" / "last.pt", weights_only=False)["probe"] is None
