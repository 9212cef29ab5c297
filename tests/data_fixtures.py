"""Tiny datasets written by the tests in the real on-disk formats of each source."""
from __future__ import annotations

import csv
import io
import os
import pickle
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def index_images(count: int, size: int, offset: int = 0) -> np.ndarray:
    """(count, size, size, 3) uint8 images whose first pixels encode their index (+ offset)."""
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        value = i + offset
        images[i, 0, 0] = (value % 256, (value // 256) % 256, 7)
    return images


def decode_index(images: np.ndarray) -> np.ndarray:
    """Inverse of :func:`index_images` on (N, H, W, 3) or channels-first (N, 3, H, W) uint8."""
    if images.shape[1] == 3 and images.shape[-1] != 3:
        images = images.transpose(0, 2, 3, 1)
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


def _cifar_batch(images: np.ndarray, labels: np.ndarray, label_key: str) -> dict:
    return {"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), label_key: labels.tolist(),
            "batch_label": "test batch"}


def make_cifar10(root: Path, per_batch: int = 6, tar: bool = False) -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py`` (or ``root/cifar-10-python.tar.gz``); returns the true arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_images = index_images(5 * per_batch, 32)
    train_labels = np.arange(5 * per_batch) % 10
    test_images = index_images(per_batch * 2, 32, offset=1000)
    test_labels = (np.arange(per_batch * 2) * 3) % 10
    for b in range(5):
        part = slice(b * per_batch, (b + 1) * per_batch)
        with open(folder / f"data_batch_{b + 1}", "wb") as handle:
            pickle.dump(_cifar_batch(train_images[part], train_labels[part], "labels"), handle)
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump(_cifar_batch(test_images, test_labels, "labels"), handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)
    if tar:
        archive = root / "cifar-10-python.tar.gz"
        with tarfile.open(archive, "w:gz") as out:
            out.add(folder, arcname="cifar-10-batches-py")
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    return dict(train_images=train_images, train_labels=train_labels, test_images=test_images, test_labels=test_labels)


def make_cifar100(root: Path) -> dict[str, np.ndarray]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train_images, test_images = index_images(20, 32), index_images(10, 32, offset=500)
    train_labels, test_labels = np.arange(20) * 5 % 100, np.arange(10) * 7 % 100
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        batch = _cifar_batch(images, labels, "fine_labels")
        batch["coarse_labels"] = (labels // 5).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []}, handle)
    return dict(train_images=train_images, train_labels=train_labels, test_images=test_images, test_labels=test_labels)


MINI_CLASSES = {"train": ["n03", "n01"], "val": ["n04"], "test": ["n02"]}


def make_mini_pickles(root: Path, per_class: int = 5) -> dict[str, np.ndarray]:
    """Three pickle caches, 84x84, classes spread over them; returns images per class name."""
    root.mkdir(parents=True, exist_ok=True)
    per_name, offset = {}, 0
    for split, names in MINI_CLASSES.items():
        images = index_images(per_class * len(names), 84, offset=offset)
        class_dict = {}
        for c, name in enumerate(names):
            # interleave classes in the file to check that the split follows class_dict's order
            indices = list(range(c, per_class * len(names), len(names)))
            class_dict[name] = indices
            per_name[name] = images[indices]
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as handle:
            pickle.dump({"image_data": images, "class_dict": class_dict}, handle)
        offset += len(images)
    return per_name


def make_mini_csv(root: Path, per_class: int = 4) -> dict[str, list[str]]:
    """``images/`` with JPEG/PNG files of assorted sizes + train/val/test.csv; returns file names per class."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    names: dict[str, list[str]] = {}
    for split, classes in MINI_CLASSES.items():
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for name in classes:
                for i in range(per_class):
                    filename = f"{name}{i:08d}.png"
                    size = (int(rng.integers(60, 120)), int(rng.integers(60, 120)))
                    Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(root / "images" / filename)
                    writer.writerow([filename, name])
                    names.setdefault(name, []).append(filename)
    return names


def make_folder(root: Path) -> None:
    """ImageFolder with odd modes and sizes: RGB, grayscale, RGBA, palette, a large image, a JPEG."""
    rng = np.random.default_rng(5)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
    rgb = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "train" / "cat" / "a_rgb.png")
    Image.fromarray(rng.integers(0, 256, size=(25, 25), dtype=np.uint8), mode="L").save(root / "train" / "cat" / "b_gray.png")
    Image.fromarray(rng.integers(0, 256, size=(16, 40, 4), dtype=np.uint8), mode="RGBA").save(root / "train" / "dog" / "c_rgba.png")
    Image.fromarray(rng.integers(0, 256, size=(30, 30, 3), dtype=np.uint8)).convert("P").save(root / "train" / "dog" / "d_palette.gif")
    Image.fromarray(rng.integers(0, 256, size=(300, 150, 3), dtype=np.uint8)).save(root / "train" / "dog" / "e_large.jpg")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    Image.fromarray(rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)).save(root / "test" / "cat" / "f.png")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    (root / "test" / "dog" / "g.jpeg").write_bytes(buffer.getvalue())


def tiny_args(betons: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    return [f"--data.train_beton={betons['train']}", f"--data.test_beton={betons['test']}", f"--run.dir={run_dir}",
            "--cfg.arch=test_resnet", "--cfg.batch_size=16", "--cfg.K=2", "--cfg.epochs=2", "--cfg.proj_dim=32",
            "--run.device=cpu", "--run.progress=0", "--run.knn_every=1", "--run.knn_k=10", "--run.compile=0",
            "--data.num_workers=1", "--run.log_every=2", *extra]


PRETRAIN = Path(__file__).resolve().parents[1] / "train" / "pretrain.py"
SCRIPT_ENV = {**os.environ, "NUMBA_THREADING_LAYER": "omp", "PYTHONUNBUFFERED": "1"}


def start_pretraining(args: list[str], out: Path, env: dict[str, str] | None = None,
                      wait: bool = True, timeout: float = 300) -> subprocess.Popen:
    """``train/pretrain.py args`` in a subprocess writing stdout+stderr to ``out``.

    With ``wait``, returns once the run says it is training (its signal handlers are installed).
    """
    with open(out, "w") as handle:
        process = subprocess.Popen([sys.executable, str(PRETRAIN), *args], cwd=PRETRAIN.parents[1],
                                   env=env or SCRIPT_ENV, stdout=handle, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while wait and "training epochs" not in out.read_text():
        assert process.poll() is None and time.time() < deadline, out.read_text()
        time.sleep(0.05)
    return process


TRAIN_TAGS = ("train/loss", "train/tv", "train/entropy", "train/rank", "train/lr", "train/images_per_s")


def events(run_dir: Path):
    """The run's TensorBoard events, every record kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0,
                                                                                 "histograms": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def steps(events, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def read_log(run_dir: Path) -> list[dict]:
    """The run's ``log.jsonl``, one dict per epoch."""
    import json

    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
