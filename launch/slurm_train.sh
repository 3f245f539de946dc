#!/usr/bin/env bash
# The body of launch/slurm_1node.sbatch and launch/slurm_multinode.sbatch (they `exec` this file, so it
# runs as the batch shell and receives the batch signals). It
#   1. starts ONE srun step of `python -m pretrain --resume auto` with one task per GPU; Lightning Fabric
#      detects SLURM (SLURM_NTASKS, SLURM_PROCID, ...) and needs no launcher;
#   2. forwards SIGUSR1 (`#SBATCH --signal=B:USR1@180`: 180 s before the time limit, to this shell only)
#      to the step through srun; the app finishes its step, saves a checkpoint and exits 0;
#   3. requeues the job (`scontrol requeue`, needs `#SBATCH --requeue`) ONLY when SIGUSR1 interrupted it
#      and the app saved and exited 0. A finished run ends the job; a crash (any other status) ends it
#      with that status, so a broken run is not retried forever.
# SIGTERM (scancel, preemption, the time limit itself) is not a reason to requeue here: after `scancel`
# the user wants the job gone, and a preempted job with --requeue is requeued by Slurm itself. The app
# still saves on SIGTERM (exit 143) if Slurm gives it the time (KillWait / GraceTime).
# The requeued job starts this script again; `--resume auto` continues from the newest checkpoint.
#
# Why B:USR1 and not plain USR1: the app exits 0 both when it finished and when SIGUSR1 stopped it, so
# the exit status alone cannot tell "requeue me" from "done". Receiving the signal here tells us.
# SIGTERM (preemption, scancel, time limit) is NOT forwarded: Slurm already sends it to every task,
# and a second SIGTERM would make the app give up its save (see pretrain/signals.py).
#
# Settings (environment variables, all optional):
#   AMP_REPO          repository root (default: the folder sbatch was called from)
#   AMP_VENV          virtual environment to activate (default: $AMP_REPO/.venv; skipped if absent)
#   AMP_PYTHON        python executable (default: python)
#   AMP_MAX_REQUEUES  stop requeueing after this many restarts (default 100)
#   NCCL_*, OMP_NUM_THREADS: see below
set -uo pipefail  # not -e: srun's exit status is inspected below

log() { echo "[slurm_train $(date '+%F %T')] $*"; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: no SLURM_JOB_ID: submit with sbatch launch/slurm_1node.sbatch (or slurm_multinode.sbatch)" >&2
    exit 2
fi

REPO=${AMP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO" || { echo "error: cannot cd to $REPO (set AMP_REPO)" >&2; exit 2; }
VENV=${AMP_VENV:-$REPO/.venv}
if [ -f "$VENV/bin/activate" ]; then
    set +u  # activation scripts may read unset variables
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    set -u
fi
PYTHON=${AMP_PYTHON:-python}

# One task per GPU. SLURM_NTASKS_PER_NODE can read "8" or "8(x2)".
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE%%(*}
NUM_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
RESTARTS=${SLURM_RESTART_COUNT:-0}
MAX_REQUEUES=${AMP_MAX_REQUEUES:-100}

# Threads per rank for CPU work (data loading, optimizer bookkeeping).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}
# NCCL: fail fast on a hung collective instead of sitting until the time limit; print warnings only.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Cluster-specific network selection; uncomment and adapt if NCCL picks the wrong interface:
#   export NCCL_SOCKET_IFNAME=ib0        # or eth0 / ^lo,docker
#   export NCCL_IB_HCA=mlx5              # InfiniBand adapters
export PYTHONUNBUFFERED=1   # log lines appear in the Slurm output file as they happen
export PYTHONFAULTHANDLER=1 # a hard crash prints the Python stack of every thread

interrupted=""
srun_pid=""
# shellcheck disable=SC2329  # invoked by trap
on_usr1() {
    interrupted=USR1
    log "got SIGUSR1 (time limit near / preemption notice): asking the training step to save and stop"
    if [ -n "$srun_pid" ]; then
        kill -s USR1 "$srun_pid" 2>/dev/null || true
    fi
}
# shellcheck disable=SC2329  # invoked by trap
on_term() {
    interrupted=TERM
    log "got SIGTERM: Slurm is stopping the job; the training step saves on its own SIGTERM (not forwarded)"
}
trap on_usr1 USR1
trap on_term TERM

log "job $SLURM_JOB_ID (restart $RESTARTS): $NUM_NODES node(s) x $GPUS_PER_NODE GPU(s), repo $REPO, $($PYTHON --version 2>&1)"
# Every srun option in --name=value form (tests stand in a fake srun that skips them).
srun --kill-on-bad-exit=1 --ntasks-per-node="$GPUS_PER_NODE" --nodes="$NUM_NODES" \
    "$PYTHON" -m pretrain --resume auto --system.devices "$GPUS_PER_NODE" --system.num_nodes "$NUM_NODES" "$@" &
srun_pid=$!
if [ "$interrupted" = USR1 ]; then  # the signal came before srun existed
    kill -s USR1 "$srun_pid" 2>/dev/null || true
fi

# `wait` also returns (with status > 128) when a trapped signal arrives: keep waiting while srun lives.
while :; do
    wait "$srun_pid"
    status=$?
    if [ "$status" -gt 128 ]; then
        if kill -0 "$srun_pid" 2>/dev/null; then
            continue
        fi
        wait "$srun_pid" 2>/dev/null
        again=$?
        if [ "$again" -ne 127 ]; then  # 127: already reported, so $status was srun's own
            status=$again
        fi
    fi
    break
done

if [ "$interrupted" = USR1 ] && [ "$status" -eq 0 ]; then
    if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
        log "interrupted by SIG$interrupted after $RESTARTS restarts (AMP_MAX_REQUEUES=$MAX_REQUEUES): not requeueing"
        exit 1
    fi
    log "interrupted by SIG$interrupted, checkpoint saved (status $status): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed; resubmit with the same options to resume"
    exit 0
elif [ "$status" -eq 0 ]; then
    log "training finished"
    exit 0
elif [ "$interrupted" = TERM ] && [ "$status" -eq 143 ]; then
    log "stopped by SIGTERM after saving a checkpoint: not requeueing (Slurm requeues preempted jobs" \
        "itself); sbatch the same command again to continue"
    exit "$status"
else
    log "training failed with status $status: not requeueing. Fix the cause and sbatch again; --resume auto" \
        "continues from the newest complete checkpoint"
    exit "$status"
fi
