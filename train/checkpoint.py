"""The one checkpoint format: ``checkpoints/last.pt``, written atomically.

A checkpoint is a dict with ``model`` (the *uncompiled*, unwrapped encoder's state_dict),
``optimizer``, ``scaler`` (or None), ``step`` (global optimiser steps: the schedule position),
``epoch`` (epochs completed), ``batch_in_epoch`` (steps already done in an interrupted epoch),
``epoch_sums`` (that epoch's partial loss sums), ``rng`` (python, numpy, torch, cuda states) and
``config`` (the resolved config) and ``steps_per_epoch``. It is written to a temporary file in the same folder, then
renamed: a crash at any moment leaves the previous checkpoint intact.

Every file is read with ``torch.load(..., weights_only=True)`` (:func:`safe_load`): tensors, numbers,
strings and containers only, so a checkpoint cannot run code when it is loaded. The states above
are stored in that form (numpy's RNG state as a dict of plain values and a tensor); a file that
needs more is refused with one line.

``backbone.pt`` (:func:`save_backbone`) is the backbone alone, in timm's keys, for other code.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from core.config import UserError
from core.io import atomic_write
from train.model import ENCODER_DEFAULTS, ENCODER_KEYS, backbone_state


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit the current config."""


def rng_state() -> dict:
    """The python, numpy, torch (and CUDA) generators' states, in a form ``weights_only`` loading reads."""
    legacy = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key", "pos"}, "has_gauss", "gauss"}
    numpy_state = {"bit_generator": legacy["bit_generator"], "pos": int(legacy["state"]["pos"]),
                   "key": torch.from_numpy(legacy["state"]["key"].astype(np.int64)),
                   "has_gauss": int(legacy["has_gauss"]), "gauss": float(legacy["gauss"])}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state(saved):
    """``np.random.set_state``'s argument from a saved state (:func:`rng_state`'s dict, or the legacy tuple)."""
    if not isinstance(saved, dict):
        return saved
    return {"bit_generator": saved["bit_generator"], "has_gauss": saved["has_gauss"], "gauss": saved["gauss"],
            "state": {"key": saved["key"].numpy().astype(np.uint32), "pos": saved["pos"]}}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(_numpy_state(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What torch raises when the file under its zip writer fails (a full disk, an I/O error): the
# Python error is swallowed and only the writer's position check reports it.
_TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "inline_container", "unexpected pos")


def _write_torch_file(path: str | Path, state, what: str, advice: str) -> None:
    """``torch.save(state)`` to ``path`` atomically; a failed write is one :class:`CheckpointError` line."""
    try:
        atomic_write(path, lambda handle: torch.save(state, handle))
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not any(mark in str(error) for mark in _TORCH_WRITE_FAILURES):
            raise
        free = None
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(Path(path).parent).free
        if isinstance(error, OSError):
            reason = error.strerror or error.__class__.__name__
        elif free is not None and free < 2**20:
            reason = "No space left on device"
        else:
            reason = "the write stopped short (an I/O error?)"
        if free is not None:
            reason += f"; {free / 2**20:.0f} MiB free on that disk"
        raise CheckpointError(f"cannot write {what} {path} ({reason}). {advice}") from None


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Writes ``state`` to ``path`` atomically (temporary file + rename).

    A failed write (a full disk, an I/O error; torch reports the first as ``OSError`` or as its
    writer's ``unexpected pos``) leaves the previous file and raises :class:`CheckpointError`
    saying what happened and how much space is left.
    """
    _write_torch_file(path, state, "checkpoint", "The previous checkpoint is kept; free some space (or fix the "
                      "disk) and re-run the same command to resume")


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


# Checkpoints written before the RNG states were stored as plain values hold numpy's state as an
# array; these three rebuild a numeric array and nothing else.
_NUMPY_ARRAY_GLOBALS = (np.ndarray, np.dtype, np.dtype("uint32").__class__,
                        getattr(np, "_core", np.core).multiarray._reconstruct)


def safe_load(path: str | Path, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` on CPU; any failure is one :class:`CheckpointError` line.

    A file holding anything but tensors, numbers, strings and containers (a pickled class or function,
    which could run code when loaded) is refused, naming the first such object; it is never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with torch.serialization.safe_globals(list(_NUMPY_ARRAY_GLOBALS)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a foreign pickle: refused below
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, not a torch file, foreign objects, ...
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        unsafe = next((match.group(1) for line in lines if (match := re.search(r"GLOBAL ([\w.]+)", line))), None)
        if unsafe is not None:
            raise CheckpointError(f"refusing to load {what} {path}: it holds a reference to {unsafe}, which could "
                                  "run code when loaded (only tensors and plain values are read); nothing of it "
                                  "was executed") from None
        if isinstance(error, pickle.UnpicklingError):
            detail = next((line for line in reversed(lines) if not line.startswith("Check the documentation")), "")
            raise CheckpointError(f"cannot read {what} {path}: not a PyTorch file of tensors and plain values "
                                  f"({detail.rstrip('.')})") from None
        detail = lines[0] if lines else "empty or truncated"
        raise CheckpointError(f"cannot read {what} {path}: {error.__class__.__name__}: {detail}") from None


def load_checkpoint(path: str | Path) -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint` (on CPU, weights only: :func:`safe_load`)."""
    path = Path(path)
    state = safe_load(path)
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
    _write_torch_file(path, state, "the backbone's weights", "The checkpoint holds them too; free some space "
                      "(or fix the disk) and re-run the same command to write them")
