#!/usr/bin/env bash
# One machine, N GPUs, with Lightning's launcher (`fabric run`, i.e. torchrun):
#
#   bash launch/fabric_single_node.sh --config configs/tinyllama-1.1b.yaml --out_dir runs/tinyllama
#
# Arguments go to the app (`python -m pretrain`); --resume auto is added, so running the same command
# again continues from the newest checkpoint. Environment: GPUS (default: all GPUs nvidia-smi lists),
# ACCELERATOR (default cuda; cpu runs DDP over gloo, for trying things out), MAIN_PORT (default 29400;
# change it to run two jobs on one machine).
# Stop it gracefully with SIGTERM to this process (`kill <pid>`): torchrun passes SIGTERM to every
# rank, which finishes its step, saves a checkpoint and exits (torchrun waits 30 s before SIGKILL).
# Ctrl-C (SIGINT) stops without saving; the newest checkpoint is then the last interval one.
set -euo pipefail
cd "$(dirname "$0")/.."

ACCELERATOR=${ACCELERATOR:-cuda}
if [ -z "${GPUS:-}" ]; then
    if [ "$ACCELERATOR" = cuda ] && command -v nvidia-smi >/dev/null 2>&1; then
        GPUS=$(nvidia-smi -L | wc -l)
    else
        GPUS=1
    fi
fi
export PYTHONUNBUFFERED=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# No --strategy/--precision here: the app picks FSDP + bf16-mixed on GPUs (system.strategy/precision in
# its config); launch/train.py turns --accelerator/--devices into the app's system.* options.
exec fabric run --accelerator "$ACCELERATOR" --devices "$GPUS" --main-port "${MAIN_PORT:-29400}" \
    launch/train.py --resume auto "$@"
