"""Clusters and signals: every way a run is stopped ends in a checkpoint and a clean exit (SLURM
preemption requeues the job, the run directory's lock holds); a two-node torchrun (c10d rendezvous) trains."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from data_fixtures import read_log, start_pretraining, tiny_args
from distributed_helpers import free_port

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


def _stop(name: str, process: subprocess.Popen, run_dir: Path, delay: float, signum: int, args: list[str],
          env: dict[str, str]) -> tuple[int, dict]:
    """Signals a training run ``delay`` s after it said it trains; the busy-directory run first checks
    that a second run on its directory is refused while it trains. Returns the exit code and findings."""
    found = {}
    if name == "busy":
        second = subprocess.run([sys.executable, str(REPO / "train" / "pretrain.py"), *args, "--cfg.lr=0.01"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
        found["second"] = (second.returncode, second.stderr.strip(), process.poll())
    if signum == signal.SIGKILL:  # once an epoch is logged: the kernel releases the lock
        _wait_for(lambda: (run_dir / "log.jsonl").exists() and (run_dir / "log.jsonl").read_text(), process)
    time.sleep(delay)  # land in different places of the step and of ffcv's pipeline
    process.send_signal(signum)
    return process.wait(timeout=300), found


def test_signals_mid_run_checkpoint_and_exit_cleanly_and_the_run_dir_lock_holds(betons, tmp_path):
    """Six runs in parallel, each stopped another way at another moment of its step:

    SIGTERM (twice), SIGUSR1 under SLURM (checkpoint, requeue, the resume continues), Ctrl-C under
    SLURM (never requeued: the user's), SIGTERM to a run whose directory a second run tried to take
    (refused at once, naming the pid; the first run unaffected), and SIGKILL (nothing written; the
    kernel frees the lock, so a restart resumes). Every signalled run exits 0 with its checkpoint;
    none aborts at teardown (no "terminate called" from ffcv's threads).
    """
    cases = {  # name: (signal, delay after "training epochs", under the SLURM stand-in)
        "term": (signal.SIGTERM, 0.0, False), "usr1": (signal.SIGUSR1, 0.05, True),
        "int": (signal.SIGINT, 0.1, True), "term_late": (signal.SIGTERM, 0.15, False),
        "busy": (signal.SIGTERM, 0.2, False), "kill": (signal.SIGKILL, 0.0, False),
    }
    runs = {}
    for name, (signum, delay, slurm) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        env, record = _stand_in_scontrol(folder)
        if not slurm:
            env.pop("SLURM_JOB_ID")
        args = tiny_args(betons, folder / "run", "--run.knn_every=0", "--cfg.epochs=500")
        process = start_pretraining(args, folder / "out.txt", env, wait=False)
        runs[name] = (process, folder, record, args, env)
    for name, (process, folder, *_rest) in runs.items():
        _wait_for(lambda folder=folder: "training epochs" in (folder / "out.txt").read_text(), process, timeout=300)
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        futures = {name: pool.submit(_stop, name, process, folder / "run", cases[name][1], cases[name][0], args, env)
                   for name, (process, folder, record, args, env) in runs.items()}
        outcomes = {name: future.result() for name, future in futures.items()}

    for name, (code, found) in outcomes.items():
        process, folder, record, args, env = runs[name]
        text = (folder / "out.txt").read_text()
        assert "terminate called" not in text and "Traceback" not in text, (name, text[-3000:])
        if name == "kill":
            assert code == -signal.SIGKILL
            continue
        # mid-epoch: a checkpoint of the epoch's position; between epochs: the last epoch's checkpoint
        mid_epoch = "stopped in epoch" in text and "checkpoint saved" in text
        between = re.search(r"stopped by SIG\w+ before epoch \d+; the checkpoint \S+ holds epoch \d+", text)
        assert code == 0 and (mid_epoch or between), (name, code, text[-3000:])
        assert (folder / "run" / "checkpoints" / "last.pt").is_file(), name
        epochs = [line["epoch"] for line in read_log(folder / "run")]
        assert epochs == list(range(1, len(epochs) + 1)), name  # each epoch once, from one run
        if name == "usr1":
            assert record.read_text() == "requeue 4242\n" and "requeued SLURM job 4242" in text
        else:
            assert not record.exists(), name  # no SLURM job, or Ctrl-C: the user's, never requeued

    run_dir = tmp_path / "busy" / "run"
    second_code, second_err, first_state = outcomes["busy"][1]["second"]
    assert first_state is None  # the first run was still training when the second one gave up
    assert second_code == 2 and second_err == (f"error: {run_dir} is in use by another run (pid {runs['busy'][0].pid}); "
                                               "wait for it to finish, stop it, or use another --run.dir")
    assert "lr: 0.01" not in (run_dir / "config.yaml").read_text()

    from train.pretrain import main as pretrain_main

    for name in ("usr1", "kill"):  # the requeued job's next start, and the restart after SIGKILL
        args = runs[name][3]
        summary = pretrain_main([*args, "--run.stop_after_epochs=1", "--run.progress=0"])
        assert summary["interrupted"] and summary["epochs_done"] >= 1, name  # not blocked by a dead run's lock
        epochs = [line["epoch"] for line in read_log(tmp_path / name / "run")]
        assert epochs == list(range(1, summary["epochs_done"] + 1)), name


def _caught(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (Linux: SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


def _wait_for(condition, process: subprocess.Popen, timeout: float = 200) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.01)


def test_a_signal_during_start_up_or_after_the_last_epoch_is_a_clean_exit(betons, tmp_path):
    """SIGTERM while the script still imports torch, while the run sets up, and after its last
    epoch: exit 0 every time (never 143), requeued when the run is unfinished, finished otherwise."""
    runs = {}
    for name, epochs in (("importing", 50), ("setting_up", 50), ("after_last_epoch", 1)):  # 2 steps an epoch
        folder = tmp_path / name
        folder.mkdir()
        env, record = _stand_in_scontrol(folder)
        args = tiny_args(betons, folder / "run", "--run.knn_every=0", f"--cfg.epochs={epochs}",
                         "--run.steps_per_epoch=2")
        runs[name] = (start_pretraining(args, folder / "out.txt", env, wait=False), folder, record)
    importing, setting_up, finished = (runs[name][0] for name in runs)
    _wait_for(lambda: _caught(importing.pid, signal.SIGTERM), importing)  # the script's first lines ran
    importing.send_signal(signal.SIGTERM)
    _wait_for(lambda: (tmp_path / "setting_up" / "run" / ".lock").exists(), setting_up)
    setting_up.send_signal(signal.SIGTERM)
    _wait_for(lambda: "epoch 1/1:" in (tmp_path / "after_last_epoch" / "out.txt").read_text(), finished)
    finished.send_signal(signal.SIGTERM)
    for name, (process, folder, record) in runs.items():
        code = process.wait(timeout=200)  # before reading: a run still setting up has yet to say how it stopped
        text = (folder / "out.txt").read_text()
        assert code == 0, (name, text[-3000:])
        assert "Traceback" not in text, (name, text[-3000:])
        if name == "after_last_epoch":
            assert (folder / "run" / "summary.json").exists() and not record.exists()
        else:
            assert "stopped by SIGTERM" in text or "stopped in epoch 1" in text, (name, text)
            assert record.read_text() == "requeue 4242\n"
    assert "stopped by SIGTERM during start-up, before the first step; nothing was trained yet" in (
        tmp_path / "importing" / "out.txt").read_text()


def test_sbatch_templates_signal_only_their_own_jobs_workers():
    for name in ("pretrain_1node.sbatch", "pretrain_multinode.sbatch"):
        text = (REPO / "slurm" / name).read_text()
        assert subprocess.run(["bash", "-n", str(REPO / "slurm" / name)]).returncode == 0
        assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
        assert "trap 'slurm/signal_workers.sh USR1" in text or "srun --overlap --ntasks-per-node=1 slurm/signal_workers.sh USR1" in text
        assert "pkill" not in text and "train/pretrain.py" in text
    multinode = (REPO / "slurm" / "pretrain_multinode.sbatch").read_text()
    assert "--rdzv-backend=c10d" in multinode and "--nnodes=" in multinode and "srun --overlap" in multinode
    # signal_workers.sh reaches this job's torchrun workers, neither torchrun, nor a worker's child
    # (a compile worker: it inherits the worker's environment), nor another job's workers
    waiter = "trap 'echo got > \"$MARK\"; exit 0' USR1; while :; do sleep 0.05; done"
    child_mark = Path(f"/tmp/signal_workers_{os.getpid()}_child")
    child_mark.unlink(missing_ok=True)
    with_child = f"MARK={child_mark} bash -c {shlex.quote(waiter)} & echo $! > {child_mark}.pid; {waiter}"
    processes = {}
    for name, job, local_rank in (("worker", "4242", "0"), ("launcher", "4242", None), ("other_job", "77", "0")):
        env = {"PATH": os.environ["PATH"], "SLURM_JOB_ID": job, "MARK": f"/tmp/signal_workers_{os.getpid()}_{name}"}
        if local_rank is not None:
            env["LOCAL_RANK"] = local_rank
        Path(env["MARK"]).unlink(missing_ok=True)
        command = with_child if name == "worker" else waiter
        processes[name] = (subprocess.Popen(["bash", "-c", command], env=env), Path(env["MARK"]))
    try:
        for process, _mark in processes.values():  # the traps are set
            _wait_for(lambda process=process: _caught(process.pid, signal.SIGUSR1), process, timeout=60)
        pid_file = Path(f"{child_mark}.pid")
        _wait_for(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"), processes["worker"][0], timeout=60)
        child = int(pid_file.read_text())
        result = subprocess.run([str(REPO / "slurm" / "signal_workers.sh"), "USR1"], capture_output=True, text=True,
                                env={**os.environ, "SLURM_JOB_ID": "4242"}, timeout=60)
        assert result.returncode == 0 and result.stderr.startswith("signal_workers.sh: sent SIGUSR1 to 1 training "
                                                                   "process(es) of job 4242")  # and nothing else
        assert processes["worker"][0].wait(timeout=10) == 0 and processes["worker"][1].read_text() == "got\n"
        time.sleep(0.2)
        assert processes["launcher"][0].poll() is None and processes["other_job"][0].poll() is None
        assert not child_mark.exists() and Path(f"/proc/{child}").exists()  # the worker's child was not signalled
    finally:
        for process, mark in processes.values():
            process.kill()
            process.wait()
            mark.unlink(missing_ok=True)
        if Path(f"{child_mark}.pid").exists():
            subprocess.run(["kill", "-9", Path(f"{child_mark}.pid").read_text().strip()], capture_output=True)
            Path(f"{child_mark}.pid").unlink()
        child_mark.unlink(missing_ok=True)


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
    training = build_training(cfg, config["run"], torch.device("cpu"), size)
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
            z.append(training.train_step.forward(training.train_step.views(batch)))
            streams[rank] = torch.get_rng_state()
        for group in training.optimizer.param_groups:
            group["lr"] = lr_at(step, steps * cfg["epochs"], peak)
        loss, terms = training.train_step.loss(torch.cat(z, dim=1))
        training.train_step.backward(loss)
        training.train_step.optimise()
        values.append([loss.item(), terms["tv"].item(), terms["entropy"].item(), terms["rank"].item()])
    return values, {name: weight.detach() for name, weight in training.encoder.named_parameters()}


def test_two_node_torchrun_with_c10d_rendezvous_trains_an_epoch(betons, tmp_path):
    """Two torchrun launches (one process each) meet through a c10d rendezvous, as two nodes would,
    and train exactly as one process does on the same global batches. The processes run without
    ``all_gather_single``, as on torch 2.11 (the GPU image's), so the loss's fallback gather is the
    one that trains here (tests/test_loss.py checks both gathers' gradients)."""
    import torch

    from train.checkpoint import load_checkpoint

    port = free_port()
    site = tmp_path / "site"
    site.mkdir()
    exits = tmp_path / "exits"
    exits.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch.distributed._functional_collectives as functional\n"
        "del functional.all_gather_single\n"
        # At the interpreter's exit, each process records its live gloo threads: none may be left
        # (one dropping a finished collective then aborts the process).
        "import atexit, os, pathlib, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from distributed_helpers import gloo_threads\n"
        f"atexit.register(lambda: pathlib.Path({str(exits)!r}, str(os.getpid())).write_text(str(gloo_threads())))\n")
    env = {**os.environ, "NUMBA_THREADING_LAYER": "omp", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    args = tiny_args(betons, tmp_path / "run", "--cfg.epochs=1", "--run.knn_every=1", "--run.probe=0",
                     "--run.logger=none")  # the kNN monitor runs on rank 0 while rank 1 waits
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={rank}",
                               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=two-nodes", str(REPO / "train" / "pretrain.py"), *args],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    at_exit = sorted(int(path.read_text()) for path in exits.iterdir())  # two torchruns, two workers
    assert len(at_exit) == 4 and at_exit == [0, 0, 0, 0], at_exit
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["step"] == 96 // 16  # the global batch of 16 split over the two nodes
    assert "knn_top1" in log[0] and sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["last.pt"]
    assert "(2 processes)" in outputs[0] + outputs[1]
    torch.set_num_threads(1)
    values, weights = _single_process_epoch(betons, args, world=2)
    means = torch.tensor(values).mean(0).tolist()  # the log's epoch figures: means over the steps
    for name, expected in zip(("loss", "tv", "entropy", "rank"), means):
        assert log[0][name] == pytest.approx(expected, rel=1e-4, abs=1e-5), name
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    for name, tensor in weights.items():
        torch.testing.assert_close(trained[name], tensor, rtol=1e-3, atol=1e-4, msg=name)
