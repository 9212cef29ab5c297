"""Writing sources into FFCV ``.beton`` files: the one place that knows the on-disk layout.

A beton holds two fields, ``image`` (:class:`ffcv.fields.RGBImageField`, RGB uint8) and
``label`` (:class:`ffcv.fields.IntField`). Images of 32 px or less are always stored raw
(exact pixels); larger ones follow ``write_mode``: ``raw``, ``jpg`` (quality ``jpeg_quality``) or
``smart`` (JPEG for images larger than 64x64, raw below).

Safety: every file is written to ``<name>.tmp-<pid>`` and renamed only when all files of the
call are complete, so a failed or interrupted conversion leaves no ``.beton`` and no temporary
file. A beton whose source names its classes (folder names, CIFAR's) gets a sidecar
``<name>.beton.classes.json`` (``{"classes": [...]}``, label = position), written and renamed with
it (:func:`read_class_names` reads it); a beton rewritten without names, or whose new sidecar
cannot be renamed into place (the error names the sidecar), keeps no old sidecar. ffcv's own
writer waits forever when a worker process fails (a full disk, a bug) and leaves
its workers running when the main process is stopped; :class:`_Writer` runs the same on-disk
format under a main process that watches its workers:

* a worker that fails reports its error and exits; the main process stops the others, frees the
  shared memory, deletes the temporary files and raises :class:`~data_prep.sources.DataError`;
* SIGTERM (or SIGHUP) while writing raises :class:`~data_prep.sources.DataError`, Ctrl-C
  ``KeyboardInterrupt``, with the same clean-up; workers ignore Ctrl-C (the main process stops
  them) and die with the main process even when it is killed outright (Linux);
* a sample that cannot be produced (an unreadable image) never raises in a worker: it is
  recorded in a side directory, a placeholder is written, and the main process raises afterwards.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.io import check_names, open_mode
from core.progress import progress_bar
from data_prep.sources import UNLABELLED, DataError, Source

RAW_MAX_SIDE = 32
SMART_THRESHOLD = 3 * 64 * 64  # bytes: 'smart' stores images above 64x64 as JPEG


class _GuardedSource:
    """Wraps a source so that a sample that cannot be produced never raises in a writer worker."""

    def __init__(self, source: Source, error_dir: str):
        self.source = source
        self.error_dir = error_dir

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        try:
            image, label = self.source[index]
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
                raise ValueError(f"image {index} is {image.shape} {image.dtype}, expected (H, W, 3) uint8")
            return image, int(label)
        except BaseException as error:  # noqa: BLE001 - reported by the parent process
            name = getattr(self.source, "paths", None)
            where = name[index] if name else f"sample {index}"
            with open(os.path.join(self.error_dir, f"{index}.txt"), "w") as handle:
                handle.write(f"{where}: {error}")
            return np.zeros((1, 1, 3), dtype=np.uint8), 0


def beton_fields(max_side: int, write_mode: str = "raw", jpeg_quality: int = 90) -> dict:
    """The ffcv fields of a beton whose images have at most ``max_side`` pixels on a side."""
    from ffcv.fields import IntField, RGBImageField

    if max_side <= RAW_MAX_SIDE:
        write_mode = "raw"
    smart_threshold = SMART_THRESHOLD if write_mode == "smart" else None
    return {
        "image": RGBImageField(write_mode=write_mode, jpeg_quality=jpeg_quality, smart_threshold=smart_threshold),
        "label": IntField(),
    }


def _page_size(max_side: int) -> int:
    """ffcv's smallest page (2 MiB), or the power of two that holds 4 raw images of the largest size."""
    page = 1 << 21
    while page < 4 * 3 * max_side * max_side:
        page <<= 1
    return page


def class_names_path(beton: str | Path) -> Path:
    """The class-names sidecar of a beton: ``<name>.beton.classes.json``."""
    beton = Path(beton)
    return beton.with_name(beton.name + ".classes.json")


def _class_names(source: Source) -> tuple[str, ...]:
    """The names of a labelled source's classes, when it has one for every label (else none)."""
    labels = np.asarray(source.labels)
    names = tuple(str(name) for name in getattr(source, "classes", ()) or ())
    if not len(labels) or labels.min() < 0 or len(names) <= labels.max():
        return ()
    return names


