"""The checkpoint writer: a CPU copy taken at save time, written atomically in the background."""
from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

import train.checkpoint as checkpoint
from train.checkpoint import CheckpointError, CheckpointWriter


def test_background_save_writes_the_state_as_it_was_when_saved(tmp_path, monkeypatch):
    release = threading.Event()
    real_save = torch.save

    def slow_save(obj, handle, *args, **kwargs):
        assert release.wait(30)
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", slow_save)
    weights = torch.zeros(4)
    writer = CheckpointWriter()
    writer.save(tmp_path / "last.pt", {"model": {"w": weights}, "step": 3})
    weights += 1  # training goes on while the file is written
    assert not (tmp_path / "last.pt").exists()  # save() returned before the write
    release.set()
    writer.wait()
    saved = torch.load(tmp_path / "last.pt", weights_only=False)
    assert saved["step"] == 3 and torch.equal(saved["model"]["w"], torch.zeros(4))
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


def test_cpu_copy_detaches_and_copies_nested_tensors():
    live = torch.ones(3, requires_grad=True)
    copied = checkpoint._to_cpu({"a": [live, (live, 2)], "b": "text"})
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
