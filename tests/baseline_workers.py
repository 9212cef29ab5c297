"""The worker of the distributed test of tests/test_baselines.py, in a module of its own so that
the spawned processes import only the losses (not the whole test module and its imports)."""
from __future__ import annotations

import os
from datetime import timedelta

import torch

from distributed_helpers import gloo_threads
from train.loss import simsiam_loss
from train.methods import get_method

BASELINES = ("vicreg", "barlow_twins", "simclr", "simsiam")


def distributed_worker(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    K, B, Din, D = 3, 12, 5, 6
    local = slice(rank * B // world_size, (rank + 1) * B // world_size)
    g = torch.Generator().manual_seed(0)  # the same on every rank
    x = torch.randn(K, B, Din, generator=g, dtype=torch.float64)
    w_init = torch.randn(Din, D, generator=g, dtype=torch.float64)
    head = torch.randn(D, D, generator=g, dtype=torch.float64)  # a stand-in predictor for SimSiam

    def loss_and_grad(name: str, images: slice) -> tuple[torch.Tensor, torch.Tensor]:
        w = w_init.clone().requires_grad_()
        z = x[:, images] @ w
        total, _ = simsiam_loss(z, z @ head) if name == "simsiam" else get_method(name).loss(z)
        total.backward()
        return total.detach(), w.grad

    full = {name: loss_and_grad(name, slice(None)) for name in BASELINES}  # one process, the whole batch
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        for name in BASELINES:
            total, grad = loss_and_grad(name, local)  # this rank's half, through the gathered z
            for tensor in (total, grad):
                dist.all_reduce(tensor)
                tensor /= world_size  # what DDP does to gradients; what the trainer logs
            torch.testing.assert_close(total, full[name][0], rtol=1e-9, atol=1e-12, msg=name)
            torch.testing.assert_close(grad, full[name][1], rtol=1e-9, atol=1e-12, msg=name)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    assert gloo_threads() == 0, f"rank {rank}: {gloo_threads()} gloo threads outlive the process group"
