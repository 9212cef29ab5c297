"""The checkpoint writer: a host snapshot taken at save time, written atomically in the background."""
from __future__ import annotations

import errno
import io
import os
import threading

import pytest
import torch

import train.checkpoint as checkpoint
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


def test_a_gpu_snapshot_is_one_asynchronous_copy_into_reused_buffers_awaited_by_the_writer(tmp_path, monkeypatch):
    """docs/BENCHMARKS.md: the training thread only queues copies (``non_blocking``, into pinned
    buffers kept for the next save) and records an event; the writer thread waits for that event
    before it writes. Fake CUDA tensors and a logging stand-in for torch.cuda.Event, no GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten.copy_.default:
                non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
                calls.append(("copy", args[0], args[1].device.type, args[0].device.type, non_blocking))
            return func(*args, **kwargs)

    def thread() -> str:
        return "training" if threading.current_thread() is threading.main_thread() else "writer"

    class Event:
        def record(self):
            calls.append(("record", thread()))

        def synchronize(self):
            calls.append(("synchronize", thread()))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda path, state: calls.append(("write", thread(), state["step"])))
    writer = CheckpointWriter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        weight, moment = torch.empty(64, 32, device="cuda"), torch.empty(64, 32, device="cuda")
        for step in (1, 2):
            with Copies():
                writer.save(tmp_path / "last.pt", {"model": {"w": weight}, "optimizer": [moment], "step": step})
            writer.wait()
    assert len(calls) == 10 and [call[0] for call in calls[:2] + calls[5:7]] == ["copy"] * 4
    first, second = calls[0:2], calls[5:7]
    assert all(a[1] is b[1] for a, b in zip(first, second))  # the second save copies into the first one's buffers
    assert first[0][1] is not first[1][1]
    for start, step in ((0, 1), (5, 2)):
        assert all(copy[2:] == ("cuda", "cpu", True) for copy in calls[start:start + 2])
        assert calls[start + 2:start + 5] == [("record", "training"), ("synchronize", "writer"), ("write", "writer", step)]


def test_mismatch_summary_names_the_offending_keys():
    from torch import nn

    from train.checkpoint import mismatch_summary
    try:
        nn.Linear(3, 4).load_state_dict({"weight": torch.zeros(5, 3), "extra": torch.zeros(1)})
    except RuntimeError as error:
        summary = mismatch_summary(error)
    assert "Missing key(s)" in summary or "Unexpected key(s)" in summary or "size mismatch" in summary
    assert "Error(s) in loading state_dict" not in summary  # the header line is dropped


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    import random

    import numpy as np

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.standard_normal()  # numpy keeps half a Gaussian pair: has_gauss/gauss must round-trip too
    checkpoint.save_checkpoint(tmp_path / "last.pt", {"model": {}, "config": {}, "rng": checkpoint.rng_state()})
    expected = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(1 << 30), torch.rand(2))
    checkpoint.set_rng_state(checkpoint.load_checkpoint(tmp_path / "last.pt")["rng"])
    again = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(1 << 30), torch.rand(2))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


def test_a_checkpoint_with_numpys_legacy_rng_tuple_still_loads_and_restores(tmp_path):
    import numpy as np

    np.random.seed(5)
    legacy = {"model": {}, "config": {}, "rng": {**checkpoint.rng_state(), "numpy": np.random.get_state()}}
    torch.save(legacy, tmp_path / "last.pt")  # what checkpoints held before (a numpy array inside)
    expected = np.random.rand(3)
    checkpoint.set_rng_state(checkpoint.load_checkpoint(tmp_path / "last.pt")["rng"])
    assert np.random.rand(3).tolist() == expected.tolist()


class _Payload:
    """Unpickling it runs ``touch MARKER``: what a hostile checkpoint would carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("what", ["checkpoint", "backbone"])
def test_a_file_that_would_run_code_is_refused_and_never_executed(betons, tmp_path, what):
    import subprocess
    import sys
    from pathlib import Path

    from data_fixtures import SCRIPT_ENV

    root = Path(__file__).resolve().parents[1]
    marker, run_dir = tmp_path / "MARKER", tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    hostile = {"model": {}, "config": {"cfg": {"arch": "resnet18"}}, "note": _Payload(marker)}
    if what == "checkpoint":
        torch.save(hostile, run_dir / "checkpoints" / "last.pt")
    else:  # backbone.pt + config.yaml, no last.pt: the export's other source
        torch.save({"conv1.weight": _Payload(marker)}, run_dir / "backbone.pt")
        (run_dir / "config.yaml").write_text("cfg:\n  arch: resnet18\n  image_size: 32\n")
    torch.save(_Payload(tmp_path / "CONTROL"), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "CONTROL").exists()  # the payload is real: an unsafe load runs it

    commands = [[sys.executable, "train/export.py", str(run_dir), "--out", str(tmp_path / "export")]]
    if what == "checkpoint":
        commands.append([sys.executable, "eval/knn.py", f"--eval.checkpoint={run_dir / 'checkpoints' / 'last.pt'}",
                         f"--data.train_beton={betons['train']}", f"--data.test_beton={betons['test']}",
                         "--eval.device=cpu", f"--eval.out={tmp_path / 'knn.json'}"])
    for command in commands:
        result = subprocess.run(command, cwd=root, env=SCRIPT_ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
        assert "refusing to load" in result.stderr and "posix.system" in result.stderr, result.stderr
        assert not marker.exists()
    assert not (tmp_path / "export").exists() and not (tmp_path / "knn.json").exists()
