"""Preemption on a SLURM cluster: a stopped run requeues its own job.

Under SLURM (``SLURM_JOB_ID`` is set), a run stopped by SIGTERM (preemption, ``scancel``, the end
of the time limit) or by the warning signal SIGUSR1 (``#SBATCH --signal=USR1@180``, see
``slurm/``) writes its mid-epoch checkpoint as everywhere else, then asks SLURM to put the job
back in the queue (``scontrol requeue``); when it starts again, the same command resumes the run.
Ctrl-C never requeues. Outside SLURM nothing changes.
"""
from __future__ import annotations

import os
import subprocess
import sys


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
