"""Prints a summary of betons: samples, classes, image sizes, and one timed pass of the loader.

An unlabelled beton (every label -1: unlabelled images for pretraining) shows ``none`` classes.

    python data_prep/inspect_beton.py data/cifar10_train.beton data/cifar10_test.beton
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.config import UserError, argument_parser, run_cli  # noqa: E402
from data_prep.loader import BetonLoader, inspect_beton  # noqa: E402


def summarise(path: str, batch_size: int = 256) -> dict:
    """Reads ``path`` back once in eval mode; returns its description and the read speed."""
    info = inspect_beton(path)
    loader = BetonLoader(path, batch_size, train=False, image_size=None if info.fixed_size else 64)
    start, count, label_sum = time.perf_counter(), 0, 0
    for batch in loader:
        count += len(batch.labels)
        label_sum += int(batch.labels.sum())
    seconds = time.perf_counter() - start
    if count != info.num_samples or label_sum != int(info.labels.sum()):
        raise UserError(f"{path}: read back {count} of {info.num_samples} samples, or labels that differ from the index")
    counts = [int((info.labels == c).sum()) for c in range(info.num_classes)] or [0]  # [0]: unlabelled
    return dict(path=str(path), samples=info.num_samples, classes=info.num_classes, labelled=info.labelled,
                image_sizes=[f"{h}x{w}" for h, w in info.image_sizes[:3]] + (["..."] if len(info.image_sizes) > 3 else []),
                per_class_min=min(counts), per_class_max=max(counts), images_per_s=count / max(seconds, 1e-9),
                size_mb=Path(path).stat().st_size / 2**20)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argument_parser(__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("betons", nargs="+", help="beton files")
    args = parser.parse_args(argv)
    rows = [summarise(path) for path in args.betons]
    print(f"{'beton':<36} {'samples':>8} {'classes':>8} {'per class':>11} {'sizes':>10} {'MB':>7} {'read img/s':>11}")
    for row in rows:
        classes, per_class = ((row["classes"], f"{row['per_class_min']:>5}-{row['per_class_max']:<5}") if row["labelled"]
                              else ("none", f"{'unlabelled':>11}"))
        print(f"{row['path']:<36} {row['samples']:>8} {classes:>8} {per_class} {','.join(row['image_sizes']):>10} "
              f"{row['size_mb']:>7.1f} {row['images_per_s']:>11.0f}")
    return rows


if __name__ == "__main__":
    sys.exit(run_cli(main))
