"""Stopping on a signal, and preemption on a SLURM cluster: a stopped run requeues its own job.

:class:`StopFlag` turns SIGTERM, SIGINT and SIGUSR1 into a flag that the training loop reads
between steps. ``train/pretrain.py`` installs it before its heavy imports and keeps it for the
life of the process, so a signal at any moment (start-up, the loop, after the last epoch) is a
clean stop, never a kill by the default handler (exit 143).

Under SLURM (``SLURM_JOB_ID`` is set), a run stopped by SIGTERM (preemption, ``scancel``, the end
of the time limit) or by the warning signal SIGUSR1 (``#SBATCH --signal=USR1@180``, see
``slurm/``) writes its mid-epoch checkpoint as everywhere else, then asks SLURM to put the job
back in the queue (``scontrol requeue``); when it starts again, the same command resumes the run.
Ctrl-C never requeues. Outside SLURM nothing changes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopFlag:
    """SIGTERM, SIGINT and SIGUSR1 (a cluster's warning signal) set :attr:`requested`; the loop
    finishes its step, checkpoints and returns. A second Ctrl-C raises KeyboardInterrupt.

    ``with StopFlag() as stop:`` installs the handlers and restores the previous ones on exit;
    :meth:`install` alone keeps them (a script's whole life). Installing is a no-op off the main
    thread (Python delivers signals there only).
    """

    def __init__(self) -> None:
        self.requested = False
        self.by_user = False  # Ctrl-C: never requeue
        self.signal_name: str | None = None
        self._previous: dict = {}

    def install(self) -> "StopFlag":
        if not self._previous and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __enter__(self) -> "StopFlag":
        return self.install()

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        self.by_user = self.by_user or signum == signal.SIGINT
        self.signal_name = signal.Signals(signum).name
        print(f"\nreceived {self.signal_name}: stopping at the next step and saving a checkpoint", file=sys.stderr,
              flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for array tasks, else the job id."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue(job_id: str) -> bool:
    """Runs ``scontrol requeue JOB``; says what happened. False (with a warning) when it fails."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        print(f"warning: could not requeue SLURM job {job_id} ({error}); resubmit it to resume", file=sys.stderr)
        return False
    if result.returncode:
        print(f"warning: scontrol requeue {job_id} failed: {result.stderr.strip() or result.returncode}; "
              "resubmit the job to resume", file=sys.stderr)
        return False
    print(f"requeued SLURM job {job_id}: the run resumes from its checkpoint when the job starts again", flush=True)
    return True
