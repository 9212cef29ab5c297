"""Raw datasets on disk -> indexable (image, label) sources for the beton writer.

Every loader returns a ``(train, test)`` pair of sources. A source is indexable: ``source[i]``
is ``(image, label)`` with ``image`` an (H, W, 3) uint8 RGB array and ``label`` an int; it also
exposes ``labels`` (N,) int64 and ``classes`` (class names, label = position).

* ``cifar10`` / ``cifar100``: torchvision's on-disk format (``cifar-10-batches-py`` /
  ``cifar-100-python``), or the official ``.tar.gz`` read in place (no extraction).
* ``miniimagenet``: the pickle caches ``mini-imagenet-cache-{train,val,test}.pkl`` or an
  ``images/`` folder with ``train.csv``/``val.csv``/``test.csv``; all 100 classes pooled and
  split per class (see :func:`load_miniimagenet`).
* ``folder``: torchvision ImageFolder layout under ``root/train`` and ``root/test``.
* ``synthetic``: :mod:`data_prep.synthetic`, deterministic from a seed.
"""
from __future__ import annotations

import csv
import os
import pickle
import socket
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from core.config import UserError
from data_prep.synthetic import CLASS_NAMES, make_synthetic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
        label_key="labels", meta="batches.meta", names_key="label_names"),
    "cifar100": dict(
        folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=["train"], test=["test"],
        label_key="fine_labels", meta="meta", names_key="fine_label_names"),
}


class DataError(UserError):
    """Raw data that is missing, malformed or inconsistent."""


