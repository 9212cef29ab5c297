"""The weighted kNN classifier of measure/knn.py: hand-worked votes, then real betons.

Votes follow Wu et al. 2018: the k bank entries most cosine-similar to a query vote for their
class with weight exp(similarity / t).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from augment import build_eval_transform
from data_prep.loader import BetonLoader
from data_prep.sources import ArraySource
from data_prep.writer import write_betons
from measure.features import extract_features
from measure.knn import evaluate_knn, knn_accuracy, knn_predict, topk_accuracy
from eval.knn import main as knn_main

pytestmark = pytest.mark.timeout(120)


def _at(degrees: float, length: float = 1.0) -> list[float]:
    return [length * math.cos(math.radians(degrees)), length * math.sin(math.radians(degrees))]


# Five 2-D bank entries at 0, 60, 90, 120 and 180 degrees (lengths differ: only directions count).
BANK = torch.tensor([_at(0, 2.0), _at(60, 3.0), _at(90, 0.5), _at(120, 1.0), _at(180, 4.0)])
BANK_LABELS = torch.tensor([0, 1, 1, 2, 2])
# Cosine similarity of a query at 0 degrees to each entry: 1, 0.5, 0, -0.5, -1.
E = math.e


@pytest.mark.parametrize("k, temperature, expected", [
    (1, 0.1, [math.exp(10), 0.0, 0.0]),  # the nearest entry alone
    (3, 0.5, [E ** 2, E ** 1 + 1.0, 0.0]),  # 0, 60 and 90 degrees: exp(1/0.5), exp(0.5/0.5) + exp(0/0.5)
    (3, 10.0, [math.exp(0.1), math.exp(0.05) + 1.0, 0.0]),  # a high temperature: almost a plain count
    (5, 0.5, [E ** 2, E + 1.0, E ** -1 + E ** -2]),  # everyone votes
    (50, 0.5, [E ** 2, E + 1.0, E ** -1 + E ** -2]),  # k larger than the bank: everyone votes
])
def test_votes_are_the_similarity_weighted_sums_of_the_k_nearest(k, temperature, expected):
    scores = knn_predict(BANK, BANK_LABELS, torch.tensor([_at(0, 5.0)]), num_classes=3, k=k, temperature=temperature)
    assert scores.shape == (1, 3) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor([expected]), rtol=1e-5, atol=1e-6)


def test_the_nearest_neighbours_decide_not_the_farthest():
    queries = torch.tensor([_at(0), _at(180, 7.0)])
    for k in (1, 3):
        predicted = knn_predict(BANK, BANK_LABELS, queries, num_classes=3, k=k, temperature=0.5).argmax(1)
        assert predicted.tolist() == [0, 2], k


def test_temperature_decides_between_one_close_and_two_farther_neighbours():
    # At 0 degrees, k = 3: class 0 has the one closest entry, class 1 two less similar ones.
    query = torch.tensor([_at(0)])
    assert knn_predict(BANK, BANK_LABELS, query, 3, k=3, temperature=0.5).argmax(1).item() == 0  # e^2 > e + 1
    assert knn_predict(BANK, BANK_LABELS, query, 3, k=3, temperature=10.0).argmax(1).item() == 1  # 1.105 < 2.051


def test_chunks_give_the_same_scores():
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(40, 6, generator=gen), torch.randn(9, 6, generator=gen)
    labels = torch.randint(0, 4, (40,), generator=gen)
    whole = knn_predict(bank, labels, queries, 4, k=7, temperature=0.2)
    torch.testing.assert_close(knn_predict(bank, labels, queries, 4, k=7, temperature=0.2, chunk=2), whole)
    assert (whole.sum(1) > 0).all()  # every query got votes


def test_topk_accuracy_counts_ranks_by_hand():
    descending = [0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    scores = torch.tensor([descending, descending, descending, [0.0, 0.1, 0.9, 0.2, 0.3, 0.4, 0.5]])
    labels = torch.tensor([0, 4, 5, 2])  # ranks 1, 5, 6, 1
    accuracy = topk_accuracy(scores, labels)
    assert accuracy["top1"] == pytest.approx(2 / 4)
    assert accuracy["top5"] == pytest.approx(3 / 4)
    assert topk_accuracy(scores, labels, ks=(1, 2, 6)) == pytest.approx({"top1": 0.5, "top2": 0.5, "top6": 1.0})
    # Fewer classes than k: top-k is over all classes.
    assert topk_accuracy(torch.tensor([[0.2, 0.8]]), torch.tensor([0]))["top5"] == pytest.approx(1.0)


def test_knn_accuracy_top1_and_top5_by_hand():
    # Seven classes, one entry each, at 0, 20, ..., 120 degrees; queries at 0 degrees see class i
    # with similarity cos(20 i), so with k = 5 the class ranking is 0, 1, 2, 3, 4 and 5, 6 get nothing.
    bank = torch.tensor([_at(20 * i, 1.0 + i) for i in range(7)])
    bank_labels = torch.arange(7)
    queries = torch.tensor([_at(0)] * 4)
    query_labels = torch.tensor([0, 4, 5, 6])
    scores = knn_predict(bank, bank_labels, queries, 7, k=5, temperature=0.1)
    expected = [math.exp(math.cos(math.radians(20 * i)) / 0.1) if i < 5 else 0.0 for i in range(7)]
    torch.testing.assert_close(scores, torch.tensor([expected] * 4), rtol=1e-5, atol=1e-6)
    accuracy = knn_accuracy(bank, bank_labels, queries, query_labels, k=5, temperature=0.1)
    assert accuracy["top1"] == pytest.approx(1 / 4)  # only the query labelled 0
    assert accuracy["top5"] == pytest.approx(2 / 4)  # labels 0 and 4; 5 and 6 got no vote


# ------------------------------------------------------------------------- on real betons
GRID, BLOCK, CLASSES = 4, 4, 10  # 16 px images, a 4 x 4 grid of blocks


def _block_images(labels: np.ndarray, rng: np.random.Generator) -> ArraySource:
    """Dark noise with one bright 4 x 4 block, at the grid cell given by the label."""
    side = GRID * BLOCK
    images = rng.integers(0, 60, size=(len(labels), side, side, 3)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), GRID)
        block = images[i, row * BLOCK:(row + 1) * BLOCK, col * BLOCK:(col + 1) * BLOCK]
        block[...] = 255 - block
    return ArraySource(images, labels, tuple(f"cell{c}" for c in range(CLASSES)))


@pytest.fixture(scope="module")
def block_betons(tmp_path_factory) -> dict[str, Path]:
    """10 classes told apart by where their bright block is: 100 bank images, 50 queries."""
    folder = tmp_path_factory.mktemp("blocks")
    rng = np.random.default_rng(0)
    bank_labels = rng.permutation(np.arange(100) % CLASSES)
    query_labels = rng.permutation(np.arange(50) % CLASSES)
    paths = {"train": folder / "train.beton", "test": folder / "test.beton"}
    write_betons({paths["train"]: _block_images(bank_labels, rng), paths["test"]: _block_images(query_labels, rng)},
                 num_workers=1)
    return paths


def _block_means() -> nn.Module:
    """A backbone that returns each block's mean colour: (B, 3, 16, 16) -> (B, 48)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(GRID), nn.Flatten())


