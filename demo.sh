#!/usr/bin/env bash
# The embedded CPU demo, end to end and offline: set up .venv, tokenise the bundled public-domain sample
# (data/sample) with its bundled 4,096-piece tokenizer, then train the `tiny` Llama (~12.6 M parameters)
# with Adam-mini for a few minutes, logging to TensorBoard and checkpointing under out/demo.
#
# Re-running resumes from the latest checkpoint in out/demo (delete it to start over).
# Extra arguments go to the trainer, e.g.  bash demo.sh --optimizer.name adamw --out_dir out/demo-adamw
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate

python -m data.prepare --out out/data/sample
exec python -m pretrain --config configs/demo.yaml "$@"
