"""Frozen-model features: the one implementation of feature extraction, from a loader or from images.

:func:`extract_features` (eval transform, AMP on GPU, batched) serves every evaluation protocol
and the kNN monitor; :func:`embed_images` runs a model over uint8 images already on the device
(the monitor's cached images, the health figures' held-out images); :func:`read_images` reads a
whole beton onto the device once, for such caches.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from core.device import amp_dtype
from core.progress import progress_bar
from data_prep.loader import BetonLoader, check_batch_labels


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Autocast in :func:`core.device.amp_dtype` on a CUDA device when ``enabled``; nothing elsewhere."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype(device))


def feature_batch(device: torch.device, image_size: int) -> int:
    """Images per forward when extracting features (eval mode, no gradient): on a GPU as many as
    about 8 M pixels (8,192 CIFAR images, 256 at 224 px), on the CPU 512."""
    if device.type != "cuda":
        return 512
    return max(256, min(8192, 2**23 // (image_size * image_size)))


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: BetonLoader, transform: nn.Module,
                     amp: bool | None = None, progress: bool = False, desc: str = "features",
                     checksums: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image of ``loader`` (which must be in eval mode).

    Returns ``features`` (N, F) float32 and ``labels`` (N,) int64, both on the loader's device.
    The backbone runs in eval mode (restored afterwards) under autocast on CUDA. Labels outside
    the beton's classes raise :class:`~data_prep.loader.CorruptBatchError` naming the batch.
    ``checksums``, a list, receives each batch's :func:`image_checksums` (of the images embedded).
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
            labels.append(batch.labels)
            if checksums is not None:
                checksums.append(image_checksums(batch.images))
    finally:
        backbone.train(was_training)
    labels = torch.cat(labels)
    check_batch_labels(labels, loader)
    return torch.cat(features), labels


def image_checksums(images: torch.Tensor) -> torch.Tensor:
    """The sum of each uint8 image's bytes: (N, 3, H, W) -> (N,) int64 on the images' device."""
    return images.sum(dim=(1, 2, 3), dtype=torch.int64)


def read_images(loader: BetonLoader, progress: bool = False, desc: str = "reading") -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an eval-mode ``loader`` (its ``indices`` only, when it has some), decoded once:
    uint8 (N, 3, H, W) and labels (N,) on its device."""
    if loader.train:
        raise ValueError("reading a beton whole needs an eval-mode loader (every sample once, in order)")
    images, labels = [], []
    for batch in progress_bar(loader, progress, desc=desc, leave=False, unit="batch"):
        images.append(batch.images)
        labels.append(batch.labels)
    labels = torch.cat(labels)
    check_batch_labels(labels, loader)
    return torch.cat(images).contiguous(memory_format=torch.channels_last), labels


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
