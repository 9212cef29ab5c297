"""The report's pictures tell the truth: images spread over the beton, the run's own settings and
sources in the titles, class names from the beton's sidecar, and a run on unlabelled images."""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import eval.report as report
from data_fixtures import tiny_args
from data_prep.convert import convert
from data_prep.loader import BetonLoader
from data_prep.sources import ArraySource, DataError
from data_prep.write_beton import main as write_main
from data_prep.writer import class_names_path, read_class_names, write_betons
from measure.features import image_checksums
from measure.sample import spread_indices
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(300)
NAMES = ("apple", "bus", "cat", "dog", "eel")


def _class_by_class(sizes: tuple[int, ...], names: tuple[str, ...] = NAMES) -> ArraySource:
    """8-px images stored class by class (labels sorted), as folder and Mini-ImageNet betons are."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    images = np.random.default_rng(0).integers(0, 256, size=(len(labels), 8, 8, 3), dtype=np.uint8)
    return ArraySource(images, labels, names)


def test_spread_indices_cover_every_class_in_proportion():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])  # sorted, as a folder beton is
    chosen = spread_indices(labels, 40, seed=3)
    assert len(chosen) == 40 and len(set(chosen.tolist())) == 40 and (np.diff(chosen) > 0).all()
    assert np.bincount(labels[chosen]).tolist() == [20, 10, 6, 4]
    assert (spread_indices(labels, 40, seed=3) == chosen).all()  # deterministic from the seed
    assert not (spread_indices(labels, 40, seed=4) == chosen).all()
    within = chosen[labels[chosen] == 0]  # evenly over the class's stretch: one in each run of 5
    assert ((within // 5) == np.arange(20)).all()
    unlabelled = spread_indices(np.full(1000, -1), 10, seed=0)
    assert ((unlabelled // 100) == np.arange(10)).all()
    assert spread_indices(labels, 500).tolist() == list(range(200))  # fewer images than asked: all
    assert np.bincount(labels[spread_indices(labels, 3)], minlength=4).tolist() == [2, 1, 0, 0]  # largest remainder
    hundred = np.repeat(np.arange(100), 5)  # 8 of 100 equal classes: 8 classes, not always the first 8
    drawn = [sorted(hundred[spread_indices(hundred, 8, seed)].tolist()) for seed in range(3)]
    assert all(len(set(classes)) == 8 for classes in drawn) and drawn[0] != list(range(8)) and drawn[0] != drawn[1]


def test_a_class_by_class_beton_is_sampled_across_its_classes_and_keeps_its_names(tmp_path):
    path = tmp_path / "sorted.beton"
    write_betons({path: _class_by_class((40, 40, 40, 40, 40))}, num_workers=1)
    assert json.loads(class_names_path(path).read_text()) == {"classes": list(NAMES)}
    assert read_class_names(path, 5) == NAMES
    everything = BetonLoader(path, 200, train=False, num_workers=1)
    assert set(next(iter(everything)).labels[:32].tolist()) == {0}  # the first images are one class
    images, labels = report.sample_images(path, 50, seed=0, batch_size=32)
    assert images.shape == (50, 3, 8, 8) and np.bincount(labels.numpy()).tolist() == [10] * 5
    chosen = spread_indices(everything.info.labels, 50, 0)
    subset = BetonLoader(path, 32, train=False, num_workers=1, indices=chosen)
    assert len(subset) == 2 and subset.num_samples == 50  # only the 50 chosen images are read
    every_image = next(iter(everything)).images
    assert sorted(image_checksums(images).tolist()) == sorted(image_checksums(every_image[chosen]).tolist())
    again, labels_again = report.sample_images(path, 50, seed=0, batch_size=32)
    assert torch.equal(again, images) and torch.equal(labels_again, labels)
    assert len(set(labels[:10].tolist())) > 1  # shuffled: a first batch (the spectrum's) is not one class


def test_the_sidecar_lives_and_dies_with_its_beton(tmp_path, monkeypatch):
    path = tmp_path / "a.beton"
    write_betons({path: _class_by_class((3, 3))}, num_workers=1)
    assert read_class_names(path, 2) == NAMES  # a sidecar may name more classes than a split holds
    unnamed = ArraySource(np.zeros((6, 8, 8, 3), np.uint8), np.arange(6) % 2, ())
    write_betons({path: unnamed}, num_workers=1)  # rewritten without names: the old names go
    assert not class_names_path(path).exists() and read_class_names(path, 2) is None
    write_betons({path: _class_by_class((3, 3))}, num_workers=1)
    import data_prep.writer as writer

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(writer, "_write_beton", full_disk)
    with pytest.raises(DataError, match="No space left"):
        write_betons({tmp_path / "b.beton": _class_by_class((3, 3))}, num_workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.beton", "a.beton.classes.json"]  # nothing half-written
    class_names_path(path).write_text('{"classes": ["only one"]}')
    with pytest.warns(UserWarning, match="does not name the 2 classes"):
        assert read_class_names(path, 2) is None


def test_a_sidecar_that_cannot_move_into_place_is_named_and_leaves_no_stale_names(tmp_path):
    path = tmp_path / "a.beton"
    write_betons({path: _class_by_class((3, 3))}, num_workers=1)
    import data_prep.writer as writer

    real_replace, calls = writer.os.replace, []

    def replace(source, target):  # the sidecar's rename fails, after its beton's
        calls.append(Path(target).name)
        if Path(target) == class_names_path(path):
            raise OSError(13, "Permission denied")
        real_replace(source, target)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writer.os, "replace", replace)
        target = re.escape(str(class_names_path(path)))
        with pytest.raises(DataError, match=rf"cannot move a\.beton\.classes\.json\.tmp-\d+ to {target}: Permission denied"):
            write_betons({path: _class_by_class((2, 2))}, num_workers=1)
    assert calls == ["a.beton", "a.beton.classes.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.beton"]  # no temporary, no names of the old beton
    assert BetonLoader(path, 4, train=False, num_workers=1).num_samples == 4  # the new beton is in place


def test_a_folders_class_names_are_kept_and_an_unlabelled_folder_has_none(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("zebra", "aardvark"):
            for i in range(2):
                (tmp_path / "root" / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "root" / split / name / f"{i}.png")
    convert("folder", tmp_path / "root", tmp_path / "out", num_workers=1)
    for split in ("train", "test"):
        assert read_class_names(tmp_path / "out" / f"folder_{split}.beton", 2) == ("aardvark", "zebra")
    convert("folder", tmp_path / "root", tmp_path / "out", num_workers=1, unlabelled=True)
    assert not class_names_path(tmp_path / "out" / "folder_train.beton").exists()


LOG = [{"epoch": 1, "loss": 1.0, "tv": 1.0, "entropy": 0.5, "rank": 0.2, "lr": 0.1, "images_per_s": 10.0,
        "knn_top1": 0.2, "zbar_std": 0.1, "zbar_effective_rank": 3.0, "zbar_nn_distance": 0.5, "health_images": 512},
       {"epoch": 2, "loss": 0.8, "tv": 0.8, "entropy": 0.4, "rank": 0.1, "lr": 0.05, "images_per_s": 11.0,
        "knn_top1": 0.3, "zbar_std": 0.1, "zbar_effective_rank": 4.0, "zbar_nn_distance": 0.6, "health_images": 512}]


def test_titles_say_what_was_measured_and_epochs_are_whole(tmp_path):
    health = report.plot_health(LOG, tmp_path / "health.png")
    assert "512 held-out images in eval mode" in health._suptitle.get_text()
    assert "last" not in health._suptitle.get_text() and "collapsed" not in health._suptitle.get_text()
    old = [{k: v for k, v in line.items() if k != "health_images"} for line in LOG]
    assert "last training batch" in report.plot_health(old, tmp_path / "h.png")._suptitle.get_text()
    assert "from epoch 2" in report.health_source([old[0], LOG[1]])
    for figure in (health, report.plot_losses(LOG, tmp_path / "l.png"), report.plot_lr_throughput(LOG, tmp_path / "r.png"),
                   report.plot_knn(LOG, tmp_path / "k.png", {}, 10, 0.07)):
        for axis in figure.axes:
            if axis.get_visible():
                assert all(float(tick).is_integer() for tick in axis.get_xticks()), axis.get_xticks()
    assert "k=10, t=0.07," in report.plot_knn(LOG, tmp_path / "k.png", {}, 10, 0.07).axes[0].get_title()
    vicreg = report.plot_losses(LOG, tmp_path / "v.png", "vicreg", ("invariance", "variance", "covariance"))
    assert [axis.get_title() for axis in vicreg.axes] == ["total loss", "invariance", "variance", "covariance"]


def test_a_missing_baseline_is_not_drawn_as_zero(tmp_path):
    figure = report.plot_results({"knn": {"top1": 0.5}, "linear_cached": {"top1": 0.6}}, {"knn": {"top1": 0.1}},
                                 tmp_path / "results.png")
    axis = figure.axes[0]
    heights = sorted(round(patch.get_height(), 6) for patch in axis.patches)
    assert heights == [10.0, 50.0, 60.0]  # no 0.0 bar for the random encoder's linear protocol
    assert [text.get_text() for text in axis.texts if text.get_text() == "not run"] == ["not run"]


def _pictures(labels: list[int], bank_labels: list[int], features, bank_features, names=NAMES) -> report.Pictures:
    images = torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8)
    bank = torch.zeros(len(bank_labels), 3, 8, 8, dtype=torch.uint8)
    return report.Pictures({}, torch.zeros(3, 4, 4), images, features, torch.tensor(labels), bank, bank_features,
                           torch.tensor(bank_labels), names)


def test_retrieval_names_the_classes_and_marks_each_neighbour(tmp_path):
    features = torch.eye(4)
    bank_features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0.1]]), dim=1)
    pictures = _pictures([0, 1, 2, 3], [0, 1, 3], features, bank_features)
    figure = report.plot_retrieval(pictures, tmp_path / "r.png", queries=4, neighbours=2)
    titles = [(axis.get_title(), axis.title.get_color()) for axis in figure.axes]
    # query "apple": its neighbours are bank images 2 (class dog) then 0 (class apple)
    assert titles[0][0] == "query\napple"
    assert titles[1] == ("1.00 ✗\ndog", "tab:red") and titles[2] == ("0.98 ✓\napple", "tab:green")
    assert titles[3][0] == "query\nbus" and titles[4] == ("1.00 ✓\nbus", "tab:green")
    images = _pictures([-1] * 4, [-1] * 4, features, features, names=())  # unlabelled: the bank is the images
    images.same_images = True
    captions = [axis.get_title() for axis in report.plot_retrieval(images, tmp_path / "u.png", 4, 3).axes]
    assert captions == ["query", "0.00", "0.00", "0.00"] * 4  # never the query itself (1.00)


def test_the_embedding_map_names_classes_and_umap_joins_when_installed(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(30, 8, generator=generator), dim=1)
    pictures = _pictures([i % 3 for i in range(30)], [0], features, features[:1])
    figure = report.plot_embedding_map(pictures, tmp_path / "t.png")
    legend = figure.axes[0].get_legend()
    assert [text.get_text() for text in legend.get_texts()] == ["apple", "bus", "cat"]
    assert "t-SNE of 30 test-set" in figure.axes[0].get_title()
    monkeypatch.setitem(sys.modules, "umap", None)  # not installed: no UMAP map, no error
    assert not report.umap_available()
    fake = types.ModuleType("umap")
    fake.UMAP = lambda n_components, n_neighbors, random_state: types.SimpleNamespace(
        fit_transform=lambda x: x[:, :2])
    monkeypatch.setitem(sys.modules, "umap", fake)
    assert report.umap_available()
    assert "UMAP of 30" in report.plot_embedding_map(pictures, tmp_path / "u.png", "umap").axes[0].get_title()


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory) -> Path:
    """Two epochs on 48 unlabelled 16-px images, with no test beton."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    (folder / "photos").mkdir()
    for index in range(48):
        Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)).save(folder / "photos" / f"{index}.png")
    write_main(["--data.dataset=folder", f"--data.root={folder / 'photos'}", f"--data.out_dir={folder / 'data'}",
                "--data.num_workers=1"])
    betons = {"train": folder / "data" / "folder_train.beton", "test": folder / "data" / "no_test.beton"}
    pretrain_main(tiny_args(betons, folder / "run", "--run.knn_every=0", "--run.health_images=32"))
    return folder / "run"


