"""The beton data layer: every source written in its real format, converted, and read back."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import (MINI_CLASSES, decode_index, make_cifar10, make_cifar100, make_folder, make_mini_csv,
                           make_mini_pickles)
from data_prep.loader import BetonError, BetonLoader, inspect_beton
from data_prep.sources import ArraySource, DataError, load_synthetic, n_shot_indices
from data_prep.synthetic import make_synthetic
from data_prep.write_beton import main as write_main
from data_prep.writer import write_betons
from core.config import run_cli

# ffcv's writer hangs forever when a worker raises: never let a test wait on it.
pytestmark = pytest.mark.timeout(180)


def read_all(path: Path, image_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every sample of a beton in file order: images (N, H, W, 3) uint8 and labels (N,)."""
    loader = BetonLoader(path, 7, train=False, num_workers=1, image_size=image_size)
    images, labels = [], []
    for batch in loader:
        assert batch.images.dtype == torch.uint8 and batch.labels.dtype == torch.int64
        assert batch.images.is_contiguous(memory_format=torch.channels_last)
        images.append(batch.images.permute(0, 2, 3, 1).numpy().copy())
        labels.append(batch.labels.numpy().copy())
    return np.concatenate(images), np.concatenate(labels)


def no_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.suffix == ".beton" or ".tmp-" in p.name] if directory.exists() else []


@pytest.mark.parametrize("tar", [False, True], ids=["folder", "targz"])
def test_cifar10_round_trip_is_exact(tmp_path, tar):
    truth = make_cifar10(tmp_path / "raw", tar=tar)
    root = tmp_path / "raw" / ("cifar-10-python.tar.gz" if tar else "cifar-10-batches-py")
    written = write_main([f"--data.root={root}", f"--data.out_dir={tmp_path / 'out'}", "--data.download=0",
                          "--data.num_workers=1"])
    assert set(written) == {str(tmp_path / "out" / "cifar10_train.beton"), str(tmp_path / "out" / "cifar10_test.beton")}
    for split in ("train", "test"):
        images, labels = read_all(tmp_path / "out" / f"cifar10_{split}.beton")
        np.testing.assert_array_equal(images, truth[f"{split}_images"])
        np.testing.assert_array_equal(labels, truth[f"{split}_labels"])


def test_cifar_root_may_be_the_parent_folder(tmp_path):
    truth = make_cifar10(tmp_path / "raw")
    write_main([f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}", "--data.download=0", "--data.num_workers=1"])
    _, labels = read_all(tmp_path / "cifar10_test.beton")
    np.testing.assert_array_equal(labels, truth["test_labels"])


def test_cifar100_uses_fine_labels(tmp_path):
    truth = make_cifar100(tmp_path / "raw")
    write_main(["--data.dataset=cifar100", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}",
                "--data.num_workers=1"])
    images, labels = read_all(tmp_path / "cifar100_train.beton")
    np.testing.assert_array_equal(images, truth["train_images"])
    np.testing.assert_array_equal(labels, truth["train_labels"])
    assert inspect_beton(tmp_path / "cifar100_test.beton").num_samples == 10


def test_miniimagenet_pickles_pool_classes_and_split_deterministically(tmp_path):
    per_name = make_mini_pickles(tmp_path / "raw", per_class=5)
    write_main(["--data.dataset=miniimagenet", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}",
                "--data.mini_test_per_class=2", "--data.num_workers=1"])
    classes = sorted(per_name)  # label = rank of the class name over all three caches
    train_images, train_labels = read_all(tmp_path / "miniimagenet_train.beton")
    test_images, test_labels = read_all(tmp_path / "miniimagenet_test.beton")
    assert train_images.shape[1:] == (84, 84, 3)
    for label, name in enumerate(classes):
        np.testing.assert_array_equal(train_images[train_labels == label], per_name[name][:3])
        np.testing.assert_array_equal(test_images[test_labels == label], per_name[name][3:])
    assert np.bincount(train_labels).tolist() == [3] * 4 and np.bincount(test_labels).tolist() == [2] * 4


