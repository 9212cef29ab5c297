"""The one checkpoint format: ``checkpoints/last.pt``, written atomically.

A checkpoint is a dict with ``model`` (the *uncompiled*, unwrapped encoder's state_dict),
``optimizer``, ``scaler`` (or None), ``step`` (global optimiser steps: the schedule position),
``epoch`` (epochs completed), ``batch_in_epoch`` (steps already done in an interrupted epoch),
``epoch_sums`` (that epoch's partial loss sums), ``rng`` (python, numpy, torch, cuda states) and
``config`` (the resolved config). It is written to a temporary file in the same folder, then
renamed: a crash at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import IO, Callable

import numpy as np
import torch

from train.config import UserError

# Config keys that must match to resume: they change the weights' shapes or meaning.
ARCHITECTURE_KEYS = ("arch", "cifar_stem", "proj_dim", "proj_layers", "proj_hidden", "image_size")


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the current config."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = True) -> None:
    """Calls ``write(handle)`` on a temporary file beside ``path``, then renames it over ``path``.

    A crash or an exception at any moment leaves either the old file or the new one, never a
    half-written one. The project's one way of writing result files (checkpoints, weights, JSON).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Writes ``state`` to ``path`` atomically (temporary file + rename)."""
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path) -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint` (on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - truncated, not a torch file, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {error.__class__.__name__}: {error}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a SimMER pretraining checkpoint (no model/config inside)")
    return state


def check_compatible(saved: dict, current: dict, path: str | Path) -> None:
    """Refuses to resume a checkpoint whose architecture differs from the current config's."""
    differences = [f"cfg.{key}: checkpoint {saved['cfg'].get(key)!r} vs now {current['cfg'].get(key)!r}"
                   for key in ARCHITECTURE_KEYS if saved["cfg"].get(key) != current["cfg"].get(key)]
    if differences:
        raise CheckpointError(f"{path} was made with another architecture ({'; '.join(differences)}); "
                              "use another --run.dir or the same settings")
