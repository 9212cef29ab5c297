"""Writing files so that a crash never leaves a half-written one, and reading JSON-lines logs."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import IO, Callable

from core.config import UserError


def open_mode(path: str | Path) -> int:
    """The permission bits a plain ``open(path, "w")`` would give a new file: 0o666 less the umask
    (``tempfile.mkstemp`` makes 0o600 files whatever the umask); an existing file keeps its own."""
    with contextlib.suppress(FileNotFoundError):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, write: Callable[[IO], None], binary: bool = True) -> None:
    """Calls ``write(handle)`` on a temporary file beside ``path``, then renames it over ``path``.

    A crash or an exception at any moment leaves either the old file or the new one, never a
    half-written one, and no temporary file. The project's one way of writing result files
    (checkpoints, weights, JSON, plots' data).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, open_mode(path))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def append_jsonl(path: str | Path, record: dict) -> None:
    """Appends ``record`` to ``path`` as one JSON line, in one write, synced to disk."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Writes ``records`` as JSON lines, atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write("".join(json.dumps(r) + "\n" for r in records)), binary=False)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; ``[]`` when it does not exist.

    A torn last line (a crash or a full disk during an append) is read as absent, with a warning;
    a broken line anywhere else is an error (:class:`core.config.UserError`) naming the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                warnings.warn(f"{path}: the last line is incomplete (an interrupted write); it is ignored", stacklevel=2)
                continue
            raise UserError(f"{path} line {number} is not valid JSON: {line[:80]!r}") from None
    return records