def test_miniimagenet_csv_images_are_resized_to_84(tmp_path):
    names = make_mini_csv(tmp_path / "raw", per_class=4)
    write_main(["--data.dataset=miniimagenet", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}",
                "--data.mini_test_per_class=1", "--data.num_workers=1"])
    info = inspect_beton(tmp_path / "miniimagenet_train.beton")
    assert info.image_sizes == ((84, 84),)
    assert np.bincount(info.labels).tolist() == [3] * len(names)
    assert inspect_beton(tmp_path / "miniimagenet_test.beton").num_samples == len(names)
    assert sorted(names) == sorted(n for split in MINI_CLASSES.values() for n in split)


def test_folder_converts_odd_modes_and_sizes(tmp_path):
    make_folder(tmp_path / "raw")
    write_main(["--data.dataset=folder", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}",
                "--data.max_resolution=64", "--data.num_workers=1"])
    info = inspect_beton(tmp_path / "folder_train.beton")
    assert info.num_samples == 5 and info.labels.tolist() == [0, 0, 1, 1, 1]
    assert max(max(size) for size in info.image_sizes) == 64  # the 300x150 image was bounded
    assert (64, 32) in info.image_sizes and (20, 30) in info.image_sizes
    images, labels = read_all(tmp_path / "folder_train.beton", image_size=16)
    assert images.shape == (5, 16, 16, 3)
    gray = images[1].astype(int)
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])
    assert inspect_beton(tmp_path / "folder_test.beton").labels.tolist() == [0, 1]


def test_folder_rgb_pixels_are_exact(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    from PIL import Image
    for split in ("train", "test"):
        (tmp_path / "raw" / split / "a").mkdir(parents=True)
        Image.fromarray(rgb).save(tmp_path / "raw" / split / "a" / "x.png")
    write_main(["--data.dataset=folder", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}",
                "--data.num_workers=1"])
    images, _ = read_all(tmp_path / "folder_test.beton")
    np.testing.assert_array_equal(images[0], rgb)


def test_synthetic_is_deterministic_balanced_and_round_trips(tmp_path):
    a_images, a_labels = make_synthetic(60, 32, seed=4)
    b_images, b_labels = make_synthetic(60, 32, seed=4)
    c_images, _ = make_synthetic(60, 32, seed=5)
    np.testing.assert_array_equal(a_images, b_images)
    np.testing.assert_array_equal(a_labels, b_labels)
    assert not np.array_equal(a_images, c_images)
    assert np.bincount(a_labels).tolist() == [6] * 10
    write_main(["--data.dataset=synthetic", "--data.synthetic_train=60", "--data.synthetic_test=20",
                "--data.seed=4", f"--data.out_dir={tmp_path}", "--data.num_workers=1"])
    train, test = load_synthetic(60, 20, 32, seed=4)
    images, labels = read_all(tmp_path / "synthetic_train.beton")
    np.testing.assert_array_equal(images, train.images)
    np.testing.assert_array_equal(labels, train.labels)
    assert not np.array_equal(train.images[:20], test.images)  # test split is an independent draw


def test_synthetic_classes_are_separable_by_shape():
    """1-NN on standardised grayscale pixels (polarity-free) is far above chance: labels carry signal."""
    train, test = load_synthetic(1000, 300, 32, seed=0)

    def features(images):  # grayscale, per-image standardised: colour is not the signal
        gray = images.mean(-1).reshape(len(images), -1)
        return (gray - gray.mean(1, keepdims=True)) / (gray.std(1, keepdims=True) + 1e-6)
    similarity = np.abs(features(test.images) @ features(train.images).T)
    accuracy = (train.labels[similarity.argmax(1)] == test.labels).mean()
    assert accuracy > 0.6  # chance is 0.1


