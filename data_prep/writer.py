"""Writing sources into FFCV ``.beton`` files: the one place that knows the on-disk layout.

A beton holds two fields, ``image`` (:class:`ffcv.fields.RGBImageField`, RGB uint8) and
``label`` (:class:`ffcv.fields.IntField`). Images of 32 px or less are always stored raw
(exact pixels); larger ones follow ``write_mode``: ``raw``, ``jpg`` (quality ``jpeg_quality``) or
``smart`` (JPEG for images larger than 64x64, raw below).

Safety: every file is written to ``<name>.tmp-<pid>`` and renamed only when all files of the
call are complete, so a failed or interrupted conversion leaves no ``.beton``. ffcv's writer
hangs when a worker raises, so samples are guarded: a worker that fails to decode an image
records the failure in a side directory and writes a placeholder; the main process then
deletes the temporary files and raises :class:`~data_prep.sources.DataError`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.sources import DataError, Source

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


@dataclass
class WriteResult:
    path: Path
    num_images: int
    num_classes: int
    size_bytes: int


def _validate(source: Source, path: Path) -> None:
    if len(source) == 0:
        raise DataError(f"nothing to write to {path}: the split is empty")
    labels = np.asarray(source.labels)
    if labels.min() < 0:
        raise DataError(f"negative label {labels.min()} in the data for {path}")


def write_betons(splits: dict[Path, Source], write_mode: str = "raw", jpeg_quality: int = 90,
                 num_workers: int = 0) -> list[WriteResult]:
    """Writes each ``{path: source}`` to a beton; all files appear together, or none.

    ``num_workers`` = 0 uses every core. Returns one :class:`WriteResult` per file.
    """
    from ffcv.writer import DatasetWriter

    workers = num_workers if num_workers > 0 else (os.cpu_count() or 1)
    for path, source in splits.items():
        _validate(source, path)
    temporaries: dict[Path, Path] = {}
    error_dir = tempfile.mkdtemp(prefix="beton-errors-")
    try:
        for path, source in splits.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            temporaries[path] = temporary
            fields = beton_fields(source.max_side, write_mode, jpeg_quality)
            print(f"writing {path} ({len(source)} images)", flush=True)
            writer = DatasetWriter(str(temporary), fields, page_size=_page_size(source.max_side),
                                   num_workers=min(workers, max(1, len(source) // 100)))
            writer.from_indexed_dataset(_GuardedSource(source, error_dir), chunksize=100)
            failures = sorted(os.listdir(error_dir), key=lambda name: int(name.split(".")[0]))
            if failures:
                details = [Path(error_dir, name).read_text() for name in failures[:3]]
                more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
                raise DataError(f"could not read {len(failures)} image(s) for {path}: " + "; ".join(details) + more)
        results = []
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
            source = splits[path]
            results.append(WriteResult(path, len(source), len(np.unique(source.labels)), path.stat().st_size))
        return results
    finally:
        for temporary in temporaries.values():
            if temporary.exists():
                temporary.unlink()
        shutil.rmtree(error_dir, ignore_errors=True)


def describe(results: list[WriteResult], classes: int, seconds: float) -> str:
    """A human summary of a conversion."""
    lines = [f"{'file':<44} {'images':>8} {'classes':>8} {'size':>10}"]
    for result in results:
        lines.append(f"{str(result.path):<44} {result.num_images:>8} {result.num_classes:>8} "
                     f"{result.size_bytes / 2**20:>8.1f} MB")
    lines.append(f"{len(results)} file(s), {classes} classes, written in {seconds:.1f} s")
    return "\n".join(lines)
