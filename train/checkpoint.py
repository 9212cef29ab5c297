"""The one checkpoint format: ``checkpoints/last.pt``, written atomically.

A checkpoint is a dict with ``model`` (the *uncompiled*, unwrapped encoder's state_dict),
``optimizer``, ``scaler`` (or None), ``step`` (global optimiser steps: the schedule position),
``epoch`` (epochs completed), ``batch_in_epoch`` (steps already done in an interrupted epoch),
``epoch_sums`` (that epoch's partial loss sums), ``rng`` (python, numpy, torch, cuda states) and
``config`` (the resolved config) and ``steps_per_epoch``. It is written to a temporary file in the same folder, then
renamed: a crash at any moment leaves the previous checkpoint intact.

``backbone.pt`` (:func:`save_backbone`) is the backbone alone, in timm's keys, for other code.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

from core.config import UserError
from core.io import atomic_write
from train.model import ENCODER_DEFAULTS, ENCODER_KEYS, backbone_state



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


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Writes ``state`` to ``path`` atomically (temporary file + rename).

    A failed write (a full disk, an I/O error) leaves the previous file and raises
    :class:`CheckpointError` saying what happened and how much space is left.
    """
    try:
        atomic_write(path, lambda handle: torch.save(state, handle))
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and "PytorchStreamWriter" not in str(error):
            raise
        reason = getattr(error, "strerror", None) or "the write failed"
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(Path(path).parent).free
            reason += f"; {free / 2**20:.0f} MiB free on that disk"
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}). The previous checkpoint is kept; "
                              "free some space (or fix the disk) and re-run the same command to resume") from None


class CheckpointWriter:
    """Writes checkpoints in a background thread, one at a time, each atomically.

    :meth:`save` snapshots the state on the host and returns; the file is written while training
    goes on. :meth:`wait` joins the write under way and raises its error, if any (a full disk
    surfaces at the next save or at the end of the run).

    The snapshot of a GPU tensor is an asynchronous copy, on the current stream, into a pinned host
    buffer kept for the next checkpoint (the same tensor at the same place in the state): one DMA
    transfer of the state, ordered before the optimiser steps that follow, and no host wait in the
    training thread; the writer thread waits for the copies (a CUDA event) before it writes.
    CPU tensors are copied (the live ones go on training).
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pinned: dict[tuple, torch.Tensor] = {}  # host buffers of GPU tensors, by their place in the state

    def save(self, path: str | Path, state: dict, background: bool = True) -> None:
        self.wait()  # the previous write is done: its buffers may be reused
        copied = self._snapshot(state, ())
        copied_event = None
        if self._pinned and torch.cuda.is_available():
            copied_event = torch.cuda.Event()
            copied_event.record()
        if not background:
            self._write(Path(path), copied, copied_event)
            self.wait()
            return
        self._thread = threading.Thread(target=self._write, args=(Path(path), copied, copied_event),
                                        name="checkpoint-writer")
        self._thread.start()

    def _snapshot(self, value, place: tuple):
        """A copy of ``value`` whose tensors are host tensors of their own (pinned buffers for GPU ones)."""
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.device.type != "cuda":
                return value.to("cpu", copy=True)
            buffer = self._pinned.get(place)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = self._pinned[place] = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            return buffer.copy_(value, non_blocking=True)
        if isinstance(value, dict):
            return {key: self._snapshot(item, (*place, key)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._snapshot(item, (*place, index)) for index, item in enumerate(value))
        return value

    def _write(self, path: Path, state: dict, copied_event=None) -> None:
        try:
            if copied_event is not None:
                copied_event.synchronize()
            save_checkpoint(path, state)
        except BaseException as error:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = error

    def wait(self, raise_error: bool = True) -> None:
        """Waits for the write under way; raises its error when ``raise_error``."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and raise_error:
            raise error


def mismatch_summary(error: RuntimeError) -> str:
    """The informative line of a ``load_state_dict`` error (missing, unexpected or mis-shaped keys)."""
    lines = str(error).strip().splitlines()
    return lines[1].strip() if len(lines) > 1 else lines[0]


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


# What else must stay as it was for the schedule position and the data order of a resume to mean
# the same: (section, key). cfg.K, the loss weights, cfg.lr and cfg.epochs may change.
RESUME_KEYS = (("cfg", "batch_size"), ("cfg", "warmup_epochs"), ("run", "steps_per_epoch"), ("data", "train_beton"))


def check_compatible(checkpoint: dict, current: dict, path: str | Path, steps_per_epoch: int | None = None) -> None:
    """Refuses to resume ``checkpoint`` under a config that changes its encoder, schedule or data.

    ``steps_per_epoch`` (the current run's) is compared with the checkpoint's when both are known:
    it catches a training beton rewritten with other data under the same name.
    """
    saved = checkpoint["config"]
    before = {key: saved["cfg"].get(key, ENCODER_DEFAULTS.get(key)) for key in ENCODER_KEYS}
    now = {key: current["cfg"].get(key, ENCODER_DEFAULTS.get(key)) for key in ENCODER_KEYS}
    differences = [f"cfg.{key}: checkpoint {before[key]!r} vs now {now[key]!r}"
                   for key in ENCODER_KEYS if before[key] != now[key]]
    if differences:
        raise CheckpointError(f"{path} was made with another architecture ({'; '.join(differences)}); "
                              "use another --run.dir or the same settings")
    differences = [f"{section}.{key}: checkpoint {saved[section].get(key)!r} vs now {current[section].get(key)!r}"
                   for section, key in RESUME_KEYS if saved.get(section, {}).get(key) != current[section].get(key)]
    saved_steps = checkpoint.get("steps_per_epoch")
    if steps_per_epoch is not None and saved_steps is not None and saved_steps != steps_per_epoch:
        differences.append(f"steps per epoch: checkpoint {saved_steps} vs now {steps_per_epoch} (other data?)")
    if differences:
        raise CheckpointError(f"{path} cannot resume with another schedule or data ({'; '.join(differences)}): "
                              "the learning-rate schedule and the data order would no longer match. "
                              "Use the checkpoint's settings, or another --run.dir for a new run")


def save_backbone(encoder: torch.nn.Module, path: str | os.PathLike) -> None:
    """Writes the backbone's weights (:func:`train.model.backbone_state`) to ``path`` atomically.

    Readable with ``torch.load(path, weights_only=True)`` into a plain timm model (README).
    """
    state = backbone_state(encoder)
    atomic_write(path, lambda handle: torch.save(state, handle))