def test_n_shot_beton_has_n_per_class_and_is_deterministic(tmp_path):
    args = ["--data.dataset=synthetic", "--data.synthetic_train=100", "--data.synthetic_test=20", "--data.shots=3",
            "--data.num_workers=1"]
    write_main(args + [f"--data.out_dir={tmp_path / 'a'}"])
    write_main(args + [f"--data.out_dir={tmp_path / 'b'}"])
    a_images, a_labels = read_all(tmp_path / "a" / "synthetic_train_3shot.beton")
    b_images, _ = read_all(tmp_path / "b" / "synthetic_train_3shot.beton")
    assert np.bincount(a_labels).tolist() == [3] * 10
    np.testing.assert_array_equal(a_images, b_images)
    labels = np.arange(50) % 5
    chosen = n_shot_indices(labels, 4, seed=1)
    assert np.bincount(labels[chosen]).tolist() == [4] * 5 and len(set(chosen.tolist())) == 20
    assert not np.array_equal(chosen, n_shot_indices(labels, 4, seed=2))
    with pytest.raises(DataError, match="fewer than --data.shots=11"):
        n_shot_indices(labels, 11)


# ---------------------------------------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def indexed_beton(tmp_path_factory) -> Path:
    from data_fixtures import index_images
    path = tmp_path_factory.mktemp("indexed") / "indexed.beton"
    write_betons({path: ArraySource(index_images(103, 8), np.arange(103) % 4, ("a", "b", "c", "d"))}, num_workers=1)
    return path


def test_eval_mode_yields_every_sample_once_in_order(indexed_beton):
    loader = BetonLoader(indexed_beton, 10, train=False, num_workers=1)
    assert len(loader) == 11
    for _ in range(2):
        seen = np.concatenate([decode_index(b.images.numpy()) for b in loader])
        np.testing.assert_array_equal(seen, np.arange(103))


def test_train_mode_reshuffles_each_epoch_reproducibly(indexed_beton):
    def order(loader):
        return np.concatenate([decode_index(b.images.numpy()) for b in loader])
    loader = BetonLoader(indexed_beton, 10, train=True, num_workers=1, seed=3)
    assert len(loader) == 10  # drop_last
    first, second = order(loader), order(loader)
    assert len(first) == 100 and len(set(first.tolist())) == 100
    assert not np.array_equal(first, second)
    again = BetonLoader(indexed_beton, 10, train=True, num_workers=1, seed=3)
    again.set_epoch(1)
    np.testing.assert_array_equal(order(again), second)
    other_seed = BetonLoader(indexed_beton, 10, train=True, num_workers=1, seed=4)
    assert not np.array_equal(order(other_seed), first)


def test_loader_restores_torch_threads(indexed_beton):
    torch.set_num_threads(2)
    loader = BetonLoader(indexed_beton, 10, train=True, num_workers=1)
    for _ in loader:
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


# ---------------------------------------------------------------------------------------------- errors
def test_missing_cifar_offline_says_where_to_put_it(tmp_path, capsys):
    assert run_cli(write_main, [f"--data.root={tmp_path / 'none'}", "--data.download=0", f"--data.out_dir={tmp_path}"]) == 2
    message = capsys.readouterr().err
    assert "cifar-10-python.tar.gz" in message and str(tmp_path / "none") in message
    assert message.count("\n") == 1 and "Traceback" not in message
    assert no_leftovers(tmp_path) == []


