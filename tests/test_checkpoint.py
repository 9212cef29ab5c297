"""The checkpoint writer: a host snapshot taken at save time, written atomically in the background."""
from __future__ import annotations

import errno
import io
import os
import threading

import pytest
import torch

from train.checkpoint import CheckpointError, CheckpointWriter


def _torn_save(halfway: threading.Event, release: threading.Event, real_save=torch.save):
    """A torch.save that writes the first half of its bytes, signals ``halfway``, waits for
    ``release``, then writes the rest: to a file handle or to a path, whichever it is given."""

    def save(obj, target, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        handle = open(target, "wb") if isinstance(target, (str, os.PathLike)) else target
        try:
            handle.write(data[:len(data) // 2])
            handle.flush()
            halfway.set()
            assert release.wait(30)
            handle.write(data[len(data) // 2:])
        finally:
            if handle is not target:
                handle.close()

    return save


def test_background_save_keeps_the_previous_checkpoint_whole_until_the_new_one_is(tmp_path, monkeypatch):
    previous = {"model": {"w": torch.full((4,), 7.0)}, "step": 1}
    torch.save(previous, tmp_path / "last.pt")
    halfway, release = threading.Event(), threading.Event()
    monkeypatch.setattr(torch, "save", _torn_save(halfway, release))
    weights = torch.zeros(4)
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pt", {"model": {"w": weights}, "step": 3})
    weights += 1  # training goes on while the file is written
    assert halfway.wait(30)  # the new checkpoint is half written now
    during = torch.load(tmp_path / "last.pt", weights_only=True)  # a crash now would find this file
    assert during["step"] == 1 and torch.equal(during["model"]["w"], previous["model"]["w"])
    release.set()
    writer.wait()
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["step"] == 3 and torch.equal(saved["model"]["w"], torch.zeros(4))  # the state as it was when saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_failed_background_write_is_raised_at_the_next_wait(tmp_path, monkeypatch):
    def full_disk(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (tmp_path / "last.pt").write_bytes(b"previous")
    monkeypatch.setattr(torch, "save", full_disk)
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pt", {"model": {}})
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.wait()
    writer.wait()  # reported once
    assert (tmp_path / "last.pt").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_snapshot_detaches_and_copies_nested_tensors():
    live = torch.ones(3, requires_grad=True)
    copied = CheckpointWriter()._snapshot({"a": [live, (live, 2)], "b": "text"}, ())
    assert copied["b"] == "text" and copied["a"][1][1] == 2
    assert not copied["a"][0].requires_grad and copied["a"][0].data_ptr() != live.data_ptr()


def test_mismatch_summary_names_the_offending_keys():
    from torch import nn

    from train.checkpoint import mismatch_summary
    try:
        nn.Linear(3, 4).load_state_dict({"weight": torch.zeros(5, 3), "extra": torch.zeros(1)})
    except RuntimeError as error:
        summary = mismatch_summary(error)
    assert "Missing key(s)" in summary or "Unexpected key(s)" in summary or "size mismatch" in summary
    assert "Error(s) in loading state_dict" not in summary  # the header line is dropped
