"""A few images that stand for a whole beton: spread over it, stratified by class, seeded.

Betons written from folders or Mini-ImageNet are stored class by class, so the first N images are
a few classes only. :func:`spread_indices` picks ``count`` images that cover every class in
proportion to its size (the largest-remainder rule: 8 images of 100 equal classes are 8 classes
drawn from ``seed``), and cover each class's stretch of the file (or the whole file when it is
unlabelled) evenly: its images are cut into ``quota`` equal runs in file order and one image is
drawn from each run, from ``seed``.
"""
from __future__ import annotations

import numpy as np


def _one_per_run(length: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` positions in [0, length): one drawn from each of ``count`` equal consecutive runs."""
    edges = np.floor(np.linspace(0, length, count + 1)).astype(np.int64)
    return edges[:-1] + rng.integers(0, edges[1:] - edges[:-1])


def spread_indices(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """Indices (sorted, int64) of ``count`` of the N samples whose labels are ``labels`` (N,); all when N <= count.

    Each label value (an unlabelled beton's -1 is one value) gets ``count * n_c / N`` samples,
    rounded by the largest remainder (ties drawn from ``seed``), spread evenly over its positions.
    The same labels, count and seed give the same indices.
    """
    labels = np.asarray(labels)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if count >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    values, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    exact = count * sizes / len(labels)
    quotas = np.floor(exact).astype(np.int64)
    rng = np.random.default_rng(seed)
    extra = np.lexsort((rng.permutation(len(values)), -(exact - quotas)))[:count - int(quotas.sum())]
    quotas[extra] += 1
    chosen = []
    for group, quota in enumerate(quotas):
        if quota:
            members = np.flatnonzero(inverse == group)
            chosen.append(members[_one_per_run(len(members), int(quota), rng)])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
