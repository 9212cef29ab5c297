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


NAME_MAX = 255  # bytes in one file or folder name on Linux's file systems (ext4, xfs, btrfs, tmpfs, NFS)


def check_names(path: str | Path, what: str) -> None:
    """Refuses, as one :class:`core.config.UserError` line, a path with a name the file system cannot hold.

    ``what`` says where the path came from (``--eval.out``). Without this, the first file written
    there fails with ``OSError: [Errno 36] File name too long``, possibly after long work.
    """
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            shown = part if len(part) <= 40 else f"{part[:20]}...{part[-12:]}"
            raise UserError(f"{what}: the name {shown!r} is {size} bytes long; file systems allow "
                            f"{NAME_MAX} bytes per file or folder name")


def folder_problem(folder: str | Path) -> str | None:
    """Why files cannot be created in ``folder`` (made if missing), e.g. ``"Permission denied"``; None if they can."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except FileExistsError:
        return "it exists and is not a folder"
    except OSError as error:
        return error.strerror or str(error)
    return None


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
    a broken line anywhere else, or a line that is valid JSON but not an object (``42``), is an
    error (:class:`core.config.UserError`) naming ``FILE:LINE``.
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
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                warnings.warn(f"{path}: the last line is incomplete (an interrupted write); it is ignored", stacklevel=2)
                continue
            raise UserError(f"{path}:{number}: not valid JSON: {line[:80]!r}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: a JSON {type(record).__name__}, not a record ({{...}}): {line[:80]!r}")
        records.append(record)
    return records
