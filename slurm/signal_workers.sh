#!/bin/bash
# Sends a signal to this SLURM job's training processes on this node, and to no other job's.
#
#   slurm/signal_workers.sh USR1
#
# The training processes are the torchrun workers (LOCAL_RANK in their environment) whose
# SLURM_JOB_ID is this job's: the same user's runs of other jobs on the node are never reached
# (a name match such as `pkill -f train/pretrain.py` would reach them). The workers' own children
# (torch.compile's compile workers, a logger's service process), which inherit that environment,
# are left alone: a process whose parent is a worker is not one, and SIGUSR1 would end it. torchrun
# itself is left alone too: SIGUSR1 would end it, and its workers checkpoint, requeue the job and
# exit 0 on their own.
set -uo pipefail
sig="${1:?usage: signal_workers.sh SIGNAL}"
job="${SLURM_JOB_ID:?SLURM_JOB_ID is not set: run inside the job}"

# True when process $1 has this job's SLURM_JOB_ID and a LOCAL_RANK in its environment.
has_worker_environment() {
    local vars
    vars="$( { tr '\0' '\n' < "/proc/$1/environ"; } 2>/dev/null)" || return 1
    grep -qx "SLURM_JOB_ID=${job}" <<< "${vars}" && grep -q "^LOCAL_RANK=" <<< "${vars}"
}

# First find them all, then signal: a signalled worker may exit at once, and its children, handed
# to another parent, would then look like workers.
workers=()
for environ in /proc/[0-9]*/environ; do
    pid="${environ#/proc/}"
    pid="${pid%/environ}"
    [ "${pid}" = "$$" ] && continue
    has_worker_environment "${pid}" || continue
    parent="$(awk '/^PPid:/ {print $2}' "/proc/${pid}/status" 2>/dev/null)" || continue
    [ -n "${parent}" ] && has_worker_environment "${parent}" && continue  # a worker's child
    workers+=("${pid}")
done
sent=0
for pid in "${workers[@]}"; do
    kill -s "${sig}" "${pid}" 2>/dev/null && sent=$((sent + 1))
done
echo "signal_workers.sh: sent SIG${sig#SIG} to ${sent} training process(es) of job ${job} on $(hostname)" >&2
