"""Clusters: SLURM preemption requeues the job; a two-node torchrun (c10d rendezvous) trains."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import start_pretraining, tiny_args

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


def _stand_in_scontrol(folder: Path) -> tuple[dict[str, str], Path]:
    """A PATH whose ``scontrol`` records its arguments, and the file it records them in."""
    record = folder / "scontrol_calls.txt"
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{record}"\n')
    script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NUMBA_THREADING_LAYER": "omp",
           "PYTHONUNBUFFERED": "1", "SLURM_JOB_ID": "4242"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    return env, record


@pytest.mark.parametrize("signum, requeued", [(signal.SIGUSR1, True), (signal.SIGINT, False)])
def test_slurm_warning_signal_checkpoints_and_requeues_the_job(betons, tmp_path, signum, requeued):
    env, record = _stand_in_scontrol(tmp_path)
    args = tiny_args(betons, tmp_path / "run", "--run.knn_every=0", "--cfg.epochs=50")
    out = tmp_path / "out.txt"
    process = start_pretraining(args, out, env)
    process.send_signal(signum)
    assert process.wait(timeout=200) == 0, out.read_text()
    text = out.read_text()
    assert "stopped in epoch" in text and "checkpoint saved" in text
    if requeued:
        assert record.read_text() == "requeue 4242\n"
        assert "requeued SLURM job 4242" in text
    else:
        assert not record.exists()  # Ctrl-C is the user's: never requeued
    resumed = subprocess.run([sys.executable, str(REPO / "train" / "pretrain.py"), *args, "--run.stop_after_epochs=1"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout, resumed.stderr[-2000:]


def test_sbatch_templates_pass_the_warning_signal_and_requeue():
    for name in ("pretrain_1node.sbatch", "pretrain_multinode.sbatch"):
        text = (REPO / "slurm" / name).read_text()
        assert subprocess.run(["bash", "-n", str(REPO / "slurm" / name)]).returncode == 0
        assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
        assert "trap " in text and "USR1" in text and "train/pretrain.py" in text
    multinode = (REPO / "slurm" / "pretrain_multinode.sbatch").read_text()
    assert "--rdzv-backend=c10d" in multinode and "--nnodes=" in multinode and "srun --overlap" in multinode


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_epoch(betons: dict[str, Path], args: list[str], world: int) -> tuple[list[float], dict]:
    """The first epoch of ``args`` in one process on the same global batches as ``world`` ranks.

    Each step takes every rank's shard (ffcv's distributed order: torch's DistributedSampler) and
    makes its views from that rank's random stream (rank 0 continues the seeded stream, rank r is
    reseeded with seed + r, as the trainer does); the shards go through the encoder one by one (on
    a CPU, DDP has no SyncBatchNorm: BatchNorm normalises each rank's shard) and the loss and the
    Adam step take the whole batch at once. Returns each step's [loss, tv, entropy, rank] and the
    final parameters (BatchNorm's running statistics differ: each rank keeps its shard's).
    """
    import torch
    from torch.utils.data import DistributedSampler

    from core.config import parse_config
    from core.schedule import lr_at
    from data_prep.loader import BetonLoader
    from train.trainer import _seed_everything, build_training

    config = parse_config(args, "", ("cfg", "data", "run"))
    cfg = config["cfg"]
    every = BetonLoader(betons["train"], 1000, train=False, num_workers=1)
    images = torch.cat([batch.images.clone() for batch in every])
    size, shard = images.shape[-1], cfg["batch_size"] // world
    _seed_everything(cfg["seed"])
    parts = build_training(cfg, config["run"], torch.device("cpu"), size)
    streams = [torch.get_rng_state()] + [torch.manual_seed(cfg["seed"] + rank).get_state() for rank in range(1, world)]
    orders = []
    for rank in range(world):
        sampler = DistributedSampler(range(len(images)), num_replicas=world, rank=rank, shuffle=True,
                                     seed=cfg["seed"], drop_last=False)
        sampler.set_epoch(0)
        orders.append(list(sampler))
    steps = min(len(order) for order in orders) // shard
    peak = cfg["lr"] * cfg["batch_size"] / 256
    values = []
    for step in range(steps):
        z = []
        for rank in range(world):
            torch.set_rng_state(streams[rank])
            batch = images[orders[rank][step * shard:(step + 1) * shard]]
            z.append(parts.train_step.forward(parts.train_step.views(batch)))
            streams[rank] = torch.get_rng_state()
        for group in parts.optimizer.param_groups:
            group["lr"] = lr_at(step, steps * cfg["epochs"], peak)
        loss, terms = parts.train_step.loss(torch.cat(z, dim=1))
        parts.train_step.backward(loss)
        parts.train_step.optimise()
        values.append([loss.item(), terms["tv"].item(), terms["entropy"].item(), terms["rank"].item()])
    return values, {name: weight.detach() for name, weight in parts.encoder.named_parameters()}


def test_two_node_torchrun_with_c10d_rendezvous_trains_an_epoch(betons, tmp_path):
    """Two torchrun launches (one process each) meet through a c10d rendezvous, as two nodes would,
    and train exactly as one process does on the same global batches. The processes run without
    ``all_gather_single``, as on torch 2.11 (the GPU image's), so the loss's fallback gather is the
    one that trains here (tests/test_loss.py checks both gathers' gradients)."""
    import torch

    from train.checkpoint import load_checkpoint

    port = _free_port()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import torch.distributed._functional_collectives as functional\n"
                                           "del functional.all_gather_single\n")
    env = {**os.environ, "NUMBA_THREADING_LAYER": "omp", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    args = tiny_args(betons, tmp_path / "run", "--cfg.epochs=1", "--run.knn_every=0", "--run.probe=0",
                     "--run.logger=none")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=two-nodes", str(REPO / "train" / "pretrain.py"), *args],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["step"] == 96 // 16  # the global batch of 16 split over the two nodes
    assert "(2 processes)" in outputs[0] + outputs[1]
    torch.set_num_threads(1)
    values, weights = _single_process_epoch(betons, args, world=2)
    means = torch.tensor(values).mean(0).tolist()  # the log's epoch figures: means over the steps
    for name, expected in zip(("loss", "tv", "entropy", "rank"), means):
        assert log[0][name] == pytest.approx(expected, rel=1e-4, abs=1e-5), name
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    for name, tensor in weights.items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-3, atol=1e-4, msg=name)
