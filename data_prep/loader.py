"""Reading betons: the one loader that pretraining, evaluation and benchmarks share.

:class:`BetonLoader` wraps an FFCV ``Loader`` in one of two modes:

* ``train=True``: random order (seeded by ``seed + epoch``, so an epoch's order is reproducible,
  also after a resume: :meth:`BetonLoader.set_epoch`), ``drop_last`` (unless ``drop_last=False``,
  which the evaluation protocols use), and distributed (each rank a disjoint shard) when
  ``torch.distributed`` is initialised;
* ``train=False``: sequential order, every sample exactly once (the last batch may be short),
  or only the samples of ``indices`` (the health figures' and the report's few images).

It yields :class:`Batch` ``(images, labels)``: ``images`` uint8 (B, 3, H, W) with channels-last
strides on the requested device, ``labels`` int64 (B,). Each batch is a tensor of its own, which
the caller may keep: ffcv's reused slot buffers never leave this module. Each batch's labels are
checked on the host before the copy (:class:`CorruptBatchError` for a label the beton cannot
hold); :func:`check_batch_labels` checks what arrived on the device, once per evaluation pass.

The copy to a GPU is made here, not by ffcv's ``ToDevice``. ffcv decodes into pinned host slot
buffers and, with ``ToDevice(non_blocking=True)``, copies them into device slot buffers on its own
CUDA streams; those device buffers are allocated on the consumer's stream, written on ffcv's
streams without ``record_stream``, and freed with the epoch iterator, and the host slot buffer of
a batch is decoded into again with no host-side wait for the copy still reading it. Either lets a
copy that the GPU runs late land in memory that already belongs to another tensor, or carry
another batch's bytes (docs/BENCHMARKS.md, "The kNN bank's labels"). Here ffcv stops at the pinned
host batch; :class:`_DeviceCopier` copies it on a side stream into a fresh tensor allocated on
that stream (``record_stream`` hands it to the consumer's stream), makes the consumer's stream
wait for the copy, and waits on the host for that copy to finish before ffcv is asked for the
next batch, which is when ffcv may start reusing the host buffer.

ffcv sets torch's intra-op thread count as a side effect (to 1 on import, to ``num_workers`` on
every epoch, from its worker thread). :func:`import_ffcv` restores the caller's count after the
import and makes ffcv set only numba's threads, so torch's threads stay the caller's choice.
"""
from __future__ import annotations

import itertools
import os
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from data_prep.sources import UNLABELLED, DataError

REQUIRED_FIELDS = ("image", "label")


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W) uint8, channels-last
    labels: torch.Tensor  # (B,) int64


class BetonError(DataError):
    """A beton that is missing, truncated, not a beton, or lacks the needed fields."""


@dataclass(frozen=True)
class BetonInfo:
    path: Path
    num_samples: int
    fields: tuple[str, ...]
    image_sizes: tuple[tuple[int, int], ...]  # distinct (H, W) of the stored images
    labels: np.ndarray  # (N,) int64

    @property
    def num_classes(self) -> int:
        """Classes of a labelled beton; 0 for an unlabelled one."""
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        return self.image_sizes[0] if len(self.image_sizes) == 1 else None


def import_ffcv() -> None:
    """Imports ffcv without letting it change torch's thread count, now or later."""
    threads = torch.get_num_threads()
    from ffcv.pipeline.compiler import Compiler

    if not getattr(Compiler, "_numba_threads_only", False):
        import numba

        def set_num_threads(cls, n: int) -> None:  # ffcv's version also calls torch.set_num_threads
            cls.num_threads = n if n >= 1 else (os.cpu_count() or 1)
            numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))

        Compiler.set_num_threads = classmethod(set_num_threads)
        Compiler._numba_threads_only = True
    torch.set_num_threads(threads)