@dataclass
class ArraySource:
    """Images held in memory: ``images`` (N, H, W, 3) uint8, ``labels`` (N,) int64."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DataError(f"images must be (N, H, W, 3) uint8, got {self.images.shape} {self.images.dtype}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: np.ndarray) -> "ArraySource":
        return ArraySource(self.images[indices], self.labels[indices], self.classes)

    @property
    def max_side(self) -> int:
        return int(max(self.images.shape[1:3])) if len(self.images) else 0


def to_rgb8(image):
    """An 8-bit RGB version of a PIL image, high bit depths scaled by their depth (not clipped).

    16-bit pixels (modes ``I;16*``, and ``I`` as PIL reads 16-bit PNG/TIFF) become ``value >> 8``;
    float pixels (mode ``F``) must lie in [0, 1] and are scaled by 255. Palette and other modes go
    through PIL's conversion (transparency dropped). Raises ``ValueError`` for pixel values that
    fit neither rule (negative or above 65535 in mode ``I``, floats outside [0, 1] or not finite).
    16-bit RGB(A) PNGs need nothing here: PIL already reads them as 8-bit RGB(A).
    """
    from PIL import Image

    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise ValueError(f"{mode} pixels range over {values.min()}..{values.max()}; "
                             "only 8- and 16-bit integer images (0..65535) are supported")
        return Image.fromarray((values >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ValueError("float pixels must lie in [0, 1] (got "
                             f"{np.nanmin(values):.4g}..{np.nanmax(values):.4g}, or non-finite values)")
        return Image.fromarray(np.rint(values * 255).astype(np.uint8), "L").convert("RGB")
    if mode not in ("RGB", "L") and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


@dataclass
class FileSource:
    """Image files decoded on access (by the writer's workers).

    Any mode (grayscale, RGBA, palette, 16-bit, float) becomes 8-bit RGB (:func:`to_rgb8`). ``resize_to`` (h, w) resizes every
    image exactly; otherwise ``max_side`` (0 = no bound) shrinks images whose longer side exceeds it,
    keeping the aspect ratio.
    """

    paths: list[str]
    labels: np.ndarray
    classes: tuple[str, ...]
    resize_to: tuple[int, int] | None = None
    max_side_bound: int = 0
    sizes: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        from PIL import Image

        with Image.open(self.paths[index]) as image:
            image = to_rgb8(image)
            if self.resize_to is not None:
                if image.size != (self.resize_to[1], self.resize_to[0]):
                    image = image.resize((self.resize_to[1], self.resize_to[0]), Image.Resampling.LANCZOS)
            elif self.max_side_bound and max(image.size) > self.max_side_bound:
                image.thumbnail((self.max_side_bound, self.max_side_bound), Image.Resampling.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
        return np.ascontiguousarray(array), int(self.labels[index])

    def subset(self, indices: np.ndarray) -> "FileSource":
        return FileSource([self.paths[i] for i in indices], self.labels[indices], self.classes,
                          self.resize_to, self.max_side_bound)

    @property
    def max_side(self) -> int:
        """The longest stored side, from the files' headers (no decoding)."""
        if self.resize_to is not None:
            return max(self.resize_to)
        from PIL import Image

        longest = 0
        for path in self.paths:
            with Image.open(path) as image:
                longest = max(longest, *image.size)
        return min(longest, self.max_side_bound) if self.max_side_bound else longest


Source = ArraySource | FileSource


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
def _find_cifar(root: Path, spec: dict) -> Path | None:
    """The extracted folder or the archive under/at ``root``, or None."""
    candidates = [root, root / spec["folder"], root / spec["archive"]]
    for candidate in candidates:
        if candidate.is_dir() and (candidate / spec["test"][0]).is_file():
            return candidate
        if candidate.is_file() and candidate.name.endswith((".tar.gz", ".tgz")):
            return candidate
    return None


def _read_cifar_batches(location: Path, spec: dict, names: Sequence[str]) -> list[dict]:
    batches = []
    try:
        if location.is_dir():
            for name in names:
                with open(location / name, "rb") as handle:
                    batches.append(pickle.load(handle, encoding="latin1"))
        else:
            with tarfile.open(location, "r:gz") as archive:
                members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
                for name in names:
                    if name not in members:
                        raise DataError(f"{location} has no member '{spec['folder']}/{name}': not a {spec['archive']} archive")
                    batches.append(pickle.load(archive.extractfile(members[name]), encoding="latin1"))
    except DataError:
        raise
    except FileNotFoundError as error:
        raise DataError(f"missing CIFAR file: {error.filename}") from None
    except Exception as error:  # noqa: BLE001 - unpickling a foreign file can raise anything
        raise DataError(f"cannot read CIFAR data from {location}: {error.__class__.__name__}: {error}") from None
    return batches


def _cifar_batch_arrays(batch, name: str, location: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``data`` (N, 3072) uint8 and labels (N,) int64 of one unpickled CIFAR batch, checked."""
    where = f"CIFAR batch {name} in {location}"
    if not isinstance(batch, dict):
        raise DataError(f"{where} is a {type(batch).__name__}, not a dict with 'data' and '{label_key}'")
    batch = {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in batch.items()}
    missing = [key for key in ("data", label_key) if key not in batch]
    if missing:
        keys = ", ".join(repr(key) for key in list(batch)[:6])
        raise DataError(f"{where} lacks the key(s) {', '.join(map(repr, missing))}; it has {keys}")
    try:
        data = np.asarray(batch["data"])
        labels = np.asarray(batch[label_key])
    except (ValueError, TypeError) as error:
        raise DataError(f"{where}: 'data' or '{label_key}' is not an array ({error})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype.kind not in "iu":
        raise DataError(f"{where} holds data of shape {data.shape} {data.dtype}, expected (N, 3072) uint8")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(f"{where} holds pixel values {data.min()}..{data.max()}, outside 0..255")
        data = data.astype(np.uint8)
    if labels.ndim != 1 or len(labels) != len(data) or (len(labels) and labels.dtype.kind not in "iu"):
        raise DataError(f"{where} holds {len(data)} images but labels of shape {labels.shape} {labels.dtype}")
    return data, labels.astype(np.int64)


def _cifar_split(location: Path, spec: dict, names: Sequence[str], classes: tuple[str, ...]) -> ArraySource:
    batches = _read_cifar_batches(location, spec, names)
    arrays = [_cifar_batch_arrays(batch, name, location, spec["label_key"]) for batch, name in zip(batches, names)]
    data = np.concatenate([a[0] for a in arrays])
    labels = np.concatenate([a[1] for a in arrays])
    if len(labels) == 0:
        raise DataError(f"the CIFAR batches {', '.join(names)} in {location} hold no images")
    if labels.min() < 0 or labels.max() >= len(classes):
        raise DataError(f"CIFAR labels in {location} fall outside [0, {len(classes)})")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return ArraySource(images, labels, classes)


def _download_cifar(root: Path, spec: dict) -> Path:
    from torchvision.datasets.utils import download_url

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        download_url(spec["url"], str(root), spec["archive"], spec["md5"])
    except Exception as error:  # offline, DNS failure, refused, checksum
        partial = root / spec["archive"]
        if partial.exists():
            partial.unlink()
        raise DataError(
            f"no {spec['folder']} or {spec['archive']} under {root}, and the download failed ({error.__class__.__name__}). "
            f"Put {spec['archive']} (from {spec['url']}) or its extracted {spec['folder']}/ folder in {root}, "
            f"or pass --data.root=PATH to the folder or the archive.") from None
    finally:
        socket.setdefaulttimeout(previous)
    return root / spec["archive"]


def load_cifar(name: str, root: str | Path, download: bool = True) -> tuple[ArraySource, ArraySource]:
    """CIFAR-10/100 from ``root``: the extracted folder, its parent, the .tar.gz or its folder."""
    spec = CIFAR[name]
    root = Path(root)
    location = _find_cifar(root, spec)
    if location is None:
        if not download:
            raise DataError(
                f"no {spec['folder']}/ or {spec['archive']} found at {root}. Download {spec['url']} and put the archive "
                f"(or its extracted folder) there, or pass --data.root=PATH; --data.download=1 tries to fetch it.")
        root.mkdir(parents=True, exist_ok=True)
        location = _download_cifar(root, spec)
    meta = _read_cifar_batches(location, spec, [spec["meta"]])[0]
    classes = tuple(meta.get(spec["names_key"], ())) if isinstance(meta, dict) else ()
    if not classes:
        raise DataError(f"{location}: '{spec['meta']}' lacks '{spec['names_key']}'")
    return (_cifar_split(location, spec, spec["train"], classes),
            _cifar_split(location, spec, spec["test"], classes))


# ---------------------------------------------------------------------------------------------
# Mini-ImageNet
MINI_SPLITS = ("train", "val", "test")
MINI_SIZE = 84


def _split_per_class(per_class: dict[str, list], test_per_class: int) -> tuple[list, list, list, list, tuple[str, ...]]:
    """Pools classes (sorted by name); in each, the *last* ``test_per_class`` items (in file order) are test."""
    classes = tuple(sorted(per_class))
    train_items, train_labels, test_items, test_labels = [], [], [], []
    for label, name in enumerate(classes):
        items = per_class[name]
        if len(items) <= test_per_class:
            raise DataError(f"class {name} has {len(items)} images; --data.mini_test_per_class={test_per_class} leaves none for training")
        cut = len(items) - test_per_class
        train_items += items[:cut]
        train_labels += [label] * cut
        test_items += items[cut:]
        test_labels += [label] * test_per_class
    return train_items, train_labels, test_items, test_labels, classes


def load_miniimagenet(root: str | Path, test_per_class: int = 100) -> tuple[Source, Source]:
    """Mini-ImageNet, all 100 classes pooled (Iscen et al. 2019): 500 train / 100 test per class.

    The split is deterministic: classes are sorted by name (label = rank); within a class, images
    keep the order of the original split files, and the last ``test_per_class`` of them are test.
    Reads the pickle caches when present, otherwise ``images/`` + the three csv files (images are
    resized to 84x84 with Lanczos when they are not already).
    """
    root = Path(root)
    pickles = [root / f"mini-imagenet-cache-{split}.pkl" for split in MINI_SPLITS]
    csvs = [root / f"{split}.csv" for split in MINI_SPLITS]
    if all(p.is_file() for p in pickles):
        return _mini_from_pickles(pickles, test_per_class)
    if (root / "images").is_dir() and all(c.is_file() for c in csvs):
        return _mini_from_csv(root, csvs, test_per_class)
    raise DataError(
        f"no Mini-ImageNet found at {root}: expected mini-imagenet-cache-{{train,val,test}}.pkl, "
        f"or an images/ folder with train.csv, val.csv and test.csv. Pass --data.root=PATH.")


def _mini_from_pickles(paths: list[Path], test_per_class: int) -> tuple[ArraySource, ArraySource]:
    arrays, per_class = [], {}
    offset = 0
    for path in paths:
        try:
            with open(path, "rb") as handle:
                cache = pickle.load(handle)
            data = np.asarray(cache["image_data"])
            class_dict = cache["class_dict"]
        except (pickle.UnpicklingError, EOFError, OSError, KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path} is not a Mini-ImageNet cache (needs 'image_data' and 'class_dict'): {error}") from None
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[-1] != 3:
            raise DataError(f"{path}: image_data must be (N, H, W, 3) uint8, got {data.shape} {data.dtype}")
        for name, indices in class_dict.items():
            if name in per_class:
                raise DataError(f"class {name} appears in more than one cache file")
            per_class[name] = [offset + int(i) for i in indices]
        arrays.append(data)
        offset += len(data)
    images = np.concatenate(arrays)
    train_idx, train_lab, test_idx, test_lab, classes = _split_per_class(per_class, test_per_class)
    return (ArraySource(images[train_idx], np.array(train_lab), classes),
            ArraySource(images[test_idx], np.array(test_lab), classes))


def _mini_from_csv(root: Path, csvs: list[Path], test_per_class: int) -> tuple[FileSource, FileSource]:
    per_class: dict[str, list] = {}
    for path in csvs:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    filename, name = row["filename"], row["label"]
                except KeyError:
                    raise DataError(f"{path} must have the columns filename,label") from None
                image = root / "images" / filename
                if not image.is_file():
                    raise DataError(f"{path} lists {filename}, which is not in {root / 'images'}")
                per_class.setdefault(name, []).append(str(image))
    train_paths, train_lab, test_paths, test_lab, classes = _split_per_class(per_class, test_per_class)
    _check_images(train_paths + test_paths)
    size = (MINI_SIZE, MINI_SIZE)
    return (FileSource(train_paths, np.array(train_lab), classes, resize_to=size),
            FileSource(test_paths, np.array(test_lab), classes, resize_to=size))


# ---------------------------------------------------------------------------------------------
# ImageFolder
def _scan_split(split_dir: Path, classes: tuple[str, ...] | None) -> tuple[list[str], list[int], tuple[str, ...]]:
    if not split_dir.is_dir():
        raise DataError(f"missing folder {split_dir} (expected <root>/train/<class>/<image> and <root>/test/<class>/<image>)")
    linked = sorted(d.name for d in split_dir.iterdir() if d.is_symlink() and d.is_dir())
    if linked:
        raise DataError(f"{split_dir / linked[0]} is a symbolic link to a folder: links to folders are not followed "
                        "(an image is labelled by the class folder it lies in); make it a real folder")
    found = tuple(sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")))
    if not found:
        raise DataError(f"{split_dir} has no class folders")
    if classes is None:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{split_dir} has classes that train/ lacks: {', '.join(unknown)}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        # Links to folders are not followed: a loop (train/a/x -> ..) or a link into another class
        # would add images several times or under the wrong label.
        for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=False)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, filename))
                    labels.append(label)
    if not paths:
        raise DataError(f"{split_dir} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, classes


def _check_images(paths: list[str]) -> None:
    """Opens every file's header so that an unreadable image fails here, before any writing."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Image.DecompressionBombError:
            raise DataError(f"image {path} is too large to decode safely (more than {2 * Image.MAX_IMAGE_PIXELS:,} "
                            "pixels, PIL's guard against decompression bombs); shrink it or leave it out") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise DataError(f"cannot read image {path}: {error}") from None


UNLABELLED = -1
"""The label of every image of an unlabelled dataset (pretraining only: no kNN monitor, no probe)."""


def _image_files(folder: Path) -> list[str]:
    """Every image under ``folder``, sorted; links to folders are not followed."""
    paths = [os.path.join(dirpath, name) for dirpath, _, names in sorted(os.walk(folder, followlinks=False))
             for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")]
    if not paths:
        raise DataError(f"{folder} holds no images (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _has_class_folders(folder: Path) -> bool:
    """Class folders and no loose images: an ImageFolder split (loose images make it unlabelled)."""
    entries = [entry for entry in folder.iterdir() if not entry.name.startswith(".")]
    loose = any(entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS) for entry in entries)
    return not loose and any(entry.is_dir() for entry in entries)


def load_folder(root: str | Path, max_resolution: int = 256,
                unlabelled: bool = False) -> tuple[FileSource, FileSource | None]:
    """ImageFolder layout: ``root/{train,test}/<class>/<image>``; class names from train/, sorted.

    Unlabelled images (label :data:`UNLABELLED`, no test split): ``unlabelled=True``, or a folder
    holding images itself rather than class folders (``root/train/<image>`` or ``root/<image>``),
    searched recursively.
    """
    root = Path(root)
    if max_resolution < 0:
        raise DataError(f"--data.max_resolution must be >= 0 (0 = keep the stored size), got {max_resolution}")
    if not root.is_dir():
        raise DataError(f"folder dataset root {root} does not exist")
    images = root / "train" if (root / "train").is_dir() else root
    if unlabelled or not _has_class_folders(images):
        return unlabelled_source(_image_files(images), max_resolution), None
    train_paths, train_labels, classes = _scan_split(root / "train", None)
    test_paths, test_labels, _ = _scan_split(root / "test", classes)
    _check_images(train_paths + test_paths)
    return (FileSource(train_paths, np.array(train_labels), classes, max_side_bound=max_resolution),
            FileSource(test_paths, np.array(test_labels), classes, max_side_bound=max_resolution))


def unlabelled_source(paths: list[str], max_resolution: int = 256) -> FileSource:
    """Image files as one unlabelled split (each checked readable first)."""
    _check_images(paths)
    return FileSource(paths, np.full(len(paths), UNLABELLED, dtype=np.int64), (), max_side_bound=max_resolution)


def load_file_list(list_file: str | Path, max_resolution: int = 256) -> tuple[FileSource, None]:
    """A text file naming one image per line (relative to the file's folder, or absolute): unlabelled."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"--data.file_list={list_file} does not exist")
    names = [line.strip() for line in list_file.read_text(encoding="utf-8-sig", errors="replace").splitlines()]
    paths = [str(name if Path(name).is_absolute() else list_file.parent / name) for name in names if name]
    missing = [path for path in paths if not Path(path).is_file()]
    if not paths or missing:
        raise DataError(f"{list_file} names no images" if not paths else
                        f"{list_file} names {len(missing)} missing file(s), e.g. {missing[0]}")
    return unlabelled_source(paths, max_resolution), None


# ---------------------------------------------------------------------------------------------
def load_synthetic(num_train: int, num_test: int, size: int = 32, seed: int = 0) -> tuple[ArraySource, ArraySource]:
    """The procedural dataset; train and test come from independent streams of ``seed``."""
    train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
    try:
        train = make_synthetic(num_train, size, seed=train_seed)
        test = make_synthetic(num_test, size, seed=test_seed)
    except ValueError as error:
        raise DataError(str(error)) from None
    return ArraySource(*train, CLASS_NAMES), ArraySource(*test, CLASS_NAMES)


def n_shot_indices(labels: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``shots`` examples per class, drawn without replacement from ``seed``."""
    if shots < 1:
        raise DataError(f"--data.shots must be positive, got {shots}")
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < shots:
            raise DataError(f"class {label} has only {len(members)} training images, fewer than --data.shots={shots}")
        chosen.append(rng.choice(members, size=shots, replace=False))
    return np.sort(np.concatenate(chosen))


def shots_file_indices(source, path: str | Path) -> np.ndarray:
    """Sorted training indices named by a split file (e.g. the published 40-shot split).

    One entry per line: an index into the training split (0-based, in the order this project reads
    it: a folder's class folders sorted by name, each walked in sorted order; Mini-ImageNet's
    classes sorted by name, each in the split files' order less its last
    ``--data.mini_test_per_class``; CIFAR's batch order) or an image file name, either its base name
    (``n0153282900000005.jpg``) or its path relative to anything above it (``cat/0001.jpg``). A
    ``#`` starts a comment (whole line or after the entry); of a CSV line (``name,label``) the first
    field is read. Raises :class:`DataError` naming the first unknown, ambiguous, out-of-range or
    repeated entry.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    entries = [(number, line.split("#", 1)[0].split(",", 1)[0].strip()) for number, line in enumerate(lines, 1)]
    entries = [(number, entry) for number, entry in entries if entry]
    if not entries:
        raise DataError(f"--data.shots_file {path} names no images")
    names = [Path(name).as_posix() for name in getattr(source, "paths", [])]
    by_base: dict[str, list[int]] = {}
    for index, name in enumerate(names):
        by_base.setdefault(name.rsplit("/", 1)[-1], []).append(index)
    chosen: dict[int, int] = {}
    for number, entry in entries:
        where = f"{path}:{number}"
        if entry.lstrip("+-").isdecimal():  # not isdigit(): "²" is a digit that int() refuses
            index = int(entry)
            if not 0 <= index < len(source):
                raise DataError(f"{where}: index {index} is out of range (the training split has {len(source)} "
                                f"images, indexed from 0)")
        else:
            if not names:
                raise DataError(f"{where}: {entry!r} is a file name, but this dataset's images have none; use indices")
            wanted = entry.replace("\\", "/").removeprefix("./")
            matches = [i for i in by_base.get(wanted.rsplit("/", 1)[-1], [])
                       if names[i] == wanted or names[i].endswith("/" + wanted)]
            if len(matches) != 1:
                raise DataError(f"{where}: {entry!r} " + (
                    "matches no training image (is it a test image, or misspelt?)" if not matches else
                    f"matches {len(matches)} training images; give more of its path"))
            index = matches[0]
        if index in chosen:
            raise DataError(f"{where}: {entry!r} names the same image as line {chosen[index]}")
        chosen[index] = number
    return np.array(sorted(chosen), dtype=np.int64)