def test_knn_separates_separable_classes_from_a_real_beton(block_betons):
    loaders = [BetonLoader(block_betons[split], 16, train=False, num_workers=1) for split in ("train", "test")]
    transform = build_eval_transform("cifar")
    accuracy = evaluate_knn(_block_means(), *loaders, transform, k=5, temperature=0.1)
    assert accuracy["top1"] >= 0.95 and accuracy["top5"] == pytest.approx(1.0)
    # The features really are the block means of the stored images, in file order.
    features, labels = extract_features(_block_means(), loaders[1], transform)
    assert features.shape == (50, 3 * GRID * GRID) and labels.shape == (50,)
    bright = features.view(50, 3, GRID * GRID).mean(1).argmax(1)
    assert torch.equal(bright, labels)


def test_knn_protocol_separates_dark_from_bright_images(separable_betons, tmp_path):
    results = knn_main(["--eval.checkpoint=random", "--cfg.arch=test_resnet", "--knn.k=10", "--eval.progress=0",
                        "--data.num_workers=1", "--eval.device=cpu", f"--eval.out={tmp_path / 'knn.json'}",
                        f"--data.train_beton={separable_betons['train']}", f"--data.test_beton={separable_betons['test']}"])
    assert results["top1"] >= 0.95 and results["k"] == 10
