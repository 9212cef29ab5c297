"""Weighted kNN classification on L2-normalised backbone features (Wu et al. 2018).

The kNN monitor of pretraining and the ``python eval/knn.py`` protocol::

    python eval/knn.py --eval.checkpoint=runs/cifar10_simmer/checkpoints/last.pt
    python eval/knn.py --eval.checkpoint=random --cfg.arch=resnet18      # the baseline

The training beton is the memory bank, the test beton the queries; k=200, t=0.1 by default.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Class scores of ``queries`` by weighted vote of their ``k`` nearest bank entries.

    bank: (N, F); bank_labels: (N,) int64; queries: (Q, F). Features are L2-normalised here;
    each neighbour votes with weight exp(cosine similarity / temperature).
    Returns scores (Q, num_classes) float32.
    """
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(queries), chunk):
        similarity = queries[start:start + chunk] @ bank.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(top_idx), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` fractions in [0, 1] (top-k with k <= number of classes)."""
    result = {}
    ranked = scores.argsort(dim=1, descending=True)
    for k in ks:
        k_eff = min(k, scores.shape[1])
        result[f"top{k}"] = (ranked[:, :k_eff] == labels[:, None]).any(dim=1).float().mean().item()
    return result


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
                 k: int = 200, temperature: float = 0.1) -> dict[str, float]:
    """Weighted-kNN top-1/top-5 accuracy of ``queries`` against the ``bank``."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    return topk_accuracy(knn_predict(bank, bank_labels, queries, num_classes, k, temperature), query_labels)


def evaluate_knn(backbone: torch.nn.Module, bank_loader, query_loader, transform: torch.nn.Module,
                 k: int = 200, temperature: float = 0.1, progress: bool = False) -> dict[str, float]:
    """kNN accuracy of a frozen backbone: the bank loader's images vote for the query loader's."""
    from eval.features import extract_features

    bank, bank_labels = extract_features(backbone, bank_loader, transform, progress=progress, desc="kNN bank")
    queries, query_labels = extract_features(backbone, query_loader, transform, progress=progress, desc="kNN queries")
    return knn_accuracy(bank, bank_labels, queries, query_labels, k, temperature)


def main(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, runs the kNN protocol, writes and returns the results."""
    from eval.common import EVAL_SECTIONS, default_out, prepare, write_results
    from train.config import parse_config

    explicit: set[str] = set()
    config = parse_config(argv, __doc__, (*EVAL_SECTIONS, "knn"), explicit)
    evaluation, knn, data = config["eval"], config["knn"], config["data"]
    setup = prepare(config, explicit)
    start = time.perf_counter()
    loaders = [setup.eval_loader(path, evaluation["batch_size"], data["num_workers"])
               for path in (data["train_beton"], data["test_beton"])]
    accuracy = evaluate_knn(setup.backbone, *loaders, setup.eval_transform(), k=knn["k"],
                            temperature=knn["temperature"], progress=bool(evaluation["progress"]))
    results = {"protocol": "knn", **accuracy, "k": knn["k"], "temperature": knn["temperature"],
               "checkpoint": setup.source, "arch": setup.arch_cfg["arch"], "train_beton": data["train_beton"],
               "test_beton": data["test_beton"], "seconds": time.perf_counter() - start}
    write_results(default_out(setup, evaluation["out"], "knn"), results)
    return results


if __name__ == "__main__":
    from train.config import run_cli

    sys.exit(run_cli(main))
