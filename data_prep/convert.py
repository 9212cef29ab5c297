"""Raw dataset -> ``<out_dir>/<dataset>_{train,test}.beton`` (+ the optional N-shot beton)."""
from __future__ import annotations

import time
from pathlib import Path

from data_prep.sources import (DataError, load_cifar, load_file_list, load_folder, load_miniimagenet,
                               load_synthetic, n_shot_indices, shots_file_indices)
from core.io import check_names
from data_prep.writer import WriteResult, check_out_dir, describe, write_betons

DEFAULT_RAW_ROOT = Path("data") / "raw"


def beton_paths(out_dir: str | Path, dataset: str, shots: int = 0, shots_file: str | Path = "") -> dict[str, Path]:
    """Where a dataset's betons go: keys ``train``, ``test`` and, with shots or a shots file, ``shots``
    (``<dataset>_train_<N>shot.beton``, or ``<dataset>_train_<file stem>.beton``)."""
    out_dir = Path(out_dir)
    paths = {"train": out_dir / f"{dataset}_train.beton", "test": out_dir / f"{dataset}_test.beton"}
    if shots:
        paths["shots"] = out_dir / f"{dataset}_train_{shots}shot.beton"
    elif str(shots_file):
        paths["shots"] = out_dir / f"{dataset}_train_{Path(shots_file).stem}.beton"
    return paths


def load_dataset(dataset: str, root: str | Path = "", *, download: bool = True, seed: int = 0,
                 max_resolution: int = 256, mini_test_per_class: int = 100, synthetic_train: int = 5000,
                 synthetic_test: int = 1000, synthetic_size: int = 32, unlabelled: bool = False, file_list: str = ""):
    """The ``(train, test)`` sources of ``dataset`` (see :mod:`data_prep.sources`); test is None for
    unlabelled images (``folder`` without class folders or with ``unlabelled``, or a ``file_list``)."""
    if file_list:
        if dataset != "folder":
            raise DataError("--data.file_list goes with --data.dataset=folder")
        return load_file_list(file_list, max_resolution)
    if unlabelled and dataset != "folder":
        raise DataError("--data.unlabelled goes with --data.dataset=folder")
    root = Path(root) if str(root) else DEFAULT_RAW_ROOT / dataset
    if dataset in ("cifar10", "cifar100"):
        return load_cifar(dataset, root, download=download)
    if dataset == "miniimagenet":
        return load_miniimagenet(root, mini_test_per_class)
    if dataset == "folder":
        return load_folder(root, max_resolution, unlabelled)
    if dataset == "synthetic":
        return load_synthetic(synthetic_train, synthetic_test, synthetic_size, seed)
    raise DataError(f"unknown dataset {dataset!r}")


def convert(dataset: str, root: str | Path = "", out_dir: str | Path = "data", *, shots: int = 0, seed: int = 0,
            shots_file: str | Path = "", write_mode: str = "raw", jpeg_quality: int = 90, num_workers: int = 0, **source_options) -> list[WriteResult]:
    """Converts ``dataset`` into betons and prints a summary; returns what was written."""
    start = time.perf_counter()
    if shots < 0:
        raise DataError(f"--data.shots must be >= 0, got {shots}")
    if shots and str(shots_file):
        raise DataError("give --data.shots (a seeded draw) or --data.shots_file (a fixed split), not both")
    if str(shots_file) and not Path(shots_file).is_file():
        raise DataError(f"--data.shots_file {shots_file} does not exist")
    check_out_dir(out_dir)  # before any loading, which can take long
    paths = beton_paths(out_dir, dataset, shots, shots_file)
    if str(shots_file):
        check_names(paths["shots"].name, "--data.shots_file (its stem names the beton)")
    train, test = load_dataset(dataset, root, seed=seed, **source_options)
    splits = {paths["train"]: train} if test is None else {paths["train"]: train, paths["test"]: test}
    if "shots" in paths and test is None:
        raise DataError(f"--data.{'shots' if shots else 'shots_file'} needs labelled images: these have no classes")
    if shots:
        splits[paths["shots"]] = train.subset(n_shot_indices(train.labels, shots, seed))
    elif str(shots_file):
        splits[paths["shots"]] = train.subset(shots_file_indices(train, shots_file))
    results = write_betons(splits, write_mode=write_mode, jpeg_quality=jpeg_quality, num_workers=num_workers)
    print(describe(results, len(train.classes), time.perf_counter() - start), flush=True)
    if test is None:
        print(f"unlabelled images: only {paths['train']} is written; pretrain with --run.knn_every=0 "
              "(the kNN monitor and the probe need labels)", flush=True)
    return results
