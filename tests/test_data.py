"""The beton data layer: every source written in its real format, converted, and read back."""
from __future__ import annotations

import contextlib
import errno
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_fixtures import (MINI_CLASSES, decode_index, index_images, make_cifar10, make_cifar100, make_folder,
                           make_mini_csv, make_mini_pickles)
from data_prep.loader import BetonError, BetonLoader, inspect_beton
from data_prep.sources import ArraySource, DataError, load_folder, load_synthetic, n_shot_indices, shots_file_indices
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


def test_shots_file_writes_exactly_the_images_it_names(tmp_path):
    make_folder(tmp_path / "raw")  # train: cat/a_rgb.png cat/b_gray.png dog/c_rgba.png dog/d_palette.gif dog/e_large.jpg
    split = tmp_path / "hu2021_split.txt"
    split.write_text("\ufeff# a fixed labelled split\na_rgb.png   # a base name\n\ndog/c_rgba.png,1\n4  # an index\n")
    written = write_main(["--data.dataset=folder", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path / 'out'}",
                          f"--data.shots_file={split}", "--data.num_workers=1", "--data.max_resolution=64"])
    shots_path = tmp_path / "out" / "folder_train_hu2021_split.beton"
    assert written[str(shots_path)] == 3
    shot_images, shot_labels = read_all(shots_path, image_size=16)
    all_images, all_labels = read_all(tmp_path / "out" / "folder_train.beton", image_size=16)
    np.testing.assert_array_equal(shot_labels, all_labels[[0, 2, 4]])  # cat, dog, dog
    np.testing.assert_array_equal(shot_images, all_images[[0, 2, 4]])


def test_shots_file_errors_name_the_line(tmp_path):
    make_folder(tmp_path / "raw")
    train, _ = load_folder(tmp_path / "raw", 64)
    cases = {"zebra.png\n": r":1: 'zebra.png' matches no training image", "1\n5\n": r":2: index 5 is out of range",
             "-1\n": r":1: index -1 is out of range",
             "b_gray.png\ncat/b_gray.png\n": r":2: 'cat/b_gray.png' names the same image as line 1",
             "# only a comment\n": "names no images"}
    for number, (text, message) in enumerate(cases.items()):
        split = tmp_path / f"split{number}.txt"
        split.write_text(text)
        with pytest.raises(DataError, match=message):
            shots_file_indices(train, split)
    (tmp_path / "raw" / "train" / "dog" / "sub").mkdir()
    (tmp_path / "raw" / "train" / "dog" / "sub" / "a_rgb.png").write_bytes((tmp_path / "raw" / "train" / "cat" / "a_rgb.png").read_bytes())
    split.write_text("a_rgb.png\n")
    with pytest.raises(DataError, match="matches 2 training images; give more of its path"):
        shots_file_indices(load_folder(tmp_path / "raw", 64)[0], split)
    split.write_text("dog/sub/a_rgb.png\n")  # after dog/c, dog/d, dog/e in the walk
    np.testing.assert_array_equal(shots_file_indices(load_folder(tmp_path / "raw", 64)[0], split), [5])
    arrays = ArraySource(np.zeros((3, 4, 4, 3), np.uint8), np.arange(3), ("a", "b", "c"))
    with pytest.raises(DataError, match="images have none; use indices"):
        shots_file_indices(arrays, split)
    out = tmp_path / "out"
    for args, message in ([f"--data.shots_file={split}", "--data.shots=2"], "not both"), \
                         ([f"--data.shots_file={tmp_path / 'missing.txt'}"], "does not exist"):
        assert run_cli(write_main, ["--data.dataset=folder", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={out}",
                                    *args]) == 2
        assert not out.exists() or not any(out.iterdir())


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


