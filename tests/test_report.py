"""Images spread over a beton, and the class names kept beside it."""
from __future__ import annotations


import numpy as np
import pytest

from data_prep.convert import convert
from data_prep.sources import ArraySource, DataError
from data_prep.writer import class_names_path, read_class_names, write_betons
from measure.sample import spread_indices

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
