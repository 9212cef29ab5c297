"""Portable weights: train/export.py writes model.safetensors + config.json that plain timm reads back.

Each export is reloaded in a fresh Python process with the documented code (the project README's
recipe, or the export's own README.md) and its features on a fixed input are compared with those of
the backbone in the run's checkpoint.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from augment import CIFAR10_MEAN, CIFAR10_STD
from core.config import run_cli
from data_fixtures import tiny_args
from train.export import load_exported
from train.export import main as export_main
from train.model import build_backbone, build_encoder_from_cfg
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("train", "core", "augment", "data_prep", "eval", "bench")
QUICK = ("--run.knn_every=0", "--run.logger=none", "--cfg.epochs=1")


def _pretrain(betons: dict[str, Path], run_dir: Path, *extra: str) -> Path:
    pretrain_main(tiny_args(betons, run_dir, *QUICK, *extra))
    return run_dir


@pytest.fixture(scope="module")
def finished(betons, tmp_path_factory) -> Path:
    """A complete test_resnet run (deep stem, CIFAR stem at 16 px): backbone.pt and checkpoints/last.pt."""
    return _pretrain(betons, tmp_path_factory.mktemp("finished") / "run")


@pytest.fixture(scope="module")
def stopped(betons, tmp_path_factory) -> Path:
    """A resnet18 run stopped after 1 of 2 epochs: checkpoints/last.pt only."""
    return _pretrain(betons, tmp_path_factory.mktemp("stopped") / "run", "--cfg.arch=resnet18", "--cfg.epochs=2",
                     "--run.stop_after_epochs=1", "--run.steps_per_epoch=2")


@pytest.fixture(scope="module")
def timm_stem(betons, tmp_path_factory) -> Path:
    """A test_resnet run with timm's own stem (--cfg.cifar_stem=0)."""
    return _pretrain(betons, tmp_path_factory.mktemp("timm_stem") / "run", "--cfg.cifar_stem=0",
                     "--run.steps_per_epoch=2")


@pytest.fixture(scope="module")
def no_maxpool(betons, tmp_path_factory) -> Path:
    """timm's stem without its max-pool (--cfg.maxpool=0, the paper's Mini-ImageNet ResNet-18)."""
    return _pretrain(betons, tmp_path_factory.mktemp("no_maxpool") / "run", "--cfg.cifar_stem=0", "--cfg.maxpool=0",
                     "--run.steps_per_epoch=2")


