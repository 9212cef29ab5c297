"""Host syncs and kernel launches of pretraining's step on the CUDA path, counted without a GPU.

    python bench/step_trace.py                     # the paper's CIFAR-10 step: ResNet-18, B=512, K=4, D=2048
    python bench/step_trace.py --gpu.K=10

The real parts of a step (:func:`train.trainer.build_training` on device ``cuda``, eager, bf16
autocast, fused Adam) run on fake CUDA tensors under :class:`bench.cuda_trace.CudaTrace`, region
by region: augment, forward, loss, optimiser. Autograd's backward needs a real CUDA context, so
the backward pass and the online probe's update are traced on real CPU tensors (same ops, same
custom backward functions; small batch: the op counts do not depend on it) with CPU ops counted
as device ops. The optimiser is traced in steady state (its state already exists). Prints one
line per region; the test suite asserts that no region makes a host sync.
"""
from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import train.trainer as trainer  # noqa: E402
from bench.cuda_trace import CudaTrace  # noqa: E402
from core.config import parse_config, run_cli  # noqa: E402
from train.model import build_encoder_from_cfg  # noqa: E402

REGIONS = ("augment", "forward", "loss", "backward", "optimiser", "probe")


def _config(arch: str, batch_size: int, K: int, proj_dim: int, extra: tuple[str, ...]) -> dict:
    flags = [f"--cfg.arch={arch}", f"--cfg.batch_size={batch_size}", f"--cfg.K={K}", f"--cfg.proj_dim={proj_dim}",
             "--run.compile=0", *extra]
    return parse_config(flags, "", ("cfg", "run"))


def trace_device_regions(arch: str = "resnet18", batch_size: int = 512, K: int = 4, proj_dim: int = 2048,
                         image_size: int = 32, extra: tuple[str, ...] = ()) -> CudaTrace:
    """augment, forward, loss and optimiser of the real step on fake CUDA tensors."""
    config = _config(arch, batch_size, K, proj_dim, extra)
    encoder = build_encoder_from_cfg(config["cfg"], image_size)  # real weights, moved to fake CUDA below
    with mock.patch.object(trainer, "build_encoder_from_cfg", lambda cfg, size: encoder), \
            mock.patch("torch.cuda.is_bf16_supported", lambda *args, **kwargs: True), \
            FakeTensorMode(allow_non_fake_inputs=True):
        parts = trainer.build_training(config["cfg"], config["run"], torch.device("cuda"), image_size, num_classes=10)
        images = torch.empty(batch_size, 3, image_size, image_size, dtype=torch.uint8, device="cuda")
        step = parts.train_step
        with mock.patch("torch.cuda.is_available", lambda: True):  # autocast checks it
            for parameter in parts.encoder.parameters():
                parameter.grad = torch.zeros_like(parameter)
            step.optimise()  # the optimiser's state now exists: what follows is a steady-state step
            with CudaTrace() as trace:
                with trace.region("augment"):
                    views = step.views(images)
                with trace.region("forward"):
                    z = step.forward(views)
                with trace.region("loss"):
                    step.loss(z)
                with trace.region("optimiser"):
                    step.optimise()
    return trace


def trace_backward_regions(arch: str = "resnet18", batch_size: int = 16, K: int = 4, proj_dim: int = 2048,
                           image_size: int = 32, extra: tuple[str, ...] = ()) -> CudaTrace:
    """backward and the probe's update of the real step, on CPU tensors counted as device ops."""
    config = _config(arch, batch_size, K, proj_dim, ("--cfg.svd=newton_schulz", *extra))  # what auto picks on CUDA
    torch.manual_seed(0)
    parts = trainer.build_training(config["cfg"], config["run"], torch.device("cpu"), image_size, num_classes=10)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (batch_size,))
    step = parts.train_step
    step(images, labels)  # optimiser and probe states exist
    loss, _ = step.loss(step.forward(step.views(images)))
    with CudaTrace(device_type="cpu") as trace:
        with trace.region("backward"):
            step.backward(loss)
        with trace.region("probe"):
            step.probe.update(step.features, labels)
    return trace


def trace_step(arch: str = "resnet18", batch_size: int = 512, K: int = 4, proj_dim: int = 2048, image_size: int = 32,
               extra: tuple[str, ...] = ()) -> dict[str, dict]:
    """``{region: {"launches": n, "syncs": [...]}}`` for every region of :data:`REGIONS`."""
    device = trace_device_regions(arch, batch_size, K, proj_dim, image_size, extra)
    host = trace_backward_regions(arch, min(batch_size, 16), K, proj_dim, image_size, extra)
    result = {}
    for trace in (device, host):
        for region, launches in trace.launches.items():
            result[region] = {"launches": launches, "syncs": [(op, why) for r, op, why in trace.syncs if r == region]}
    return {region: result[region] for region in REGIONS if region in result}


def main(argv: list[str] | None = None) -> dict:
    options = parse_config(argv, __doc__, ("gpu",))["gpu"]
    regions = trace_step(options["arch"], options["batch_size"], options["K"], options["proj_dim"],
                         options["image_size"])
    print(f"{options['arch']}, B={options['batch_size']}, K={options['K']}, D={options['proj_dim']}: "
          "launches and host syncs per region of one steady-state step")
    for region, figures in regions.items():
        print(f"  {region:<10} {figures['launches']:>5} launches  {len(figures['syncs'])} host syncs")
        for op, why in figures["syncs"]:
            print(f"    {op}: {why}")
    total = sum(figures["launches"] for figures in regions.values())
    print(f"  {'total':<10} {total:>5} launches")
    return regions


if __name__ == "__main__":
    sys.exit(run_cli(main))
