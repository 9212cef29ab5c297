"""Converts a dataset into FFCV betons: ``<out_dir>/<dataset>_{train,test}.beton``.

    python data_prep/write_beton.py                                  # CIFAR-10 (downloads when online)
    python data_prep/write_beton.py --data.dataset=synthetic         # offline demo data
    python data_prep/write_beton.py --data.dataset=cifar100 --data.root=~/cifar-100-python.tar.gz
    python data_prep/write_beton.py --data.dataset=miniimagenet --data.root=PATH --data.shots=40
    python data_prep/write_beton.py --data.dataset=miniimagenet --data.root=PATH --data.shots_file=split.txt
    python data_prep/write_beton.py --data.dataset=folder --data.root=PATH   # PATH/{train,test}/<class>/*

``--help`` lists every parameter.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.config import parse_config, run_cli  # noqa: E402
from data_prep.convert import convert  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, writes the betons; returns ``{split: path}`` of the files written."""
    data = parse_config(argv, __doc__, ["data"])["data"]
    results = convert(
        data["dataset"], data["root"], data["out_dir"], shots=data["shots"], seed=data["seed"],
        shots_file=data["shots_file"],
        write_mode=data["write_mode"], jpeg_quality=data["jpeg_quality"], num_workers=data["num_workers"],
        download=bool(data["download"]), max_resolution=data["max_resolution"],
        mini_test_per_class=data["mini_test_per_class"], synthetic_train=data["synthetic_train"],
        synthetic_test=data["synthetic_test"], synthetic_size=data["synthetic_size"],
        unlabelled=bool(data["unlabelled"]), file_list=data["file_list"])
    return {str(result.path): result.num_images for result in results}


if __name__ == "__main__":
    sys.exit(run_cli(main))