def test_the_report_of_an_unlabelled_run_draws_what_needs_no_labels(unlabelled_run, monkeypatch):
    drawn = {}
    for name in ("plot_health", "plot_retrieval", "plot_embedding_map"):
        original = getattr(report, name)
        monkeypatch.setattr(report, name, lambda *a, _o=original, _n=name, **k: drawn.setdefault(_n, _o(*a, **k)))
    written = report.write_report(unlabelled_run)
    assert {path.name for path in written} == {"losses.png", "lr_throughput.png", "health.png", "spectrum.png",
                                               "views.png", "embeddings_tsne.png", "retrieval.png"}
    assert "32 held-out images" in drawn["plot_health"]._suptitle.get_text()
    assert "(unlabelled)" in drawn["plot_embedding_map"].axes[0].get_title()
    captions = [axis.get_title() for axis in drawn["plot_retrieval"].axes]
    assert captions[0] == "query" and not any("✓" in c or "✗" in c for c in captions)


def test_the_report_reads_k_and_t_from_the_runs_config(unlabelled_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in LOG))
    config = yaml.safe_load((unlabelled_run / "config.yaml").read_text())
    config["run"].update(knn_k=7, knn_temperature=0.05)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    titles = []
    original = report.plot_knn
    monkeypatch.setattr(report, "plot_knn", lambda *a, **k: titles.append(original(*a, **k).axes[0].get_title()))
    report.write_report(run)
    assert titles == ["kNN monitor (k=7, t=0.05, train set as memory bank)"]
