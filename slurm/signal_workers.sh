#!/bin/bash
# Sends a signal to this SLURM job's training processes on this node, and to no other job's.
#
#   slurm/signal_workers.sh USR1
#
# The training processes are the torchrun workers (LOCAL_RANK in their environment) whose
# SLURM_JOB_ID is this job's: the same user's runs of other jobs on the node are never reached
# (a name match such as `pkill -f train/pretrain.py` would reach them). torchrun itself is left
# alone: SIGUSR1 would end it, and its workers checkpoint, requeue the job and exit 0 on their own.
set -uo pipefail
sig="${1:?usage: signal_workers.sh SIGNAL}"
job="${SLURM_JOB_ID:?SLURM_JOB_ID is not set: run inside the job}"
sent=0
for environ in /proc/[0-9]*/environ; do
    pid="${environ#/proc/}"
    pid="${pid%/environ}"
    [ "${pid}" = "$$" ] && continue
    vars="$(tr '\0' '\n' < "${environ}" 2>/dev/null)" || continue
    grep -qx "SLURM_JOB_ID=${job}" <<< "${vars}" || continue
    grep -q "^LOCAL_RANK=" <<< "${vars}" || continue
    kill -s "${sig}" "${pid}" 2>/dev/null && sent=$((sent + 1))
done
echo "signal_workers.sh: sent SIG${sig#SIG} to ${sent} training process(es) of job ${job} on $(hostname)" >&2