def read_class_names(beton: str | Path, num_classes: int) -> tuple[str, ...] | None:
    """The class names kept beside ``beton``, or None without a usable sidecar (one with fewer than
    ``num_classes`` names, or that is not a list of strings, is ignored with a warning)."""
    import warnings

    path = class_names_path(beton)
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text(encoding="utf-8")).get("classes")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        warnings.warn(f"{path} is not a class-names file ({error}); classes are shown by number", stacklevel=2)
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) < num_classes:
        warnings.warn(f"{path} does not name the {num_classes} classes of {beton}; classes are shown by number",
                      stacklevel=2)
        return None
    return tuple(names)


@dataclass
class WriteResult:
    path: Path
    num_images: int
    num_classes: int
    size_bytes: int


def _count_classes(labels) -> int:
    labels = np.asarray(labels)
    return len(np.unique(labels[labels >= 0]))  # an unlabelled split has none


def _validate(source: Source, path: Path) -> None:
    if len(source) == 0:
        raise DataError(f"nothing to write to {path}: the split is empty")
    labels = np.asarray(source.labels)
    if labels.min() < 0 and not (labels == UNLABELLED).all():
        raise DataError(f"negative label {labels.min()} in the data for {path} (only a wholly unlabelled split "
                        f"uses {UNLABELLED})")
    if path.is_dir():
        raise DataError(f"{path} is a folder; a beton cannot be written there")


