"""Frozen-backbone features and the weighted kNN classifier: the one implementation of each.

:func:`extract_features` (eval transform, AMP on GPU, batched) serves every evaluation protocol
and the kNN monitor of pretraining; :func:`knn_predict` / :func:`evaluate_knn` (Wu et al. 2018:
weighted vote of the k most similar L2-normalised features, weight exp(similarity / t)) serve
``eval/knn.py`` and the monitor. Imports nothing from ``train``: the trainer and the protocols
both build on it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from core.progress import progress_bar
from data_prep.loader import BetonLoader


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device that supports it, fp16 on older ones; nothing elsewhere."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: BetonLoader, transform: nn.Module,
                     amp: bool | None = None, progress: bool = False, desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image of ``loader`` (which must be in eval mode).

    Returns ``features`` (N, F) float32 and ``labels`` (N,) int64, both on the loader's device.
    The backbone runs in eval mode (restored afterwards) under autocast on CUDA.
    """
    if loader.train:
        raise ValueError("feature extraction needs an eval-mode loader (every sample once, in order)")
    device = loader.device
    amp = device.type == "cuda" if amp is None else amp
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    batches = progress_bar(loader, progress, desc=desc, leave=False, unit="batch")
    try:
        for batch in batches:
            features.append(_embed(backbone, batch.images, transform, amp))
            labels.append(batch.labels.clone())  # loader batches are reused buffers
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def embed_images(model: nn.Module, images: torch.Tensor, transform: nn.Module, batch_size: int,
                 amp: bool | None = None) -> torch.Tensor:
    """``model`` (eval mode, restored afterwards) over uint8 ``images`` (N, 3, H, W) in batches: (N, F) float32."""
    amp = images.device.type == "cuda" if amp is None else amp
    was_training = model.training
    model.eval()
    try:
        return torch.cat([_embed(model, images[start:start + batch_size], transform, amp)
                          for start in range(0, len(images), batch_size)])
    finally:
        model.train(was_training)


def _embed(model: nn.Module, images: torch.Tensor, transform: nn.Module, amp: bool) -> torch.Tensor:
    images = transform(images).contiguous(memory_format=torch.channels_last)
    with autocast_context(images.device, amp):
        return model(images).float()


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores of ``queries`` by weighted vote of their ``k`` nearest bank entries.

    bank: (N, F); bank_labels: (N,) int64; queries: (Q, F). Features are L2-normalised here;
    each neighbour votes with weight exp(cosine similarity / temperature).
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
                 k: int = 200, temperature: float = 0.1) -> dict[str, float]:
    """Weighted-kNN top-1/top-5 accuracy of ``queries`` against the ``bank``."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    return topk_accuracy(knn_predict(bank, bank_labels, queries, num_classes, k, temperature), query_labels)


def evaluate_knn(backbone: torch.nn.Module, bank_loader, query_loader, transform: torch.nn.Module,
                 k: int = 200, temperature: float = 0.1, progress: bool = False) -> dict[str, float]:
    """kNN accuracy of a frozen backbone: the bank loader's images vote for the query loader's."""
    bank, bank_labels = extract_features(backbone, bank_loader, transform, progress=progress, desc="kNN bank")
    queries, query_labels = extract_features(backbone, query_loader, transform, progress=progress, desc="kNN queries")
    return knn_accuracy(bank, bank_labels, queries, query_labels, k, temperature)
