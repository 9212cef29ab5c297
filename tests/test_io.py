"""core.io: atomic writes."""
from __future__ import annotations

import os

import pytest

from core.io import atomic_write


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "atomic.bin", lambda handle: handle.write(b"x"))
        with open(tmp_path / "plain.bin", "wb") as handle:
            handle.write(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "atomic.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777
    assert (tmp_path / "atomic.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "kept.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    atomic_write(path, lambda handle: handle.write("[]"), binary=False)
    assert path.read_text() == "[]" and path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["kept.json"]  # no temporary file left
