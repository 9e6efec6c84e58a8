#!/usr/bin/env bash
# The GPU checks in one run, on a machine with torch + Triton and no vLLM (as the lent GPU
# machine is): the kernels compiled at the real head layouts against their twins
# (`pytest -m gpu tests/test_gpu_kernels.py`; the dense call site, vLLM's own kernel, skips
# without vLLM) and the one-layer benchmark with achieved bandwidth. The package is put
# together under a temporary directory, since `kernels/` installs as vllm_focus.kernels.
# Results go to $OUT (default benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d)
cp -r vllm_focus "$root/vllm_focus"
cp -r kernels "$root/vllm_focus/kernels"
export PYTHONPATH="$root"
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi -L | tee "$out/gpu-device.txt"
python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu_kernels.py 2>&1 \
    | tee "$out/gpu-tests.txt" || true
python benchmarks/attention_layer.py --device cuda --repeats 20 \
    --out "$out/attention_layer-cuda.json" 2>&1 | tee "$out/attention_layer-cuda.txt"
