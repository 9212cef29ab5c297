"""Tests for core/: the learning-rate schedule and atomic writes."""
from __future__ import annotations

import math

import pytest

from core.io import atomic_write
from core.schedule import lr_at

PEAK = 0.4


# ------------------------------------------------------------------------------- lr schedule
@pytest.mark.parametrize("warmup, total", [(4, 20), (10, 110), (1, 9)])
def test_warmup_rises_linearly_to_the_peak(warmup, total):
    assert lr_at(0, total, PEAK, warmup) == pytest.approx(PEAK / warmup)
    assert lr_at(warmup - 1, total, PEAK, warmup) == pytest.approx(PEAK)  # the last warm-up step
    for step in range(warmup):
        assert lr_at(step, total, PEAK, warmup) == pytest.approx(PEAK * (step + 1) / warmup)
    rising = [lr_at(step, total, PEAK, warmup) for step in range(warmup)]
    assert all(later > earlier for earlier, later in zip(rising, rising[1:]))


@pytest.mark.parametrize("warmup, total", [(0, 20), (4, 20), (10, 110)])
def test_cosine_starts_at_peak_halves_at_its_midpoint_and_ends_at_zero(warmup, total):
    assert lr_at(warmup, total, PEAK, warmup) == pytest.approx(PEAK)  # first step after the warm-up
    midpoint = warmup + (total - warmup) // 2  # (total - warmup) is even in every case
    assert lr_at(midpoint, total, PEAK, warmup) == pytest.approx(PEAK / 2)
    assert lr_at(total, total, PEAK, warmup) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(total + 5, total, PEAK, warmup) == pytest.approx(0.0, abs=1e-12)  # stays at 0 past the end
    quarter = warmup + (total - warmup) / 4
    if quarter.is_integer():
        assert lr_at(int(quarter), total, PEAK, warmup) == pytest.approx(PEAK * (1 + math.cos(math.pi / 4)) / 2)
    decaying = [lr_at(step, total, PEAK, warmup) for step in range(warmup, total + 1)]
    assert all(later < earlier for earlier, later in zip(decaying, decaying[1:]))


def test_peak_is_the_highest_value_of_the_whole_schedule():
    values = [lr_at(step, 50, PEAK, 10) for step in range(50)]
    assert max(values) == pytest.approx(PEAK)
    assert all(0.0 < value <= PEAK * (1 + 1e-12) for value in values)


def test_no_warmup_starts_at_the_peak():
    assert lr_at(0, 100, PEAK) == pytest.approx(PEAK)
    assert lr_at(0, 100, PEAK, 0) == pytest.approx(PEAK)
    assert lr_at(25, 100, PEAK) == pytest.approx(PEAK * (1 + math.cos(math.pi / 4)) / 2)


# ------------------------------------------------------------------------------ atomic_write
def _fail_midway(handle):
    handle.write(b"half of the new cont")
    handle.flush()
    raise RuntimeError("disk on fire")


def test_a_failing_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "result.bin"
    old = b"old content \x00\x01\x02" * 100
    target.write_bytes(old)
    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, _fail_midway)
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.bin"]


def test_a_failing_first_write_creates_nothing(tmp_path):
    target = tmp_path / "sub" / "new.json"

    def fail(handle):
        handle.write("{\"half\": ")
        raise KeyboardInterrupt  # also an interruption, not only an Exception

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail, binary=False)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_a_successful_write_replaces_the_content(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("a much longer old content that must not survive as a tail\n")
    atomic_write(target, lambda handle: handle.write("new\n"), binary=False)
    assert target.read_text() == "new\n"
    atomic_write(target, lambda handle: handle.write(b"\x00bytes"))
    assert target.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_the_old_file_is_whole_while_the_new_one_is_being_written(tmp_path):
    target = tmp_path / "result.bin"
    target.write_bytes(b"old")
    seen = []

    def write(handle):
        handle.write(b"new content")
        handle.flush()
        seen.append(target.read_bytes())  # what a reader sees mid-write

    atomic_write(target, write)
    assert seen == [b"old"] and target.read_bytes() == b"new content"