def test_train_mode_without_drop_last_yields_every_sample_each_epoch(indexed_beton):
    loader = BetonLoader(indexed_beton, 10, train=True, drop_last=False, num_workers=1, seed=3)
    assert len(loader) == 11
    epochs = [np.concatenate([decode_index(b.images.numpy()) for b in loader]) for _ in range(2)]
    for seen in epochs:
        np.testing.assert_array_equal(np.sort(seen), np.arange(103))
    assert not np.array_equal(epochs[0], epochs[1])  # still shuffled


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
    assert run_cli(write_main, ["--data.bogus=1"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown argument(s): --data.bogus=1")


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


def test_a_beton_cut_in_its_index_is_one_line_not_a_crash(tmp_path):
    """ffcv reads the index without bounds checks: these files crashed the process (SIGSEGV/SIGABRT)."""
    from ffcv.types import ALLOC_TABLE_TYPE, HeaderType

    write_main([f"--data.out_dir={tmp_path}", "--data.dataset=synthetic", "--data.synthetic_train=96",
                "--data.synthetic_test=32", "--data.synthetic_size=16", "--data.num_workers=1"])
    data = (tmp_path / "synthetic_train.beton").read_bytes()
    index_start = int(np.frombuffer(data[:HeaderType.itemsize], dtype=HeaderType)[0]["alloc_table_ptr"])
    cuts = {"at_the_index": index_start, "last_entries": len(data) - 10 * ALLOC_TABLE_TYPE.itemsize,
            "one_entry": len(data) - ALLOC_TABLE_TYPE.itemsize}
    for name, keep in cuts.items():
        (tmp_path / f"{name}.beton").write_bytes(data[:keep])
        with pytest.raises(BetonError, match="is truncated or corrupt: its index lacks"):
            inspect_beton(tmp_path / f"{name}.beton")
    # an index entry that points into the samples' descriptions, or past the index's start
    from ffcv.reader import Reader
    reader = Reader(str(tmp_path / "synthetic_train.beton"))
    data_start = HeaderType.itemsize + reader.field_descriptors.nbytes + reader.metadata.nbytes
    for name, field, value in (("into_the_descriptions", "ptr", data_start - 8), ("past_the_index", "size", len(data))):
        table = np.frombuffer(data[index_start:], dtype=ALLOC_TABLE_TYPE).copy()
        table[0][field] = value
        (tmp_path / f"{name}.beton").write_bytes(data[:index_start] + table.tobytes())
        with pytest.raises(BetonError, match="is truncated or corrupt: its index points outside the data region"):
            inspect_beton(tmp_path / f"{name}.beton")
    root = Path(__file__).resolve().parents[1]
    commands = [[sys.executable, "data_prep/inspect_beton.py", str(tmp_path / "one_entry.beton")],
                [sys.executable, "train/pretrain.py", f"--data.train_beton={tmp_path / 'at_the_index.beton'}",
                 f"--data.test_beton={tmp_path / 'synthetic_test.beton'}", f"--run.dir={tmp_path / 'run'}",
                 "--cfg.arch=test_resnet", "--cfg.batch_size=16", "--cfg.epochs=1", "--cfg.proj_dim=32",
                 "--run.device=cpu", "--run.progress=0", "--run.compile=0", "--data.num_workers=1"]]
    for command in commands:  # in a subprocess: a crash would kill the test process
        result = subprocess.run(command, cwd=root, env={**os.environ, "NUMBA_THREADING_LAYER": "omp"},
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        assert result.stderr.count("\n") == 1 and "is truncated or corrupt: its index lacks" in result.stderr, result.stderr


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


# ---------------------------------------------------------------------------------------------- bit depth
def _folder_with(root: Path, image_for_split) -> None:
    """``root/{train,test}/a/x.<ext>`` from ``image_for_split(directory)`` (which saves the file)."""
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        image_for_split(root / split / "a")


def test_16_bit_grayscale_is_scaled_by_its_depth_not_clipped(tmp_path):
    from PIL import Image
    gradient = np.linspace(0, 57_500, 64 * 64).reshape(64, 64).astype(np.uint16)
    _folder_with(tmp_path / "raw", lambda d: Image.fromarray(gradient).save(d / "x.png"))
    assert Image.open(tmp_path / "raw" / "train" / "a" / "x.png").mode.startswith("I")  # a real 16-bit PNG
    write_main(["--data.dataset=folder", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}",
                "--data.num_workers=1"])
    images, _ = read_all(tmp_path / "folder_train.beton")
    gray = images[0, ..., 0]
    assert np.array_equal(gray, images[0, ..., 1]) and np.array_equal(gray, images[0, ..., 2])
    np.testing.assert_array_equal(gray, (gradient >> 8).astype(np.uint8))  # the gradient keeps its shape
    assert len(np.unique(gray)) > 200 and abs(gray.mean() - 57_500 / 2 / 257) < 1.5


def test_high_bit_depth_modes_become_8_bit():
    from PIL import Image
    from data_prep.sources import to_rgb8
    ramp = np.linspace(0, 65_535, 256).reshape(16, 16)
    expected = (ramp.astype(np.int64) >> 8).astype(np.uint8)
    as_int32 = Image.fromarray(ramp.astype(np.int32))  # mode "I": how some readers give 16-bit data
    assert as_int32.mode == "I"
    np.testing.assert_array_equal(np.asarray(to_rgb8(as_int32))[..., 0], expected)
    as_float = Image.fromarray((ramp / 65_535).astype(np.float32))  # mode "F" in [0, 1]
    np.testing.assert_array_equal(np.asarray(to_rgb8(as_float))[..., 0], np.rint(ramp / 65_535 * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_rgb8(Image.fromarray(np.full((4, 4), 3.5, np.float32)))
    with pytest.raises(ValueError, match="0..65535"):
        to_rgb8(Image.fromarray(np.full((4, 4), 70_000, np.int32)))
    rgb = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(to_rgb8(Image.fromarray(rgb))), rgb)


def test_float_image_outside_0_1_is_refused_by_name(tmp_path, capsys):
    from PIL import Image
    _folder_with(tmp_path / "raw", lambda d: Image.fromarray(np.full((8, 8), 300.0, np.float32)).save(d / "f.tif"))
    assert run_cli(write_main, ["--data.dataset=folder", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path / 'out'}",
                                "--data.num_workers=1"]) == 2
    err = capsys.readouterr().err
    assert "f.tif" in err and "[0, 1]" in err and err.count("\n") == 1
    assert no_leftovers(tmp_path / "out") == []


# ---------------------------------------------------------------------------------------------- symlinks
def test_folder_does_not_follow_directory_symlinks(tmp_path, capsys):
    from PIL import Image
    root = tmp_path / "raw"
    for split, count in (("train", 6), ("test", 1)):
        for label, name in enumerate("ab"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.full((8, 8, 3), 100 * label + i, np.uint8)).save(root / split / name / f"{i}.png")
    os.symlink("..", root / "train" / "a" / "loop")  # train/a/loop/b/... would be class b images labelled a
    write_main(["--data.dataset=folder", f"--data.root={root}", f"--data.out_dir={tmp_path / 'out'}", "--data.num_workers=1"])
    images, labels = read_all(tmp_path / "out" / "folder_train.beton")
    assert len(labels) == 12 and np.bincount(labels).tolist() == [6, 6]
    np.testing.assert_array_equal(images[:, 0, 0, 0] >= 100, labels == 1)  # each image under its own class
    os.symlink("b", root / "train" / "c")  # a class folder that is a link: refused, not followed
    assert run_cli(write_main, ["--data.dataset=folder", f"--data.root={root}", f"--data.out_dir={tmp_path / 'out2'}"]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and str(root / "train" / "c") in err and err.count("\n") == 1
    assert no_leftovers(tmp_path / "out2") == []


# ---------------------------------------------------------------------------------------------- faults while writing
WRITE_BETON = Path(__file__).resolve().parents[1] / "data_prep" / "write_beton.py"


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        state, _, group = stat[stat.rindex(")") + 2:].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry))
    return members


def start_writer(tmp_path: Path, images: int = 3000, preexec_fn=None) -> subprocess.Popen:
    """write_beton.py on ``images`` synthetic 64 px images (12 kB each), in a session of its own.

    Ctrl-C is restored to its default in the writer: a test suite started in the background by a
    non-interactive shell (``cmd &``) ignores SIGINT, its children inherit that, and the writer
    rightly leaves an ignored Ctrl-C ignored.
    """
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, NUMBA_THREADING_LAYER="omp", TMPDIR=str(tmp_path / "tmp"))

    def prepare() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec_fn is not None:
            preexec_fn()
    return subprocess.Popen(
        [sys.executable, str(WRITE_BETON), "--data.dataset=synthetic", f"--data.synthetic_train={images}",
         "--data.synthetic_test=10", "--data.synthetic_size=64", f"--data.out_dir={tmp_path / 'out'}",
         "--data.num_workers=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env, preexec_fn=prepare)


def signal_mid_write(process: subprocess.Popen, out_dir: Path, send, timeout: float = 120) -> None:
    """Calls ``send()`` once the train beton's temporary file holds pages and the writer processes run.

    The check is made with the writer's process group stopped (SIGSTOP), and ``send`` runs before
    it continues (SIGCONT), so the signal lands mid-write however busy the machine is: a writer
    that finished between a check and the signal would otherwise exit 0.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        os.killpg(process.pid, signal.SIGSTOP)
        try:
            assert process.poll() is None, process.communicate()
            sizes = [p.stat().st_size for p in out_dir.glob("synthetic_train.beton.tmp-*")]
            if sizes and sizes[0] >= 4 << 20 and len(group_members(process.pid)) >= 3:  # main + 2 workers
                send()
                return
        except FileNotFoundError:  # the temporary file was not there yet
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):  # the group is gone when the writer has ended
                os.killpg(process.pid, signal.SIGCONT)
        time.sleep(0.02)
    process.kill()
    pytest.fail("the writer never got mid-write")


def assert_ended_cleanly(process: subprocess.Popen, tmp_path: Path, code: int, message: str) -> None:
    """Exit status ``code`` within 30 s, ``message`` as the only stderr line, nothing left behind."""
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the writer did not exit")
    assert process.returncode == code, err
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while group_members(process.pid) and time.monotonic() < deadline:  # the workers must not outlive it
        time.sleep(0.05)
    assert group_members(process.pid) == []
    assert list((tmp_path / "out").iterdir()) == []  # no beton, no temporary file
    assert list((tmp_path / "tmp").iterdir()) == []  # no side directory


def test_sigterm_mid_write_stops_workers_and_removes_everything(tmp_path):
    process = start_writer(tmp_path)
    signal_mid_write(process, tmp_path / "out", lambda: os.kill(process.pid, signal.SIGTERM))  # as `kill PID` does
    assert_ended_cleanly(process, tmp_path, 2, "error: stopped by SIGTERM")


def test_ctrl_c_to_the_process_group_mid_write_exits_at_once(tmp_path):
    process = start_writer(tmp_path)
    # a terminal's Ctrl-C reaches every process of the group
    signal_mid_write(process, tmp_path / "out", lambda: os.killpg(process.pid, signal.SIGINT))
    assert_ended_cleanly(process, tmp_path, 130, "interrupted")


def test_a_file_size_limit_mid_write_fails_cleanly(tmp_path):
    """A real write error in the workers: the kernel refuses writes past RLIMIT_FSIZE (EFBIG)."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (6 << 20, 6 << 20))  # Python ignores SIGXFSZ: writes fail
    process = start_writer(tmp_path, images=1000, preexec_fn=limit_file_size)  # a 12 MB beton
    deadline = time.monotonic() + 120  # starting (imports, drawing the images) is slow on a busy machine
    while process.poll() is None and not list((tmp_path / "out").glob("*.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_ended_cleanly(process, tmp_path, 2, "synthetic_train.beton: File too large")


class _FillingDisk:
    """A file on a disk that is full beyond ``room`` bytes: ``write`` raises ENOSPC there, as the kernel does."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if self.handle.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


@pytest.mark.parametrize("where", ["worker", "main"])
def test_full_disk_fails_once_with_nothing_left(tmp_path, monkeypatch, where):
    from multiprocessing import shared_memory

    import psutil
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    if where == "worker":  # the workers' page writes (forked: they inherit the patch)
        def enter(self):
            self.fp = _FillingDisk(open(self.fname, "ab", buffering=0), room=5 << 20)
        monkeypatch.setattr(MemoryAllocator, "__enter__", enter)
    else:  # the main process's last write: metadata and allocation table
        def finalize(self, allocations):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(DatasetWriter, "finalize", finalize)
    created = []

    class Recorded(shared_memory.SharedMemory):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self.name)
    monkeypatch.setattr(shared_memory, "SharedMemory", Recorded)
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    source = ArraySource(index_images(600, 64), np.arange(600) % 3, ("a", "b", "c"))  # ~7 MB: several pages
    start = time.monotonic()
    with pytest.raises(DataError, match=r"cannot write .*\.beton: No space left on device"):
        write_betons({tmp_path / "small.beton": ArraySource(index_images(10, 8), np.zeros(10), ("a",)),
                      tmp_path / "big.beton": source}, num_workers=2)
    assert time.monotonic() - start < 60
    assert list(tmp_path.iterdir()) == []  # neither beton, no temporary file
    assert created and not any(Path("/dev/shm", name).exists() for name in created)
    left = [c for c in psutil.Process().children(recursive=True) if c.pid not in before and c.status() != "zombie"
            and "resource_tracker" not in " ".join(c.cmdline())]  # multiprocessing's, started once per process
    assert left == []


# ---------------------------------------------------------------------------------------------- one line, not a traceback
def test_image_too_large_to_decode_is_refused_by_name(tmp_path, capsys):
    from PIL import Image
    make_folder(tmp_path / "raw")
    Image.new("1", (14_000, 14_000)).save(tmp_path / "raw" / "train" / "cat" / "huge.png")  # 196 Mpx, a few kB
    assert run_cli(write_main, ["--data.dataset=folder", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "huge.png" in err and "too large" in err and err.count("\n") == 1 and "Traceback" not in err
    assert no_leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("batch, complaint", [
    ([1, 2, 3], "is a list"),
    ({"labels": [0]}, "lacks the key(s) 'data'"),
    ({"data": np.zeros((6, 100), np.uint8), "labels": [0] * 6}, "shape (6, 100)"),
    ({"data": np.zeros((6, 3072), np.uint8), "labels": [0] * 5}, "6 images but labels"),
    ({"data": np.full((6, 3072), 300), "labels": [0] * 6}, "outside 0..255"),
], ids=["list", "no-data", "shape", "labels", "range"])
def test_cifar_batch_of_the_wrong_structure_is_refused(tmp_path, capsys, batch, complaint):
    make_cifar10(tmp_path / "raw")
    with open(tmp_path / "raw" / "cifar-10-batches-py" / "data_batch_2", "wb") as handle:
        pickle.dump(batch, handle)
    assert run_cli(write_main, [f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path / 'out'}", "--data.download=0"]) == 2
    err = capsys.readouterr().err
    assert "data_batch_2" in err and complaint in err and err.count("\n") == 1, err
    assert no_leftovers(tmp_path / "out") == []


def test_cifar_batch_with_bytes_keys_is_read(tmp_path):
    truth = make_cifar10(tmp_path / "raw")
    path = tmp_path / "raw" / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as handle:
        batch = pickle.load(handle)
    with open(path, "wb") as handle:
        pickle.dump({key.encode(): value for key, value in batch.items()}, handle)  # as encoding="bytes" gives
    write_main([f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}", "--data.download=0", "--data.num_workers=1"])
    np.testing.assert_array_equal(read_all(tmp_path / "cifar10_test.beton")[1], truth["test_labels"])


def test_out_dir_that_is_a_file_or_unwritable_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    args = ["--data.dataset=synthetic", "--data.synthetic_train=20", "--data.synthetic_test=10"]
    assert run_cli(write_main, args + [f"--data.out_dir={tmp_path / 'file'}"]) == 2
    err = capsys.readouterr().err
    assert f"--data.out_dir={tmp_path / 'file'} is a file" in err and err.count("\n") == 1
    assert run_cli(write_main, args + [f"--data.out_dir={tmp_path / 'file' / 'sub'}"]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    if os.geteuid() != 0:  # root writes whatever the permission bits say
        (tmp_path / "locked").mkdir(mode=0o500)
        assert run_cli(write_main, args + [f"--data.out_dir={tmp_path / 'locked'}"]) == 2
        assert "not writable" in capsys.readouterr().err


def _write_raw_beton(path: Path, fields: dict, samples: list) -> None:
    from ffcv.writer import DatasetWriter

    class Samples:
        def __len__(self):
            return len(samples)

        def __getitem__(self, index):
            return samples[index]
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(Samples())


def test_fields_are_read_by_name_in_any_order(tmp_path):
    from ffcv.fields import IntField, RGBImageField
    images = index_images(9, 8)
    labels = np.arange(9) % 3
    _write_raw_beton(tmp_path / "swapped.beton", {"label": IntField(), "weight": IntField(), "image": RGBImageField()},
                     [(int(labels[i]), 7, images[i]) for i in range(9)])
    assert inspect_beton(tmp_path / "swapped.beton").fields == ("label", "weight", "image")
    read_images, read_labels = read_all(tmp_path / "swapped.beton")
    np.testing.assert_array_equal(read_images, images)
    np.testing.assert_array_equal(read_labels, labels)


def test_negative_labels_are_refused_clearly(tmp_path, capsys):
    from ffcv.fields import IntField, RGBImageField
    from data_prep.inspect_beton import main as inspect_main
    _write_raw_beton(tmp_path / "negative.beton", {"image": RGBImageField(), "label": IntField()},
                     [(np.zeros((8, 8, 3), np.uint8), -1 - (i % 2)) for i in range(6)])
    capsys.readouterr()  # ffcv's own progress bar
    assert run_cli(inspect_main, [str(tmp_path / "negative.beton")]) == 2
    err = capsys.readouterr().err
    assert "negative labels" in err and "down to -2" in err and err.count("\n") == 1
    with pytest.raises(BetonError, match="negative labels"):
        BetonLoader(tmp_path / "negative.beton", 2, train=False)


def test_max_resolution_zero_keeps_the_stored_size(tmp_path):
    from data_prep.sources import load_folder
    make_folder(tmp_path / "raw")
    write_main(["--data.dataset=folder", f"--data.root={tmp_path / 'raw'}", f"--data.out_dir={tmp_path}",
                "--data.max_resolution=0", "--data.num_workers=1"])
    assert (300, 150) in inspect_beton(tmp_path / "folder_train.beton").image_sizes
    with pytest.raises(DataError, match="max_resolution must be >= 0"):
        load_folder(tmp_path / "raw", max_resolution=-5)


def test_betons_get_the_mode_a_plain_open_gives(tmp_path):
    source = ArraySource(index_images(10, 8), np.zeros(10), ("a",))
    previous = os.umask(0o027)
    try:
        write_betons({tmp_path / "new.beton": source}, num_workers=1)
        (tmp_path / "old.beton").write_bytes(b"x")
        os.chmod(tmp_path / "old.beton", 0o604)
        write_betons({tmp_path / "old.beton": source}, num_workers=1)
    finally:
        os.umask(previous)
    assert (tmp_path / "new.beton").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "old.beton").stat().st_mode & 0o777 == 0o604  # a replaced file keeps its mode


def test_a_shots_file_entry_that_is_a_digit_but_not_a_number_names_its_line(tmp_path):
    arrays = ArraySource(np.zeros((3, 4, 4, 3), np.uint8), np.arange(3), ("a", "b", "c"))
    split = tmp_path / "split.txt"
    split.write_text("0\n\u00b2\n")  # "²".isdigit() is True, but int("²") fails
    with pytest.raises(DataError, match=rf"^{split}:2: '\u00b2' is a file name"):
        shots_file_indices(arrays, split)