def inspect_beton(path: str | Path) -> BetonInfo:
    """Checks that ``path`` is a complete beton with ``image`` and ``label`` fields; describes it.

    The fields are found by name, in any order (other fields are ignored); labels must be >= 0.
    """
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, HeaderType

    path = Path(path)
    if not path.is_file():
        raise BetonError(f"beton not found: {path} (write it with python data_prep/write_beton.py)")
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise BetonError(f"{path} is not a beton: {size} bytes is shorter than a beton header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION or not 0 < header["num_fields"] < 64:
        raise BetonError(f"{path} is not a beton (unknown header: version {header['version']})")
    if header["alloc_table_ptr"] > size or (size - header["alloc_table_ptr"]) % ALLOC_TABLE_TYPE.itemsize:
        raise BetonError(f"{path} is truncated or corrupt ({size} bytes; its index starts at byte {header['alloc_table_ptr']})")
    try:
        reader = Reader(str(path))
    except Exception as error:  # noqa: BLE001 - any failure here means a bad file
        raise BetonError(f"{path} is not a readable beton: {error}") from None
    missing = [name for name in REQUIRED_FIELDS if name not in reader.handlers]
    if missing:
        raise BetonError(f"{path} lacks the field(s) {', '.join(missing)}; it has {', '.join(reader.field_names)}")
    if not isinstance(reader.handlers["image"], RGBImageField) or not isinstance(reader.handlers["label"], IntField):
        raise BetonError(f"{path}: 'image' must be an RGB image field and 'label' an int field")
    if len(reader.metadata) != reader.num_samples:
        raise BetonError(f"{path} is truncated: {len(reader.metadata)} of {reader.num_samples} samples described")
    _check_extents(path, reader, int(header["alloc_table_ptr"]))
    columns = {name: reader.metadata[f"f{index}"] for index, name in enumerate(reader.field_names)}
    image_meta = columns["image"]
    sizes = sorted(set(zip(image_meta["height"].tolist(), image_meta["width"].tolist())))
    labels = np.asarray(columns["label"], dtype=np.int64).copy()
    if len(labels) and labels.min() < 0 and not (labels == UNLABELLED).all():
        raise BetonError(f"{path} has negative labels ({int((labels < 0).sum())} of {len(labels)}, down to "
                         f"{int(labels.min())}); labels must be class indices 0, 1, ...")
    return BetonInfo(path, int(reader.num_samples), tuple(reader.field_names), tuple(sizes), labels)


class CorruptBatchError(BetonError):
    """Labels read from a beton that are not the beton's labels: the data was corrupted on its way."""


def _outside(labels: torch.Tensor, info: BetonInfo) -> tuple[torch.Tensor, str]:
    """The mask of ``labels`` that the beton of ``info`` cannot hold, and what it holds."""
    if info.labelled:
        return (labels < 0) | (labels >= info.num_classes), f"[0, {info.num_classes})"
    return labels != UNLABELLED, f"{UNLABELLED} (unlabelled)"


def check_batch_labels(labels: torch.Tensor, loader: "BetonLoader") -> None:
    """Raises :class:`CorruptBatchError` naming the first batch whose labels are outside the beton's.

    ``labels`` (N,): the labels of one eval-mode pass of ``loader``, in order, on its device (the
    loader has checked each batch on the host, before the copy: this checks what arrived). A
    labelled beton's labels lie in [0, classes); an unlabelled one's are all -1. One host sync.
    """
    info, batch_size = loader.info, loader.batch_size
    bad, expected = _outside(labels, info)
    if not bool(bad.any()):
        return
    first = int(bad.nonzero()[0, 0])
    batch = first // batch_size
    where = f"images {batch * batch_size}-{min(len(labels), (batch + 1) * batch_size) - 1}"
    if loader.indices is not None:  # positions in the pass; the image is named by its index in the beton
        where += f" of the pass over {len(loader.indices)} chosen"
    image = f"{first}" if loader.indices is None else f"{int(loader.indices[first])} of the beton"
    raise CorruptBatchError(
        f"batch {batch} ({where}) of {info.path} arrived with label {int(labels[first])} at image {image}, "
        f"outside {expected}: the data was corrupted between the beton and {labels.device} "
        f"({int(bad.sum())} bad label(s) in this pass)")


def _check_extents(path: Path, reader, index_start: int) -> None:
    """Refuses a beton whose index (the allocation table at its end) does not cover its samples' data.

    ffcv's reader looks every sample's data up in that index without bounds checks: a beton cut
    where its index starts, or with its last index entries cut, would crash the process (SIGSEGV)
    at the first batch instead of raising an error.
    """
    from ffcv.types import HeaderType

    table = reader.alloc_table
    data_start = HeaderType.itemsize + reader.field_descriptors.nbytes + reader.metadata.nbytes  # ffcv's layout
    if len(table) and (int(table["ptr"].min()) < data_start
                       or int((table["ptr"] + table["size"]).max()) > index_start):
        raise BetonError(f"{path} is truncated or corrupt: its index points outside the data region")
    pointers = [reader.metadata[f"f{index}"]["data_ptr"] for index in range(len(reader.field_names))
                if reader.metadata[f"f{index}"].dtype.names and "data_ptr" in reader.metadata[f"f{index}"].dtype.names]
    if pointers:
        indexed = np.isin(np.concatenate(pointers), table["ptr"])
        if not indexed.all():
            raise BetonError(f"{path} is truncated or corrupt: its index lacks {int((~indexed).sum())} of "
                             f"{indexed.size} sample data entries ({len(table)} entries from byte {index_start}, "
                             f"{path.stat().st_size} bytes in all); write it again")


def _subset(indices, info: BetonInfo, train: bool, distributed: bool) -> np.ndarray:
    """``indices`` checked against the beton of ``info``: increasing sample indices, as int64."""
    if train or distributed:
        raise ValueError("a subset of a beton (indices) is read in eval mode only (train=False), by one process "
                         "(distributed=False)")
    chosen = np.asarray(indices)
    if chosen.ndim != 1 or not np.issubdtype(chosen.dtype, np.integer) or len(chosen) == 0:
        raise ValueError(f"indices must be a non-empty list of sample indices, got shape {chosen.shape} of {chosen.dtype}")
    if chosen[0] < 0 or chosen[-1] >= info.num_samples or (np.diff(chosen) <= 0).any():
        raise ValueError(f"indices must increase within [0, {info.num_samples}) for {info.path}")
    return chosen.astype(np.int64)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class BetonLoader:
    """An FFCV loader over a beton, yielding :class:`Batch` es of uint8 images and int64 labels.

    Args:
        path: the beton.
        batch_size: images per batch (per process when distributed).
        train: True for random order + drop_last (+ distributed), False for sequential, all samples.
        device: where the batches land (``cpu``, ``cuda``, ``cuda:1``...).
        num_workers: decoding threads (0 = all cores).
        seed: order seed; epoch ``e`` uses ``seed + e``.
        image_size: decode to ``image_size`` x ``image_size`` (centre crop + resize). Needed when the
            stored images differ in size; ``None`` keeps the stored size.
        distributed: shard across ranks; ``None`` = when training and torch.distributed is initialised.
        drop_last: drop the last, incomplete batch; ``None`` = when training. The evaluation
            protocols pass ``train=True, drop_last=False``: random order, every image each epoch.
        indices: eval mode only: read only these images of the beton (increasing sample indices), in
            that order; only they are decoded. ``None`` = all.
    """

    def __init__(self, path: str | Path, batch_size: int, *, train: bool, device: str | torch.device = "cpu",
                 num_workers: int = 0, seed: int = 0, image_size: int | None = None,
                 distributed: bool | None = None, drop_last: bool | None = None, batches_ahead: int = 3,
                 indices=None):
        self.info = inspect_beton(path)
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        self.device = torch.device(device)
        self.train = train
        self.distributed = (train and _distributed()) if distributed is None else distributed
        self.indices = None if indices is None else _subset(indices, self.info, train, self.distributed)
        self.drop_last = train if drop_last is None else drop_last
        stored = self.info.fixed_size
        if image_size is None and stored is None:
            raise BetonError(f"{path} holds images of several sizes ({len(self.info.image_sizes)} distinct); "
                             "pass an image size to decode them to a common one")
        if image_size is not None and image_size < 1:
            raise DataError(f"image size must be positive, got {image_size}")
        self.image_size = image_size or stored[0]

        import_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

        if stored is not None and (image_size is None or stored == (image_size, image_size)):
            decoder = SimpleRGBImageDecoder()
        else:
            decoder = CenterCropRGBImageDecoder((self.image_size, self.image_size), ratio=1.0)
        pipelines = {name: None for name in self.info.fields}  # fields other than these two are not read
        pipelines.update({  # host batches in ffcv's (pinned, when CUDA is available) slot buffers
            "image": [decoder, ToTensor(), ToTorchImage()],
            "label": [IntDecoder(), ToTensor(), Squeeze(1)],
        })
        # ffcv yields the fields in the beton's order, whatever order the pipelines are given in
        self._image_first = self.info.fields.index("image") < self.info.fields.index("label")
        self.batch_size = batch_size
        self._loader = Loader(
            str(path), batch_size=batch_size, num_workers=num_workers if num_workers > 0 else (os.cpu_count() or 1),
            order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, drop_last=self.drop_last,
            distributed=self.distributed, seed=seed, pipelines=pipelines, batches_ahead=batches_ahead,
            indices=self.indices)
        if len(self._loader) == 0:
            raise DataError(f"batch size {batch_size} is larger than the {self.info.num_samples} images of {path} "
                            "(this loader drops incomplete batches)")

    @property
    def num_samples(self) -> int:
        """The images one pass reads: the beton's, or those of ``indices``."""
        return self.info.num_samples if self.indices is None else len(self.indices)

    @property
    def epoch(self) -> int:
        """The epoch whose order the next iteration uses."""
        return self._loader.next_epoch

    def set_epoch(self, epoch: int) -> None:
        """Makes the next iteration use epoch ``epoch``'s order (for exact resumes)."""
        self._loader.next_epoch = int(epoch)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[Batch]:
        iterator = iter(self._loader)
        copier = _DeviceCopier(self.device)
        try:
            for batch_index in itertools.count():
                copier.wait()  # the previous batch's host buffer is read: ffcv may now reuse it
                pair = _fetch(iterator)
                if pair is None:
                    return
                images, labels = pair if self._image_first else pair[::-1]
                self._check_host_labels(labels, batch_index)
                yield copier(images, labels)
        finally:  # also when the caller leaves the epoch early (break, signal, exception)
            copier.wait()  # no copy may still read a host buffer that ffcv frees below
            _shut_down(iterator)

    def _check_host_labels(self, labels: torch.Tensor, batch: int) -> None:
        """Raises :class:`CorruptBatchError` when the host batch ``batch`` holds a label the beton
        cannot hold (a CPU check before the copy: no device sync), naming the batch and the image."""
        bad, expected = _outside(labels, self.info)
        if not bool(bad.any()):
            return
        position = int(bad.nonzero()[0, 0])
        if self.train:  # epochs counted from 1, as the progress bars count them
            image = f"position {position} of the batch (the order of epoch {self.epoch})"
        else:
            index = batch * self.batch_size + position
            image = f"image {index if self.indices is None else int(self.indices[index])} of the beton"
        raise CorruptBatchError(
            f"batch {batch} of {self.info.path} was decoded with label {int(labels[position])} at {image}, "
            f"outside {expected}: the beton is corrupt or was read wrongly ({int(bad.sum())} bad label(s) in "
            "this batch); write it again")


class _DeviceCopier:
    """Copies ffcv's host batches into tensors of their own on ``device`` (see the module docstring).

    On a GPU: an asynchronous copy on a side stream into memory allocated on that stream, the
    consumer's stream made to wait for it (``wait_event``) and recorded as the tensors' user
    (``record_stream``, so their memory is not reused while the consumer's work on them is queued);
    :meth:`wait` blocks the host until the last copy is done. On the CPU: a clone.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.pending = None  # the CUDA event of the last copy

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        if self.stream is None:
            return Batch(images.to(self.device, copy=True), labels.to(self.device, copy=True))
        consumer = torch.cuda.current_stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            batch = Batch(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))
            self.pending = torch.cuda.Event()
            self.pending.record(self.stream)
        consumer.wait_event(self.pending)
        for tensor in batch:
            tensor.record_stream(consumer)
        return batch

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.synchronize()
            self.pending = None


def _fetch(iterator):
    """ffcv's next host batch, ``None`` at the end of the epoch."""
    return next(iterator, None)


def _shut_down(iterator) -> None:
    """Stops an ffcv epoch iterator and waits for its thread to end.

    ``close()`` alone only asks the thread to stop: it may still be decoding, or blocked putting its
    end marker into a full queue, when the process exits, which then aborts ("terminate called
    without an active exception"). Draining the queue lets it finish; joining makes sure it has.
    """
    iterator.close()
    while iterator.is_alive():
        try:
            iterator.output_queue.get(timeout=0.05)
        except queue.Empty:
            pass
        iterator.join(timeout=0.05)
