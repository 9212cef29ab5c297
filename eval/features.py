"""The one feature-extraction path: frozen backbone, the eval transform, AMP on GPU, batched.

Used by the kNN monitor during pretraining and by every evaluation protocol.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

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
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc=desc, leave=False, unit="batch")
    try:
        for batch in batches:
            images = transform(batch.images)
            with autocast_context(device, amp):
                output = backbone(images)
            features.append(output.float())
            labels.append(batch.labels.clone())  # loader batches are reused buffers
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)
