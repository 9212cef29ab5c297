"""The loader's batches and the kNN monitor: what the device reads is what the beton holds.

The loader lifecycle of a run (training epochs, one left early, then the monitor's passes at the
last epoch, then the end of the run) is replayed on the CPU and every image the monitor evaluates
is compared with the beton read on its own; corrupt labels stop with one error naming the batch.
The copy to a GPU is checked for its stream ordering with fake CUDA tensors and logged streams.
"""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import data_prep.loader as loader_module
from augment import build_eval_transform, resolve_preset
from data_prep.loader import BetonLoader, CorruptBatchError
from measure.features import extract_features, image_checksums, read_images
from measure.knn import knn_accuracy
from measure.monitor import KnnMonitor, read_checksums

pytestmark = pytest.mark.timeout(120)


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _transform():
    return build_eval_transform(resolve_preset("cifar", 16))


def test_batches_are_tensors_of_their_own(betons):
    # 12 batches of 4: more than ffcv's ring of batches_ahead + 2 = 5 slot buffers, which it reuses
    loader = BetonLoader(betons["test"], 4, train=False, num_workers=1)
    kept = list(loader)  # kept across iterations: a reused slot buffer would hold a later batch's images
    images, labels = torch.cat([b.images for b in kept]), torch.cat([b.labels for b in kept])
    assert len({b.images.data_ptr() for b in kept}) == len(kept)
    assert kept[0].images.is_contiguous(memory_format=torch.channels_last)
    sums, reference_labels = read_checksums(BetonLoader(betons["test"], 7, train=False, num_workers=1))
    assert torch.equal(image_checksums(images), sums) and torch.equal(labels, reference_labels)
    assert torch.equal(labels, torch.as_tensor(loader.info.labels))


class _CudaLog(TorchDispatchMode):
    """Stands in for torch.cuda's streams and events and logs, in order, what the loader asks of them.

    Copies to the device run on fake CUDA tensors (no GPU) and are logged with the stream that is
    current when they are issued.
    """

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []
        self.events = itertools.count()
        self.consumer, self.current = "consumer", "consumer"
        log = self

        class Stream(str):
            def wait_event(self, event):
                log.calls.append(("wait_event", str(self), event.name))

        class Event:
            def __init__(self):
                self.name = f"event{next(log.events)}"

            def record(self, stream):
                log.calls.append(("record", self.name, str(stream)))

            def synchronize(self):
                log.calls.append(("synchronize", self.name))
        self.Stream, self.Event = Stream, Event

    @contextlib.contextmanager
    def stream(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.device.type == "cuda":
            self.calls.append(("copy", id(out), str(self.current), (kwargs or {}).get("non_blocking", False)))
        return out


@pytest.fixture
def cuda_log(monkeypatch) -> _CudaLog:
    """The loader's CUDA calls, logged: stream and event calls, copies (fake CUDA), ffcv fetches, shut-down."""
    log = _CudaLog()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: log.Stream("side"))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: log.Stream("consumer"))
    monkeypatch.setattr(torch.cuda, "Event", log.Event)
    monkeypatch.setattr(torch.cuda, "stream", log.stream)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.calls.append(("record_stream", id(t), str(s))))
    copy, shut_down, fetch = loader_module._DeviceCopier.__call__, loader_module._shut_down, loader_module._fetch

    def fake_copy(self, images, labels):
        with FakeTensorMode(allow_non_fake_inputs=True), log:
            return copy(self, images, labels)
    monkeypatch.setattr(loader_module._DeviceCopier, "__call__", fake_copy)
    monkeypatch.setattr(loader_module, "_shut_down", lambda it: (log.calls.append(("shut_down",)), shut_down(it)))
    monkeypatch.setattr(loader_module, "_fetch", lambda it: (log.calls.append(("fetch",)), fetch(it))[1])
    return log


def _ordered_copy(batch: int, images, labels) -> list[tuple]:
    """The calls that copy one batch: on the side stream, then handed to the consumer's stream."""
    event = f"event{batch}"
    return [("fetch",), ("copy", id(images), "side", True), ("copy", id(labels), "side", True),
            ("record", event, "side"), ("wait_event", "consumer", event),
            ("record_stream", id(images), "consumer"), ("record_stream", id(labels), "consumer")]