def check_out_dir(out_dir: str | Path) -> None:
    """Refuses, before any work, an output folder that is a file or that cannot be written."""
    out_dir = Path(out_dir)
    check_names(out_dir, "--data.out_dir")
    existing = out_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == out_dir and not out_dir.is_dir():
        raise DataError(f"--data.out_dir={out_dir} is a file, not a folder")
    if not existing.is_dir():
        raise DataError(f"--data.out_dir={out_dir} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"--data.out_dir={out_dir} is not writable ({existing} does not allow writing)")


# ------------------------------------------------------------------------------------------- signals
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _StopSignals:
    """While betons are written, turns stop signals into exceptions in the main thread.

    SIGINT raises ``KeyboardInterrupt`` (as Python does by default), SIGTERM and SIGHUP a
    :class:`DataError`, so that the ``finally`` blocks stop the workers, free the shared memory and
    delete the temporary files. Only the first signal raises: later ones (a second Ctrl-C) are
    ignored while cleaning up. Inside :meth:`held` a signal is only recorded; it is delivered
    again, to the caller's handlers, when the ``with`` block ends (so renames all complete).
    Signals the caller ignores or handles itself are left alone, and so is everything outside
    the main thread.
    """

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.holding = False
        self.stopping = False
        self.pending: int | None = None

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                handler = signal.getsignal(signum)
                if handler in (signal.SIG_DFL, signal.default_int_handler):
                    self.previous[signum] = handler
                    signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.holding:
            self.pending = self.pending or signum
            return
        if self.stopping:
            return
        self.stopping = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise DataError(f"stopped by {signal.Signals(signum).name} while writing betons: none was written, "
                        "no temporary file is left")

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if self.pending is not None and not self.stopping:
            os.kill(os.getpid(), self.pending)


@contextlib.contextmanager
def _signals_blocked():
    """Blocks stop signals in this thread, and so in the processes it starts, for the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ------------------------------------------------------------------------------------------- workers
_MESSAGE_BYTES = 2048
_STOP_GRACE_S = 5.0


class _WorkerFailed(Exception):
    """A writer process failed; the message is its error."""


def _become_worker(parent_pid: int) -> None:
    """Signal set-up of a fresh writer process (started with the stop signals blocked).

    Ctrl-C and SIGHUP reach a whole process group: the main process handles them and stops the
    workers, so workers ignore them. SIGTERM (how the main process stops them) kills. On Linux
    a worker also dies when the main process does, even by SIGKILL.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the main process died before prctl took effect
        os._exit(1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _write_samples(input_queue, metadata_sm, metadata_type, fields, allocator, done, allocations_queue, dataset) -> None:
    """ffcv's ``worker_job_indexed_dataset``, except that a failure does not flush a page.

    (ffcv flushes in ``__exit__`` even after an error, which waits forever for a page turn that a
    failed worker never takes.)
    """
    from ffcv.writer import handle_sample

    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    allocator.__enter__()  # opens the file for appending pages
    while (chunk := input_queue.get()) is not None:
        for dest_ix, source_ix in chunk:
            handle_sample(dataset[source_ix], dest_ix, metadata_type.names, metadata, allocator, fields)
        with done.get_lock():
            done.value += len(chunk)
    allocator.flush_page()
    allocator.fp.close()
    allocations_queue.put(allocator.allocations)


def _worker(parent_pid: int, message, *job) -> None:
    """A writer process: writes its share of samples; on any error, reports it and exits with status 1."""
    _become_worker(parent_pid)
    try:
        _write_samples(*job)
    except BaseException as error:  # noqa: BLE001 - the main process raises it
        text = (error.strerror or str(error)) if isinstance(error, OSError) else f"{error.__class__.__name__}: {error}"
        message.value = text.encode(errors="replace")[:_MESSAGE_BYTES - 1]
        os._exit(1)


def _gather(processes: list, messages: list, done, allocations_queue, total: int) -> list:
    """Every worker's allocation table, once each has finished; raises as soon as one fails."""
    bar = progress_bar(total=total, unit="img", leave=False)
    allocations, finished, shown = [], 0, 0
    try:
        while finished < len(processes):
            try:
                allocations.extend(allocations_queue.get(timeout=0.1))
                finished += 1
            except queue.Empty:
                pass
            for process, message in zip(processes, messages):
                if process.exitcode not in (None, 0):
                    code = process.exitcode
                    reason = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
                    raise _WorkerFailed(message.value.decode(errors="replace") or f"a writer process ended ({reason})")
            count = done.get_obj().value  # without the lock: a killed worker may hold it
            bar.update(count - shown)
            shown = count
    finally:
        bar.close()
    return allocations


def _stop(processes: list) -> None:
    """Ends the workers still running (SIGTERM, then SIGKILL after a grace period) and reaps them all."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _write_beton(path: Path, dataset, fields: dict, page_size: int, num_workers: int, chunksize: int = 100) -> None:
    """ffcv's ``DatasetWriter.from_indexed_dataset`` (same file format), under a watching main process.

    Raises ``OSError`` when the main process cannot write and :class:`_WorkerFailed` when a worker
    fails; in every case, also on an exception or signal, the workers are gone and the shared
    memory freed when this returns or raises (the caller deletes ``path``).
    """
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter

    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=num_workers)
    writer.num_samples = len(dataset)
    processes: list = []
    queues: list = []
    with contextlib.ExitStack() as cleanup:  # runs every step, last registered first, even if one raises
        cleanup.callback(_free_memory, writer)
        cleanup.callback(_close_queues, queues)
        cleanup.callback(_stop, processes)
        writer.prepare()  # header + field descriptions; the samples' metadata in shared memory
        queues += [multiprocessing.Queue(), multiprocessing.Queue()]
        work, allocations_queue = queues
        for chunk in chunks(list(enumerate(range(len(dataset)))), chunksize):
            work.put(chunk)
        for _ in range(num_workers):
            work.put(None)
        done = multiprocessing.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(str(path), writer.data_region_start, page_size)
        messages = [multiprocessing.RawArray(ctypes.c_char, _MESSAGE_BYTES) for _ in range(num_workers)]
        with _signals_blocked():
            for message in messages:
                process = multiprocessing.Process(
                    target=_worker, daemon=True,
                    args=(os.getpid(), message, work, writer.metadata_sm, writer.metadata_type, fields, allocator,
                          done, allocations_queue, dataset))
                process.start()
                processes.append(process)
        allocations = _gather(processes, messages, done, allocations_queue, len(dataset))
        for process in processes:
            process.join()
        writer.finalize(allocations)  # the metadata and the allocation table


def _close_queues(queues: list) -> None:
    for channel in queues:
        channel.cancel_join_thread()  # never wait at exit to hand over work that no worker will take
        channel.close()


def _free_memory(writer) -> None:
    from multiprocessing.shared_memory import SharedMemory

    memory = getattr(writer, "metadata_sm", None)
    if isinstance(memory, SharedMemory):  # ffcv creates it at the end of prepare()
        memory.close()
        memory.unlink()


def write_betons(splits: dict[Path, Source], write_mode: str = "raw", jpeg_quality: int = 90,
                 num_workers: int = 0) -> list[WriteResult]:
    """Writes each ``{path: source}`` to a beton; all files appear together, or none.

    ``num_workers`` = 0 uses every core. Returns one :class:`WriteResult` per file. Raises
    :class:`DataError` when a file cannot be written (a full disk, a missing permission), an image
    cannot be read, or SIGTERM/SIGHUP arrives; ``KeyboardInterrupt`` on Ctrl-C. Whatever happens
    (short of SIGKILL), no temporary file, worker process or shared memory outlives the call.
    New betons get the permissions a plain ``open()`` would give (replaced ones keep theirs).
    """
    workers = num_workers if num_workers > 0 else (os.cpu_count() or 1)
    for path, source in splits.items():
        _validate(source, path)
    with _StopSignals() as stop, contextlib.ExitStack() as cleanup:
        error_dir = tempfile.mkdtemp(prefix="beton-errors-")
        cleanup.callback(shutil.rmtree, error_dir, ignore_errors=True)
        temporaries: dict[Path, Path] = {}
        sidecars: dict[Path, Path] = {}  # the class names' temporaries
        for path, source in splits.items():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise DataError(f"cannot create the folder {path.parent}: {error.strerror or error}") from None
            temporary = temporaries[path] = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            cleanup.callback(temporary.unlink, missing_ok=True)
            names = _class_names(source)
            sidecar = class_names_path(path).with_name(f"{class_names_path(path).name}.tmp-{os.getpid()}")
            if names:
                sidecars[path] = sidecar
                cleanup.callback(sidecar.unlink, missing_ok=True)
                try:
                    sidecar.write_text(json.dumps({"classes": list(names)}, ensure_ascii=False) + "\n", encoding="utf-8")
                except OSError as error:
                    raise DataError(f"cannot write {sidecar}: {error.strerror or error}") from None
            fields = beton_fields(source.max_side, write_mode, jpeg_quality)
            print(f"writing {path} ({len(source)} images)", flush=True)
            try:
                _write_beton(temporary, _GuardedSource(source, error_dir), fields, _page_size(source.max_side),
                             min(workers, max(1, len(source) // 100)))
            except (OSError, _WorkerFailed) as error:
                reason = (error.strerror or str(error)) if isinstance(error, OSError) else str(error)
                raise DataError(f"cannot write {path}: {reason}") from None
            failures = sorted(os.listdir(error_dir), key=lambda name: int(name.split(".")[0]))
            if failures:
                details = [Path(error_dir, name).read_text() for name in failures[:3]]
                more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
                raise DataError(f"could not read {len(failures)} image(s) for {path}: " + "; ".join(details) + more)
        with stop.held():  # a signal now waits until every file is in place
            for path, temporary in temporaries.items():
                _move_into_place(temporary, path)
                names_path = class_names_path(path)
                try:
                    if path in sidecars:
                        _move_into_place(sidecars[path], names_path)
                    else:  # an old sidecar would name the classes of another beton
                        names_path.unlink(missing_ok=True)
                except (DataError, OSError) as error:
                    with contextlib.suppress(OSError):  # the new beton never keeps another beton's names
                        names_path.unlink(missing_ok=True)
                    if isinstance(error, OSError):
                        error = DataError(f"cannot remove the old {names_path}: {error.strerror or error}")
                    raise error from None
        return [WriteResult(path, len(source), _count_classes(source.labels), path.stat().st_size)
                for path, source in splits.items()]


def _move_into_place(temporary: Path, path: Path) -> None:
    """Renames a finished temporary to its final name, with the final file's permissions."""
    try:
        os.chmod(temporary, open_mode(path))
        os.replace(temporary, path)
    except OSError as error:
        raise DataError(f"cannot move {temporary.name} to {path}: {error.strerror or error}") from None


def describe(results: list[WriteResult], classes: int, seconds: float) -> str:
    """A human summary of a conversion."""
    lines = [f"{'file':<44} {'images':>8} {'classes':>8} {'size':>10}"]
    for result in results:
        lines.append(f"{str(result.path):<44} {result.num_images:>8} {result.num_classes:>8} "
                     f"{result.size_bytes / 2**20:>8.1f} MB")
    lines.append(f"{len(results)} file(s), {classes} classes, written in {seconds:.1f} s")
    return "\n".join(lines)
