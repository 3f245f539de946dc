#!/usr/bin/env bash
# Set up .venv (see scripts/setup.sh) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
exec python -m pytest -q "$@"