def test_the_copy_to_the_gpu_is_ordered_by_streams_and_a_host_wait(betons, cuda_log):
    """docs/BENCHMARKS.md, "The kNN bank's labels": each batch is copied on a side stream into tensors
    of its own, the consumer's stream waits for the copy and is recorded on them, and the host waits
    for batch b's copy before ffcv is asked for batch b + 1 (when it may reuse b's host buffer) and
    before the iterator is shut down, also when the epoch is left early."""
    loader = BetonLoader(betons["test"], 16, train=False, device="cuda", num_workers=1)
    batches = list(loader)  # 48 images: 3 batches
    assert len(batches) == 3 and all(b.images.device.type == "cuda" for b in batches)
    expected = []
    for index, (images, labels) in enumerate(batches):
        expected += [*_ordered_copy(index, images, labels), ("synchronize", f"event{index}")]
    assert cuda_log.calls == [*expected, ("fetch",), ("shut_down",)]

    cuda_log.calls.clear()
    cuda_log.events = itertools.count()
    for first in loader:
        break  # the epoch left with batch 0's copy pending: waited for before the shut-down
    assert cuda_log.calls == [*_ordered_copy(0, *first), ("synchronize", "event0"), ("shut_down",)]


@pytest.mark.parametrize("cached", [True, False])
def test_the_monitor_at_the_last_epoch_sees_the_betons_as_the_cpu_reads_them(betons, cached):
    train = BetonLoader(betons["train"], 16, train=True, num_workers=1, seed=0)
    monitor = KnnMonitor(betons["train"], betons["test"], torch.device("cpu"), 16, num_workers=1, k=10,
                         verify=True, cache_bytes=None if cached else 0)
    assert monitor.cached is cached
    backbone, transform = _backbone(), _transform()
    figures = []
    for epoch in range(4):
        train.set_epoch(epoch)
        for index, batch in enumerate(train):  # the training epochs between evaluations
            batch.images.float().mean()
            if epoch == 1 and index == 1:  # one epoch left early (a signal, run.steps_per_epoch, the views grid)
                break
        if epoch % 2 == 1:  # knn_every=2 and the last epoch: the verified evaluation raises on any mismatch
            figures.append(monitor.evaluate(backbone, transform, amp=False))
    assert figures[0] == figures[1]  # the same backbone, the same images: the same figures
    bank, bank_labels = extract_features(backbone, monitor.loaders[0], transform)
    queries, labels = extract_features(backbone, monitor.loaders[1], transform)
    expected = knn_accuracy(bank, bank_labels, queries, labels, k=10, num_classes=10)
    assert figures[-1] == {"knn_top1": expected["top1"], "knn_top5": expected["top5"]}
    del train, monitor  # the end of the run: the loaders shut down


def test_a_corrupted_image_in_the_monitors_cache_is_named(betons):
    monitor = KnnMonitor(betons["train"], betons["test"], torch.device("cpu"), 16, num_workers=1, k=10, verify=True)
    monitor.batch_size = 16  # batches of 16 images in the error's numbering
    backbone, transform = _backbone(), _transform()
    monitor.evaluate(backbone, transform, amp=False)
    images, _ = monitor._cache[1]
    images[37, 0, 0, 0] += 1  # one byte of query image 37, in batch 2
    with pytest.raises(CorruptBatchError, match=r"batch 2 of .*test\.beton differs .* at image 37"):
        monitor.evaluate(backbone, transform, amp=False)


