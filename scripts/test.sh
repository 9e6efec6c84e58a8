#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite: the CPU tier, plus the GPU tier where a
# GPU is present. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
MARKERS="not gpu"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    MARKERS=""
fi
exec .venv/bin/pytest -m "$MARKERS" "$@"
