"""Evaluation protocols (kNN, linear, fine-tune) and the report, on tiny real betons and checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from data_fixtures import tiny_args
from eval.finetune import main as finetune_main
from eval.knn import main as knn_main
from eval.linear import main as linear_main
from eval.report import write_report
from core.config import parse_config, run_cli
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(300)
FAST = ["--eval.progress=0", "--data.num_workers=1", "--eval.device=cpu"]


@pytest.fixture(scope="module")
def run_dir(betons, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pretrained") / "run"
    pretrain_main(tiny_args(betons, folder, "--run.knn_every=1"))
    return folder


def data_args(betons: dict[str, Path]) -> list[str]:
    return [f"--data.train_beton={betons['train']}", f"--data.test_beton={betons['test']}"]


def test_knn_linear_finetune_on_a_checkpoint_write_their_json(betons, run_dir):
    checkpoint = f"--eval.checkpoint={run_dir / 'checkpoints' / 'last.pt'}"
    base = [checkpoint, *data_args(betons), *FAST]
    outcomes = {
        "knn": knn_main(base + ["--knn.k=10"]),
        "linear_cached": linear_main(base + ["--linear.mode=cached", "--linear.epochs=3"]),
        "linear_augment": linear_main(base + ["--linear.epochs=2", "--linear.batch_size=32"]),
        "finetune": finetune_main(base + ["--finetune.epochs=1", "--finetune.batch_size=32"]),
    }
    for protocol, results in outcomes.items():
        written = json.loads((run_dir / f"eval_{protocol}.json").read_text())  # default: inside the run directory
        assert written["top1"] == pytest.approx(results["top1"]) and 0.0 <= written["top1"] <= 1.0
        assert written["top1"] <= written["top5"] <= 1.0
        assert written["checkpoint"].endswith("last.pt") and written["arch"] == "test_resnet"
    assert outcomes["linear_augment"]["optimizer"] == "LARS" and outcomes["linear_augment"]["batch_size"] == 32
    assert outcomes["finetune"]["labelled_images"] == 96


@pytest.mark.parametrize("protocol", ["linear", "finetune"])
def test_protocols_train_on_every_labelled_image_each_epoch(betons, run_dir, tmp_path, monkeypatch, protocol):
    """96 images at batch 40: two full batches and one of 16 each epoch, none dropped."""
    import eval.finetune
    import eval.linear
    module, name = (eval.linear, "train_with_augmentation") if protocol == "linear" else (eval.finetune, "finetune")
    original, seen = getattr(module, name), []

    def counting(setup, *args, **kwargs):
        hook = setup.backbone.register_forward_pre_hook(lambda _, inputs: seen.append(len(inputs[0])))
        try:
            return original(setup, *args, **kwargs)
        finally:
            hook.remove()
    monkeypatch.setattr(module, name, counting)
    main = linear_main if protocol == "linear" else finetune_main
    main([f"--eval.checkpoint={run_dir / 'checkpoints' / 'last.pt'}", *data_args(betons), *FAST,
          f"--{protocol}.epochs=2", f"--{protocol}.batch_size=40", f"--eval.out={tmp_path / 'out.json'}"])
    assert seen == [40, 40, 16] * 2


@pytest.mark.parametrize("mode", ["cached", "augment"])
def test_linear_reaches_100_percent_on_separable_classes(separable_betons, tmp_path, mode):
    results = linear_main(["--eval.checkpoint=random", "--cfg.arch=test_resnet", f"--linear.mode={mode}",
                           "--linear.epochs=30", "--linear.batch_size=32", f"--eval.out={tmp_path / 'linear.json'}",
                           *data_args(separable_betons), *FAST])
    assert results["top1"] >= 0.95
    assert json.loads((tmp_path / "linear.json").read_text())["protocol"] == f"linear_{mode}"


def test_finetune_reaches_100_percent_on_separable_classes(separable_betons, tmp_path):
    results = finetune_main(["--eval.checkpoint=random", "--cfg.arch=test_resnet", "--finetune.epochs=15",
                             "--finetune.batch_size=16", f"--eval.out={tmp_path / 'finetune.json'}",
                             *data_args(separable_betons), *FAST])
    assert results["top1"] >= 0.95


def test_random_baseline_writes_to_its_own_folder(betons, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = knn_main(["--eval.checkpoint=random", "--cfg.arch=test_resnet", "--knn.k=5", *data_args(betons), *FAST])
    assert results["checkpoint"] == "random" and 0.0 <= results["top1"] <= results["top5"] <= 1.0
    assert results["top1"] * 48 == pytest.approx(round(results["top1"] * 48), abs=1e-6)  # a count of 48 queries
    assert json.loads((tmp_path / "runs" / "random_test_resnet" / "eval_knn.json").read_text())["k"] == 5


def test_default_hyper_parameters_are_the_papers():
    config = parse_config([], "", ("knn", "linear", "finetune"))
    assert config["knn"] == {"k": 200, "temperature": 0.1}
    linear = config["linear"]
    assert (linear["epochs"], linear["batch_size"], linear["lr"], linear["weight_decay"], linear["momentum"]) == (90, 4096, 0.1, 0.0, 0.9)
    tune = config["finetune"]
    assert (tune["epochs"], tune["batch_size"], tune["head_lr"], tune["backbone_lr"], tune["momentum"],
            tune["weight_decay"]) == (40, 512, 0.1, 0.001, 0.9, 0.0)
    cfg = parse_config([], "", ("cfg",))["cfg"]
    assert (cfg["arch"], cfg["batch_size"], cfg["K"], cfg["epochs"], cfg["lr"], cfg["weight_decay"], cfg["alpha_h"],
            cfg["alpha_r"], cfg["rank_variant"], cfg["rank_bias"]) == ("resnet18", 512, 4, 800, 1e-3, 1e-6, 0.1, 2e-4, "nuclear", 0)


@pytest.mark.parametrize("main", [knn_main, linear_main, finetune_main])
def test_the_evaluation_tools_take_only_the_flags_they_read(main, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    parameters = capsys.readouterr().out.split("parameters:")[1]
    assert {line.split()[0] for line in parameters.splitlines() if line.startswith("  --data.")} == {
        "--data.train_beton", "--data.test_beton", "--data.num_workers"}
    from train.model import ENCODER_KEYS
    assert {line.split()[0] for line in parameters.splitlines() if line.startswith("  --cfg.")} == {
        f"--cfg.{key}" for key in (*ENCODER_KEYS, "seed")}  # not pretraining's loss or optimiser flags
    assert run_cli(main, ["--data.shots=3"]) == 2
    assert "unknown argument(s): --data.shots=3" in capsys.readouterr().err


def test_bad_checkpoints_are_refused_clearly(betons, run_dir, tmp_path, capsys):
    base = [*data_args(betons), *FAST, f"--eval.out={tmp_path / 'x.json'}"]
    assert run_cli(knn_main, ["--eval.checkpoint=/nowhere/last.pt", *base]) == 2
    assert "checkpoint not found: /nowhere/last.pt" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert run_cli(knn_main, [f"--eval.checkpoint={tmp_path / 'junk.pt'}", *base]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    checkpoint = f"--eval.checkpoint={run_dir / 'checkpoints' / 'last.pt'}"
    assert run_cli(linear_main, [checkpoint, "--cfg.arch=resnet18", *base]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "resnet18" in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_report_writes_readable_pngs(run_dir, betons, tmp_path):
    baseline = tmp_path / "baseline"
    knn_main(["--eval.checkpoint=random", "--cfg.arch=test_resnet", "--knn.k=10", f"--eval.out={baseline / 'eval_knn.json'}",
              *data_args(betons), *FAST])
    written = write_report(run_dir, baseline)
    names = {path.name for path in written}
    assert names == {"losses.png", "knn.png", "lr_throughput.png", "health.png", "spectrum.png", "results.png",
                     "views.png", "embeddings_tsne.png", "retrieval.png"}
    for path in written:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        with Image.open(path) as image:
            image.verify()
    with Image.open(run_dir / "report" / "retrieval.png") as image:  # 8 queries x (1 + 5 neighbours)
        assert image.size[0] > 6 * 60 and image.size[1] > 8 * 60


def test_retrieval_finds_the_images_themselves(tmp_path):
    """With the bank holding the queries, each query's nearest neighbour is itself (similarity 1)."""
    import torch

    from eval.report import Pictures, plot_retrieval

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=generator)
    features = torch.nn.functional.normalize(torch.randn(12, 8, generator=generator), dim=1)
    labels = torch.arange(12) % 3
    pictures = Pictures({}, torch.zeros(3, 4, 4), images, features, labels, images.flip(0), features.flip(0),
                        labels.flip(0), ("a", "b", "c"))
    similarity = pictures.test_features[:8] @ pictures.bank_features.T
    assert similarity.argmax(1).tolist() == [11 - i for i in range(8)]
    figure = plot_retrieval(pictures, tmp_path / "retrieval.png")
    assert all(axes.get_title().startswith("1.00 ✓") for axes in figure.axes[1::6])  # each query found itself first
    with Image.open(tmp_path / "retrieval.png") as image:
        image.verify()
