"""The run directory: where its files live, and one run at a time in it.

A run holds an exclusive OS lock (``flock``) on ``<run dir>/.lock`` for its whole life. The kernel
releases it when the process ends, however it ends (even ``kill -9``), so a stale lock never blocks
a resume; a second run started on the same directory stops at once, naming the holder's pid.
Holding the lock also makes it safe to delete the temporary files that a killed checkpoint write
left behind. Before any work the run checks that it can write where it will write.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator

from core.config import UserError
from core.io import check_names


class RunDirError(UserError):
    """The run directory is busy or cannot be written."""


class RunDir:
    """The files of a run directory (see train/trainer.py for what each holds)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.last_checkpoint = self.checkpoints / "last.pt"
        self.log = self.path / "log.jsonl"
        self.config = self.path / "config.yaml"
        self.summary = self.path / "summary.json"
        self.backbone = self.path / "backbone.pt"

    def read_config(self) -> dict | None:
        """The run's resolved config (``config.yaml``), ``None`` when it has none; a file that is not
        YAML, or not a mapping of sections, raises :class:`~core.config.UserError` in one line."""
        import yaml

        if not self.config.is_file():
            return None
        try:
            config = yaml.safe_load(self.config.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            first = (str(error).strip().splitlines() or [""])[0]
            raise UserError(f"cannot read {self.config}: {error.__class__.__name__}: {first}") from None
        if not isinstance(config, dict):
            raise UserError(f"{self.config} is not a run's config (a mapping of sections)")
        return config

    @contextlib.contextmanager
    def locked(self) -> Iterator["RunDir"]:
        """Holds the run directory's lock; raises :class:`RunDirError` when another process holds it."""
        check_names(self.path, "--run.dir")
        self._make(self.path)
        lock_path = self.path / ".lock"
        try:
            handle = open(lock_path, "a+")
        except OSError as error:
            raise RunDirError(f"cannot write to the run directory {self.path}: {error.strerror}") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise RunDirError(f"{self.path} is in use by another run (pid {holder}); wait for it to finish, "
                                  "stop it, or use another --run.dir") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            try:
                yield self
            finally:
                handle.seek(0)
                handle.truncate()
                fcntl.flock(handle, fcntl.LOCK_UN)

    def prepare(self) -> int:
        """Checks that checkpoints can be written and removes stale temporaries; returns how many.

        Call it while holding :meth:`locked`: only then is no other process writing them.
        """
        self._make(self.checkpoints)
        try:
            with tempfile.TemporaryFile(dir=self.checkpoints):
                pass
        except OSError as error:
            raise RunDirError(f"cannot write checkpoints to {self.checkpoints}: {error.strerror}") from None
        stale = [p for folder in (self.path, self.checkpoints) for p in folder.glob(".*.tmp") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    @staticmethod
    def _make(folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunDirError(f"{folder} exists and is not a directory") from None
        except OSError as error:
            raise RunDirError(f"cannot create {folder}: {error.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise RunDirError(f"cannot write to {folder}: {os.strerror(errno.EACCES)}")
