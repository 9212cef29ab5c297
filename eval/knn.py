"""Weighted kNN classification on L2-normalised backbone features (Wu et al. 2018).

The kNN monitor of pretraining and the ``python eval/knn.py`` protocol::

    python eval/knn.py --eval.checkpoint=runs/cifar10_simmer/checkpoints/last.pt
    python eval/knn.py --eval.checkpoint=random --cfg.arch=resnet18      # the baseline

The training beton is the memory bank, the test beton the queries; k=200, t=0.1 by default.
The classifier itself lives in :mod:`measure.knn`, shared with the pretraining monitor.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.config import parse_config, run_cli  # noqa: E402
from eval.common import EVAL_SECTIONS, default_out, prepare, write_results  # noqa: E402
from measure.knn import evaluate_knn  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, runs the kNN protocol, writes and returns the results."""
    explicit: set[str] = set()
    config = parse_config(argv, __doc__, (*EVAL_SECTIONS, "knn"), explicit)
    evaluation, knn, data = config["eval"], config["knn"], config["data"]
    setup = prepare(config, explicit)
    out = default_out(setup, evaluation["out"], "knn")  # checked before the work
    start = time.perf_counter()
    loaders = [setup.eval_loader(path, evaluation["batch_size"], data["num_workers"])
               for path in (data["train_beton"], data["test_beton"])]
    accuracy = evaluate_knn(setup.backbone, *loaders, setup.eval_transform(), k=knn["k"],
                            temperature=knn["temperature"], progress=bool(evaluation["progress"]))
    results = {"protocol": "knn", **accuracy, "k": knn["k"], "temperature": knn["temperature"],
               "checkpoint": setup.source, "arch": setup.arch_cfg["arch"], "train_beton": data["train_beton"],
               "test_beton": data["test_beton"], "seconds": time.perf_counter() - start}
    write_results(out, results, setup)
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
