"""The rank term, sync-free (Newton–Schulz) against ``torch.linalg.svdvals``: time and accuracy.

    python bench/rank_term.py                 # B=512 x D=2048 and 1024 x 512, ~1 min on 2 CPU cores
    python bench/rank_term.py --large         # also 4096 x 2048 (a gathered batch), several minutes
    python bench/rank_term.py --device=cuda   # on a GPU (timed with synchronisation)

For each (B, D, variant, bias) and each method of :func:`train.loss.rank_loss` (``svd=``), times
forward + backward of the rank term on a float32 zbar (median of ``--repeats`` runs after one
warm-up) and reports the relative error of the value and of the gradient (Frobenius) against
float64 ``svdvals`` on the same matrix. zbar is Gaussian, seeded: a full-rank spectrum like that
of a BatchNorm-ed projector output.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from train.loss import RANK_VARIANTS, rank_loss  # noqa: E402

# The two methods (the default, "auto", is svdvals on the CPU and newton_schulz on a GPU).
METHODS = ("newton_schulz", "svdvals")

# (B, D, variant, bias): the paper's setting with every variant, the bias column once, and a
# batch with more rows than columns (the iteration then runs on the D side).
DEFAULT_CASES = [(512, 2048, v, False) for v in RANK_VARIANTS] + [
    (512, 2048, "nuclear", True),
    (1024, 512, "nuclear", False),
]
LARGE_CASES = [(4096, 2048, "nuclear", False)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank_value_and_grad(
    zbar: torch.Tensor, variant: str, bias: bool, svd: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank term and its gradient w.r.t. zbar, forward + backward."""
    leaf = zbar.detach().clone().requires_grad_()
    value = rank_loss(leaf, variant, bias, svd=svd)
    value.backward()
    return value.detach(), leaf.grad


def time_rank_term(
    zbar: torch.Tensor, variant: str, bias: bool, svd: str, repeats: int = 3
) -> float:
    """Median seconds of forward + backward, after one untimed warm-up run."""
    rank_value_and_grad(zbar, variant, bias, svd)
    _sync(zbar.device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rank_value_and_grad(zbar, variant, bias, svd)
        _sync(zbar.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def relative_errors(
    zbar: torch.Tensor, variant: str, bias: bool, svd: str,
    reference: tuple[torch.Tensor, torch.Tensor],
) -> tuple[float, float]:
    """(value, gradient) relative errors of the float32 method against a float64 reference."""
    value, grad = rank_value_and_grad(zbar, variant, bias, svd)
    ref_value, ref_grad = reference
    value_err = (abs(value.double() - ref_value) / abs(ref_value)).item()
    grad_err = ((grad.double() - ref_grad).norm() / ref_grad.norm()).item()
    return value_err, grad_err


def run(cases, device: torch.device, repeats: int) -> list[dict]:
    rows = []
    for B, D, variant, bias in cases:
        g = torch.Generator().manual_seed(0)
        zbar64 = torch.randn(B, D, generator=g, dtype=torch.float64).to(device)
        zbar = zbar64.float()
        reference = rank_value_and_grad(zbar.double(), variant, bias, "svdvals")
        for svd in METHODS:
            value_err, grad_err = relative_errors(zbar, variant, bias, svd, reference)
            seconds = time_rank_term(zbar, variant, bias, svd, repeats)
            rows.append(dict(B=B, D=D, variant=variant, bias=bias, svd=svd, ms=1e3 * seconds,
                             value_err=value_err, grad_err=grad_err))
            print(_format_row(rows[-1]), flush=True)
    return rows


HEADER = (f"{'B x D':>11} | {'variant':17} | bias | {'svd':13} | {'ms (f+b)':>8} | "
          f"{'value rel err':>13} | {'grad rel err':>12}")


def _format_row(r: dict) -> str:
    return (f"{r['B']:>5} x {r['D']:<4} | {r['variant']:17} | {int(r['bias']):>4} | "
            f"{r['svd']:13} | {r['ms']:8.1f} | {r['value_err']:13.1e} | {r['grad_err']:12.1e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also time 4096 x 2048 (slow on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device=cuda but no CUDA device is available")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"rank term, float32, forward + backward; errors against float64 svdvals; {name}; "
          f"torch {torch.__version__}")
    print(HEADER)
    print("-" * len(HEADER))
    run(DEFAULT_CASES + (LARGE_CASES if args.large else []), device, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
