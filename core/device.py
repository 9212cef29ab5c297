"""Where the work runs and in which precision: the device choice (``auto``, ``cpu``, ``cuda``) and
the autocast dtype, decided once for pretraining, evaluation and the benchmarks."""
from __future__ import annotations

import torch

from core.config import ConfigError


def resolve_device(choice: str, flag: str = "device", index: int | None = None) -> torch.device:
    """``cuda`` (device ``index``) for ``cuda``, and for ``auto`` when CUDA is available; else ``cpu``.

    Raises :class:`ConfigError` naming ``flag`` when ``cuda`` is asked for without a CUDA device.
    """
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag}=cuda but no CUDA device is available (use {flag}=cpu or auto)")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    return torch.device("cpu")


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype on ``device``: bf16, except fp16 on CUDA devices without bf16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16
