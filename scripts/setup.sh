#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Idempotent and quick when nothing changed.
#
# torch is installed first and on its own, because an unpinned `torch` drags in a multi-GB CUDA build:
#   TORCH_SPEC (default "torch==2.13.0", the CPU wheel used for the demo and CI) picks what to install.
#   On a GPU cluster, install the CUDA build of torch >= 2.11 into the venv first; it is then kept.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing ${TORCH_SPEC:=torch==2.13.0}"
    python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
    python -W ignore -c "import torch" || { echo "[setup] torch failed to install" >&2; exit 1; }
fi

stamp=.venv/.project-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing the project and its dependencies (pip install -e '.[dev]')"
    python -m pip install -q -e ".[dev]" 2>&1 | grep -v -E "^WARNING: Location|BuildBackendWarning" || true
    python -c "import lightning, litgpt, sentencepiece, zstandard, pyarrow, tokenizers, tensorboard
import models, optim, data, pretrain" \
        || { echo "[setup] the install is incomplete, see pip's output above" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
echo "[setup] ready: $(python -c 'import torch; print("torch", torch.__version__)')"