def test_corrupt_cifar_batch_is_reported(tmp_path, capsys):
    make_cifar10(tmp_path / "raw")
    (tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    assert run_cli(write_main, [f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path / 'out'}"]) == 2
    assert "cannot read CIFAR data" in capsys.readouterr().err
    assert no_leftovers(tmp_path / "out") == []


def test_folder_errors(tmp_path, capsys):
    (tmp_path / "raw" / "train" / "a").mkdir(parents=True)
    assert run_cli(write_main, ["--data.dataset=folder", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}"]) == 2
    assert "holds no images" in capsys.readouterr().err
    make_folder(tmp_path / "ok")
    (tmp_path / "ok" / "test" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    assert run_cli(write_main, ["--data.dataset=folder", f"--data.root={tmp_path / 'ok'}", f"--data.out_dir={tmp_path / 'out'}"]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert no_leftovers(tmp_path / "out") == []


def test_miniimagenet_missing_and_bad_cache(tmp_path, capsys):
    assert run_cli(write_main, ["--data.dataset=miniimagenet", f"--data.root={tmp_path}", f"--data.out_dir={tmp_path}"]) == 2
    assert "mini-imagenet-cache" in capsys.readouterr().err
    make_mini_pickles(tmp_path / "raw")
    with open(tmp_path / "raw" / "mini-imagenet-cache-val.pkl", "wb") as handle:
        pickle.dump({"images": []}, handle)
    assert run_cli(write_main, ["--data.dataset=miniimagenet", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}"]) == 2
    assert "class_dict" in capsys.readouterr().err
    assert no_leftovers(tmp_path) == []


class _FailingSource(ArraySource):
    def __getitem__(self, index):
        if index == 37:
            raise OSError("disk on fire")
        return super().__getitem__(index)


def test_a_failing_worker_leaves_no_file_and_does_not_hang(tmp_path):
    ok = ArraySource(np.zeros((50, 8, 8, 3), np.uint8), np.zeros(50), ("x",))
    bad = _FailingSource(np.zeros((200, 8, 8, 3), np.uint8), np.zeros(200), ("x",))
    with pytest.raises(DataError, match="disk on fire"):
        write_betons({tmp_path / "ok.beton": ok, tmp_path / "bad.beton": bad}, num_workers=2)
    assert no_leftovers(tmp_path) == []  # not even the split that succeeded


def test_bad_config_values_exit_non_zero(tmp_path, capsys):
    assert run_cli(write_main, ["--data.dataset=imagenet"]) == 2
    assert "--data.dataset='imagenet' is invalid" in capsys.readouterr().err
    assert run_cli(write_main, ["--data.jpeg_quality=500"]) == 2
    assert "jpeg_quality" in capsys.readouterr().err
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data:\n  dataset: synthetic\n  datset_typo: 1\n")
    assert run_cli(write_main, ["-C", str(yaml_file)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s)" in err and "data.datset_typo" in err
    with pytest.raises(SystemExit) as exit_info:
        write_main(["--data.bogus=1"])
    assert exit_info.value.code == 2


def test_yaml_config_is_applied(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"data:\n  dataset: synthetic\n  synthetic_train: 30\n  synthetic_test: 10\n  out_dir: {tmp_path}\n")
    write_main(["-C", str(yaml_file), "--data.synthetic_test=12", "--data.num_workers=1"])
    assert inspect_beton(tmp_path / "synthetic_train.beton").num_samples == 30
    assert inspect_beton(tmp_path / "synthetic_test.beton").num_samples == 12  # the flag beats the file


@pytest.fixture(scope="module")
def good_beton(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.beton"
    write_betons({path: ArraySource(np.zeros((40, 8, 8, 3), np.uint8), np.arange(40) % 2, ("a", "b"))}, num_workers=1)
    return path


def test_bad_betons_are_refused_clearly(tmp_path, good_beton):
    with pytest.raises(BetonError, match="beton not found"):
        BetonLoader(tmp_path / "missing.beton", 4, train=False)
    (tmp_path / "text.beton").write_text("hello, I am not a beton" * 10)
    with pytest.raises(BetonError, match="not a beton"):
        inspect_beton(tmp_path / "text.beton")
    data = good_beton.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 20):
        (tmp_path / "cut.beton").write_bytes(data[:cut])
        with pytest.raises(BetonError, match="truncated|not a beton"):
            inspect_beton(tmp_path / "cut.beton")
    with pytest.raises(DataError, match="larger than the 40 images"):
        BetonLoader(good_beton, 64, train=True)


def test_beton_without_label_field_is_refused(tmp_path):
    from ffcv.fields import RGBImageField
    from ffcv.writer import DatasetWriter

    class OnlyImages:
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return (np.zeros((8, 8, 3), np.uint8),)

    DatasetWriter(str(tmp_path / "nolabel.beton"), {"image": RGBImageField()}, num_workers=1).from_indexed_dataset(OnlyImages())
    with pytest.raises(BetonError, match="lacks the field.*label"):
        BetonLoader(tmp_path / "nolabel.beton", 2, train=False)


def test_variable_sized_beton_needs_an_image_size(tmp_path):
    make_folder(tmp_path / "raw")
    write_main(["--data.dataset=folder", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}", "--data.num_workers=1"])
    with pytest.raises(BetonError, match="several sizes"):
        BetonLoader(tmp_path / "folder_train.beton", 2, train=False)
    assert os.path.exists(tmp_path / "folder_train.beton")