def test_labels_outside_the_classes_stop_extraction_naming_the_batch(betons, monkeypatch):
    loader = BetonLoader(betons["test"], 16, train=False, num_workers=1)
    real_iter = BetonLoader.__iter__

    def corrupted(self):
        for index, batch in enumerate(real_iter(self)):
            if index == 2:
                batch.labels[5 % len(batch.labels)] = 3820580758807316397  # a value seen on a GPU: eight image bytes read as a label
            yield batch

    monkeypatch.setattr(BetonLoader, "__iter__", corrupted)
    with pytest.raises(CorruptBatchError, match=r"batch 2 \(images 32-47\) of .*test\.beton arrived with label "
                                                r"3820580758807316397 at image 37, outside \[0, 10\)"):
        extract_features(_backbone(), loader, _transform())
    every_other = BetonLoader(betons["test"], 4, train=False, num_workers=1, indices=range(1, 48, 2))
    with pytest.raises(CorruptBatchError, match=r"batch 2 \(images 8-11 of the pass over 24 chosen\) of .*arrived with "
                                                r"label 3820580758807316397 at image 19 of the beton, outside"):
        read_images(every_other)


@pytest.mark.parametrize("indices", [None, range(0, 48, 3)])
def test_each_host_batch_is_checked_before_its_copy(betons, monkeypatch, indices):
    fetch, fetched, copied = loader_module._fetch, [], []
    copy = loader_module._DeviceCopier.__call__
    monkeypatch.setattr(loader_module._DeviceCopier, "__call__",
                        lambda self, images, labels: (copied.append(labels.clone()), copy(self, images, labels))[1])

    def corrupting(iterator):
        pair = fetch(iterator)
        fetched.append(pair)
        if pair is not None and len(fetched) == 2:
            pair[1][3] = -7
        return pair
    monkeypatch.setattr(loader_module, "_fetch", corrupting)
    loader = BetonLoader(betons["test"], 4, train=False, num_workers=1, indices=indices)
    image = 7 if indices is None else 21  # the pass's 8th image: the beton's 7th, or 3 x 7
    with pytest.raises(CorruptBatchError, match=rf"batch 1 of .*test\.beton was decoded with label -7 at image "
                                                rf"{image} of the beton, outside \[0, 10\)"):
        list(loader)
    assert len(copied) == 1 and -7 not in copied[0]  # the corrupt batch was never copied
    with pytest.raises(ValueError, match="by one process"):
        BetonLoader(betons["test"], 4, train=False, num_workers=1, indices=[0, 1], distributed=True)


def test_a_subset_of_a_beton_is_read_in_eval_mode_in_increasing_order(betons):
    whole = read_images(BetonLoader(betons["test"], 48, train=False, num_workers=1))
    chosen = [0, 5, 6, 30, 47]
    images, labels = read_images(BetonLoader(betons["test"], 2, train=False, num_workers=1, indices=chosen))
    assert torch.equal(images, whole[0][chosen]) and torch.equal(labels, whole[1][chosen])
    for indices, message in (([3, 2], "increase"), ([0, 48], r"within \[0, 48\)"), ([], "non-empty"),
                             ([0.5], "sample indices")):
        with pytest.raises(ValueError, match=message):
            BetonLoader(betons["test"], 2, train=False, num_workers=1, indices=indices)
    with pytest.raises(ValueError, match="eval mode only"):
        BetonLoader(betons["test"], 2, train=True, num_workers=1, indices=chosen)


def test_knn_refuses_absurd_labels_instead_of_allocating_for_them():
    bank, queries = torch.randn(6, 4), torch.randn(3, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 140647037747088])
    with pytest.raises(ValueError, match="corrupt labels"):
        knn_accuracy(bank, labels, queries, torch.tensor([0, 1, 2]), k=3)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        knn_accuracy(bank, labels, queries, torch.tensor([0, 1, 2]), k=3, num_classes=3)


def test_the_monitor_refuses_a_test_beton_of_other_classes(tmp_path):
    import numpy as np

    from core.config import ConfigError
    from data_prep.sources import ArraySource
    from data_prep.writer import write_betons

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(8, 16, 16, 3), dtype=np.uint8)
    train, test = tmp_path / "a.beton", tmp_path / "b.beton"
    write_betons({train: ArraySource(images, np.zeros(8, dtype=np.int64), ("zero",)),
                  test: ArraySource(images, np.full(8, 3, dtype=np.int64), ("a", "b", "c", "three"))}, num_workers=1)
    with pytest.raises(ConfigError, match="none of the labels"):
        KnnMonitor(train, test, torch.device("cpu"), 16)