def checkpoint_features(run_dir: Path, images: torch.Tensor) -> torch.Tensor:
    """Features of the backbone in the run's checkpoint, built by the project (eval mode)."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    cfg = checkpoint["config"]["cfg"]
    backbone = build_encoder_from_cfg(cfg, image_size=16).backbone
    backbone.load_state_dict({key.removeprefix("backbone."): value for key, value in checkpoint["model"].items()
                              if key.startswith("backbone.")})
    with torch.no_grad():
        return backbone.eval()(images)


def fixed_images(folder: Path) -> tuple[torch.Tensor, Path]:
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.save(images, folder / "images.pt")
    return images, folder / "images.pt"


def run_fresh(code: str, images_path: Path, folder: Path) -> torch.Tensor:
    """Runs ``code`` (which turns ``images`` into ``features``) in a new Python process outside the repository.

    Fails if the process imported any package of the project: the code must need timm alone.
    """
    script = "\n".join([
        "import sys, torch",
        f"images = torch.load({str(images_path)!r})",
        "with torch.no_grad():",
        *("    " + line for line in code.strip().splitlines()),
        f"torch.save(features, {str(folder / 'features.pt')!r})",
        f"print(sorted({{name.split('.')[0] for name in sys.modules}} & set({PROJECT_PACKAGES!r})))",
    ])
    done = subprocess.run([sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", f"the loading code imported the project: {done.stdout}"
    return torch.load(folder / "features.pt")


def python_block(text: str, after: str) -> str:
    """The first ```python block of ``text`` after the marker ``after``."""
    start = text.index(after)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def export(run_dir: Path, out: Path, *extra: str) -> int:
    return run_cli(export_main, [str(run_dir), "--out", str(out), *extra])


def test_readme_recipe_reloads_a_checkpoint_only_run_in_plain_timm(stopped, tmp_path):
    """resnet18, CIFAR stem, unfinished run: the project README's lines give the checkpoint's features."""
    assert not (stopped / "backbone.pt").exists() and (stopped / "checkpoints" / "last.pt").is_file()
    out = tmp_path / "export"
    assert export(stopped, out) == 0
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    recipe = python_block((REPO / "README.md").read_text(), "**Exporting weights")
    assert "runs/cifar10_simmer/export" in recipe and "import train" not in recipe
    images, images_path = fixed_images(tmp_path)
    features = run_fresh(recipe.replace("runs/cifar10_simmer/export", str(out)), images_path, tmp_path)
    expected = checkpoint_features(stopped, images)
    assert features.shape == (4, 512)
    torch.testing.assert_close(features, expected)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(images), expected)
    with pytest.raises(RuntimeError, match="size mismatch for conv1.weight"):  # plain timm's pretrained=True alone
        timm.create_model(f"local-dir:{out}", pretrained=True)
    config = json.loads((out / "config.json").read_text())
    assert config["simmer"] == dict(cifar_stem=True, maxpool=False, stem="conv1 = nn.Conv2d(3, 64, 3, 1, 1, "
                                    "bias=False); maxpool = nn.Identity()", image_size=16, augment="cifar", epoch=1,
                                    step=2)


def test_finished_run_reloads_with_its_model_card_code(finished, tmp_path):
    """test_resnet has a deep stem (conv1 is a Sequential): the export's README.md names the right module."""
    out = tmp_path / "export"
    assert export(finished, out) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    code = python_block(card, "# ")
    assert "backbone.conv1[0], backbone.maxpool = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.Identity()" in code
    images, images_path = fixed_images(tmp_path)
    features = run_fresh(code.replace("DIR", str(out)), images_path, tmp_path)
    expected = checkpoint_features(finished, images)
    torch.testing.assert_close(features, expected)
    # The finished run's backbone.pt holds the same weights.
    backbone = build_backbone("test_resnet", cifar_stem=True)
    backbone.load_state_dict(torch.load(finished / "backbone.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(images), expected)
    # Plain timm cannot build the CIFAR stem from config.json. A deep stem's first conv keeps its shape, so
    # pretrained=True alone loads without error into timm's stride-2 stem: another network (what the docs warn of).
    wrong = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert not torch.allclose(wrong(images), expected, atol=1e-3)


def test_config_json_has_what_timms_hub_loader_reads(finished, tmp_path):
    out = tmp_path / "export"
    assert export(finished, out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 0
    assert config["num_features"] == build_backbone("test_resnet", True).num_features
    assert config["model_args"]["num_classes"] == 0
    pretrained = config["pretrained_cfg"]
    assert pretrained["input_size"] == [3, 16, 16] and pretrained["num_classes"] == 0
    assert pretrained["mean"] == pytest.approx(CIFAR10_MEAN) and pretrained["std"] == pytest.approx(CIFAR10_STD)
    assert pretrained["crop_pct"] == 1.0 and pretrained["first_conv"] == "conv1.0"
    for inherited in ("tag", "hf_hub_id", "license", "paper_ids", "url"):  # the ImageNet weights' metadata
        assert inherited not in pretrained, inherited
    assert config["simmer"]["cifar_stem"] is True and config["simmer"]["epoch"] == 1
    # timm's own parser (the one behind hf-hub: and local-dir:) reads it ...
    from timm.models._hub import load_model_config_from_path
    parsed, name, model_args = load_model_config_from_path(out)
    assert name == "test_resnet" and parsed["num_classes"] == 0 and model_args["num_classes"] == 0
    # ... and a model created from it carries the preprocessing.
    model = timm.create_model(f"local-dir:{out}")
    assert model.num_classes == 0
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == (3, 16, 16) and tuple(data["mean"]) == pytest.approx(CIFAR10_MEAN)
    assert tuple(data["std"]) == pytest.approx(CIFAR10_STD) and data["crop_pct"] == 1.0


def test_timm_stem_export_loads_with_pretrained_true_alone(timm_stem, tmp_path):
    out = tmp_path / "export"
    assert export(timm_stem, out) == 0
    assert json.loads((out / "config.json").read_text())["simmer"]["cifar_stem"] is False
    code = python_block((out / "README.md").read_text(), "# ")
    assert 'timm.create_model("local-dir:DIR", pretrained=True)' in code and "nn.Conv2d" not in code
    images, images_path = fixed_images(tmp_path)
    features = run_fresh(code.replace("DIR", str(out)), images_path, tmp_path)
    torch.testing.assert_close(features, checkpoint_features(timm_stem, images))


def test_backbone_and_config_yaml_without_checkpoint_and_image_size_fallback(finished, tmp_path, capsys):
    """backbone.pt + config.yaml suffice; a run at the stored size whose beton is gone needs --image_size."""
    run_dir = tmp_path / "moved"
    run_dir.mkdir()
    (run_dir / "backbone.pt").write_bytes((finished / "backbone.pt").read_bytes())
    config = yaml.safe_load((finished / "config.yaml").read_text())
    assert config["cfg"]["image_size"] == 0
    config["data"]["train_beton"] = str(tmp_path / "gone.beton")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "export"
    assert export(run_dir, out) == 2
    assert "--image_size" in capsys.readouterr().err and not out.exists()
    assert export(run_dir, out, "--image_size=16") == 0
    images, _ = fixed_images(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(images), checkpoint_features(finished, images))


@pytest.mark.parametrize("case", ["no_run_dir", "no_checkpoint", "out_is_a_file", "no_config", "broken_checkpoint"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, finished, tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "export"
    if case == "no_checkpoint":
        run_dir.mkdir()
        (run_dir / "log.jsonl").write_text("")
    elif case == "out_is_a_file":
        run_dir = finished
        out.write_text("keep me")
    elif case == "no_config":
        run_dir.mkdir()
        (run_dir / "backbone.pt").write_bytes((finished / "backbone.pt").read_bytes())
    elif case == "broken_checkpoint":
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert export(run_dir, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    expected = {"no_run_dir": "run directory not found", "no_checkpoint": "neither checkpoints/last.pt nor backbone.pt",
                "out_is_a_file": "is a file", "no_config": "config.yaml", "broken_checkpoint": "cannot read checkpoint"}
    assert expected[case] in err[0]
    if case == "out_is_a_file":
        assert out.read_text() == "keep me"
    else:
        assert not out.exists()
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob(".*.tmp"))


def test_push_to_hub_without_token_or_network_stops_with_one_line(finished, tmp_path, capsys, monkeypatch):
    """Offline: no real upload. Without a token nothing is written; a failed upload keeps the local export."""
    import huggingface_hub

    out = tmp_path / "export"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert export(finished, out, "--push_to_hub", "someone/simmer") == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err and not out.exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert export(finished, out, "--push_to_hub", "someone/simmer") == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not out.exists()
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")

    def unreachable(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    assert export(finished, out, "--push_to_hub", "someone/simmer") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot push" in err[0] and "local export is complete" in err[0], err
    assert (out / "model.safetensors").is_file() and 'hf-hub:someone/simmer' in (out / "README.md").read_text()


def test_export_without_the_stem_maxpool_removes_it_after_pretrained_true(no_maxpool, tmp_path):
    """timm's stem, no max-pool: pretrained=True loads the weights (no shape shows the max-pool), the card removes it."""
    out = tmp_path / "export"
    assert export(no_maxpool, out) == 0
    simmer = json.loads((out / "config.json").read_text())["simmer"]
    assert simmer["cifar_stem"] is False and simmer["maxpool"] is False and simmer["stem"] == "maxpool = nn.Identity()"
    code = python_block((out / "README.md").read_text(), "# ")
    assert "pretrained=True" in code and "backbone.maxpool = nn.Identity()" in code and "nn.Conv2d" not in code
    images, images_path = fixed_images(tmp_path)
    expected = checkpoint_features(no_maxpool, images)
    torch.testing.assert_close(run_fresh(code.replace("DIR", str(out)), images_path, tmp_path), expected)
    with torch.no_grad():
        torch.testing.assert_close(load_exported(out)(images), expected)
        kept = timm.create_model(f"local-dir:{out}", pretrained=True).eval()(images)  # the max-pool left in
    assert not torch.allclose(kept, expected, atol=1e-3)


def test_argument_mistakes_of_the_positional_tools_are_one_line(tmp_path, capsys):
    from data_prep.inspect_beton import main as inspect_main
    from eval.report import main as report_main

    for main, argv, message in ((export_main, [], "the following arguments are required: run_dir"),
                                (export_main, [str(tmp_path), "--image_size=abc"], "invalid int value: 'abc'"),
                                (export_main, [str(tmp_path), "--ou", "x"], "unrecognized arguments: --ou x"),
                                (inspect_main, [], "the following arguments are required: betons"),
                                (report_main, [str(tmp_path), "--bogus"], "unrecognized arguments: --bogus")):
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("recorded", ["stored_size", "cfg_image_size"])
def test_an_image_size_that_contradicts_the_runs_is_refused(finished, tmp_path, capsys, recorded):
    run_dir = finished
    if recorded == "cfg_image_size":  # the same weights, trained at an explicit cfg.image_size of 16
        run_dir = tmp_path / "explicit"
        run_dir.mkdir()
        (run_dir / "backbone.pt").write_bytes((finished / "backbone.pt").read_bytes())
        config = yaml.safe_load((finished / "config.yaml").read_text())
        config["cfg"]["image_size"] = 16
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "export"
    assert export(run_dir, out, "--image_size=32") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --image_size=32 but the run was trained at ") and "16" in err, err
    assert len(err.splitlines()) == 1 and not out.exists()
    assert export(run_dir, out, "--image_size=16") == 0  # agreeing with the run is fine
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [3, 16, 16]


def test_the_model_card_names_the_licence_the_data_the_runs_results_and_the_citation(finished, tmp_path):
    import os
    import shutil

    from eval.knn import main as knn_main
    from train.export import PAPER_AUTHORS, PAPER_TITLE

    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    knn = knn_main([f"--eval.checkpoint={run_dir / 'checkpoints' / 'last.pt'}", "--eval.device=cpu",
                    "--eval.progress=0", f"--data.train_beton={config['data']['train_beton']}",
                    f"--data.test_beton={config['data']['test_beton']}", "--knn.k=10"])
    (run_dir / "eval_linear_cached.json").write_text(json.dumps({"protocol": "linear_cached", "top1": 0.5,
                                                                  "test_beton": "x/test.beton"}))
    os.utime(run_dir / "eval_linear_cached.json", (1, 1))  # older than the checkpoint
    (run_dir / "eval_broken.json").write_text("{")  # not a figure: left out
    out = tmp_path / "export"
    assert export(run_dir, out) == 0
    card = (out / "README.md").read_text()
    assert "\nlicense: mit\n" in card.split("---")[1]
    assert "## Licence\n\nMIT" in card
    assert "Trained on the beton `train.beton`: 96 images, 16x16 px, 10 classes" in card
    assert f"| knn | {knn['top1']:.2%} | {knn['top5']:.2%} | `test.beton` | these weights |" in card
    assert "| linear_cached | 50.00% |  | `test.beton` | an earlier checkpoint of this run |" in card
    assert "broken" not in card
    assert f"title  = {{{PAPER_TITLE}}}" in card and f"author = {{{PAPER_AUTHORS}}}" in card
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())["preferred-citation"]
    assert citation["title"] == PAPER_TITLE and citation["authors"] == [{"name": PAPER_AUTHORS}]
    assert (REPO / "LICENSE").read_text().startswith("MIT License") and "license: MIT" in (REPO / "CITATION.cff").read_text()
