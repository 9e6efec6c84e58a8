#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo on the tiny built-in checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
