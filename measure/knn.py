"""The weighted kNN classifier (Wu et al. 2018): the one implementation, for ``eval/knn.py`` and
the monitor of pretraining.

Each query's ``k`` most similar bank features (cosine similarity of L2-normalised features) vote
for their classes with weight exp(similarity / t).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from core.config import ConfigError
from data_prep.loader import BetonInfo, BetonLoader
from measure.features import extract_features


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores of ``queries`` by weighted vote of their ``k`` nearest bank entries.

    bank: (N, F); bank_labels: (N,) int64 in [0, num_classes); queries: (Q, F). Features are
    L2-normalised here; each neighbour votes with weight exp(cosine similarity / temperature).
    Returns scores (Q, num_classes) float32.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(queries), chunk):
        similarity = queries[start:start + chunk] @ bank.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(top_idx), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` fractions in [0, 1] (top-k with k <= number of classes)."""
    result = {}
    ranked = scores.argsort(dim=1, descending=True)
    for k in ks:
        k_eff = min(k, scores.shape[1])
        result[f"top{k}"] = (ranked[:, :k_eff] == labels[:, None]).any(dim=1).float().mean().item()
    return result


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 k: int = 200, temperature: float = 0.1, num_classes: int | None = None) -> dict[str, float]:
    """Weighted-kNN top-1/top-5 accuracy of ``queries`` against the ``bank``.

    ``num_classes`` defaults to the largest label + 1, which must not exceed the number of labels
    (a bound that only corrupt labels break: they raise ValueError instead of asking for a score
    table of absurd size).
    """
    largest = int(max(bank_labels.max(), query_labels.max()))
    smallest = int(min(bank_labels.min(), query_labels.min()))
    if num_classes is None:
        num_classes = largest + 1
        if num_classes > len(bank_labels) + len(query_labels):
            raise ValueError(f"labels up to {largest} for {len(bank_labels) + len(query_labels)} images: corrupt labels")
    if smallest < 0 or largest >= num_classes:
        raise ValueError(f"labels outside [0, {num_classes}): from {smallest} to {largest}")
    return topk_accuracy(knn_predict(bank, bank_labels, queries, num_classes, k, temperature), query_labels)


def evaluate_knn(backbone: torch.nn.Module, bank_loader: BetonLoader, query_loader: BetonLoader, transform: torch.nn.Module,
                 k: int = 200, temperature: float = 0.1, progress: bool = False) -> dict[str, float]:
    """kNN accuracy of a frozen backbone: the bank loader's images vote for the query loader's."""
    bank, bank_labels = extract_features(backbone, bank_loader, transform, progress=progress, desc="kNN bank")
    queries, query_labels = extract_features(backbone, query_loader, transform, progress=progress, desc="kNN queries")
    num_classes = max(bank_loader.info.num_classes, query_loader.info.num_classes)
    return knn_accuracy(bank, bank_labels, queries, query_labels, k, temperature, num_classes)


def check_label_sets(train: BetonInfo, test: BetonInfo) -> None:
    """Refuses unlabelled betons and a test set none of whose classes the training set has; warns when
    some are missing."""
    unlabelled = [str(info.path) for info in (train, test) if not info.labelled]
    if unlabelled:
        raise ConfigError(f"{' and '.join(dict.fromkeys(unlabelled))} {'is' if len(set(unlabelled)) == 1 else 'are'} "
                          "unlabelled (every label -1): evaluation needs labelled training and test betons "
                          "(--data.train_beton, --data.test_beton); pretraining does not")
    train_classes, test_classes = set(np.unique(train.labels).tolist()), set(np.unique(test.labels).tolist())
    missing = sorted(test_classes - train_classes)
    if missing and len(missing) == len(test_classes):
        raise ConfigError(f"none of the labels of {test.path} ({_labels(test_classes)}) occur in {train.path} "
                          f"({_labels(train_classes)}): are they betons of the same dataset?")
    if missing:
        warnings.warn(f"{len(missing)} test class(es) of {test.path} never occur in {train.path} "
                      f"({_labels(missing)}): their images cannot be classified correctly", stacklevel=2)


def _labels(values) -> str:
    values = sorted(values)
    return ", ".join(map(str, values[:8])) + (f", ... ({len(values)} in all)" if len(values) > 8 else "")
