"""Shared fixtures: tiny betons written with the real writer."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_prep.sources import ArraySource, load_synthetic
from data_prep.writer import write_betons


@pytest.fixture(scope="session")
def betons(tmp_path_factory) -> dict[str, Path]:
    """96 train / 48 test synthetic images of 16 px, 10 classes."""
    folder = tmp_path_factory.mktemp("betons")
    train, test = load_synthetic(96, 48, size=16, seed=0)
    paths = {"train": folder / "train.beton", "test": folder / "test.beton"}
    write_betons({paths["train"]: train, paths["test"]: test}, num_workers=1)
    return paths


@pytest.fixture(scope="session")
def separable_betons(tmp_path_factory) -> dict[str, Path]:
    """Two trivially separable classes of 16 px images: dark noise (label 0) and bright noise (label 1)."""
    folder = tmp_path_factory.mktemp("separable")
    rng = np.random.default_rng(0)

    def split(count: int) -> ArraySource:
        labels = np.arange(count) % 2
        low = rng.integers(0, 60, size=(count, 16, 16, 3))
        images = np.where(labels[:, None, None, None] == 1, 255 - low, low).astype(np.uint8)
        return ArraySource(images, labels, ("dark", "bright"))
    paths = {"train": folder / "train.beton", "test": folder / "test.beton"}
    write_betons({paths["train"]: split(64), paths["test"]: split(32)}, num_workers=1)
    return paths
