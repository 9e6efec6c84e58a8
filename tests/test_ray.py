"""`vllm serve --tensor-parallel-size 2 --distributed-executor-backend ray` on CPU, against a
Ray cluster started as the README's deployment recipe starts one, gives the reference tokens,
dense and with Focus.

Real Ray (a head node started by `ray start --head`, two worker actors), vLLM's Ray executor
and the plugin's worker, runner and metrics. vLLM 0.32's CPU platform refuses Ray (it has no
Ray device key), so the server runs under a test-side platform plugin
(scripts/ray-cpu-platform, installed by scripts/setup.sh): the CPU platform with Ray's "GPU"
resource as the key, the node declaring two such worker slots with `--num-gpus 2`. It is inert
unless VLLM_FOCUS_RAY_CPU_PLATFORM=1, which this module sets for the Ray node and the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_focus.reference.decode import served_outputs
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings
from vllm_focus.testing import server as serving
from vllm_focus.testing.tiny import write_tiny_checkpoint

RAY = str(Path(sys.executable).parent / "ray")
ENV = {
    "VLLM_FOCUS_RAY_CPU_PLATFORM": "1",
    # One core per rank (this machine has one NUMA node, which the CPU worker would split).
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",
}
FOCUS = {"min_prompt_len": 40, "prompt_block_size": 16, "min_keep_tokens": 32, "num_sinks": 4}
MODES = {
    "focus": {"gen_length": 32, "block_length": 16, "cache": "dual", **FOCUS},
    "dense-dual": {"gen_length": 32, "block_length": 16, "cache": "dual", "min_prompt_len": 10**5},
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Ray cluster: `ray start --head --num-gpus 2` (two worker slots)."""
    # scripts/setup.sh installs ray and the CPU platform shim: a missing one is a failure here.
    assert Path(RAY).exists(), f"{RAY} missing: run scripts/setup.sh"
    port = serving.free_port()
    env = {**os.environ, **ENV}
    start = [RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=2"]
    start += ["--object-store-memory=200000000", "--include-dashboard=false"]
    start += ["--disable-usage-stats"]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def server(cluster, tmp_path_factory):
    model_dir = str(
        write_tiny_checkpoint(tmp_path_factory.mktemp("ray-tp"), "dream-gqa3", num_layers=4)
    )
    log_path = tmp_path_factory.mktemp("ray-serve") / "serve.log"
    args = ["--dtype", "float32", "--max-model-len", "512"]
    args += ["--kv-cache-memory-bytes", str(32 << 20), "--attention-backend", "focus"]
    args += ["--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"]
    process = serving.start(
        model_dir, *args, log_path=str(log_path), env={**ENV, "RAY_ADDRESS": cluster}
    )
    try:
        serving.wait_healthy(process, timeout=600)
        yield process, model_dir
    finally:
        process.stop()


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ray_ranks_match_reference(server, mode):
    from openai import OpenAI

    process, model_dir = server
    client = OpenAI(base_url=process.base + "/v1", api_key="unused", max_retries=0, timeout=300)
    reference = ReferenceModel(model_dir)
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 300, (n,), generator=generator).tolist() for n in (60, 150)]
    settings = MODES[mode]
    got = []
    for prompt in prompts:
        response = client.completions.create(
            model=model_dir,
            prompt=prompt,
            max_tokens=32,
            temperature=0,
            extra_body={"vllm_xargs": settings, "return_token_ids": True},
        )
        got.append(response.choices[0].token_ids)
    want = served_outputs(reference, prompts, DiffusionSettings(**settings), [32, 32], focus=True)
    assert got == want


def test_the_ranks_ran_under_ray_with_the_plugins_worker(server):
    process, model_dir = server
    log = process.log()
    assert "Connected to Ray cluster" in log
    # Two Ray worker actors (the CPU worker on the shim platform), ranks 0 and 1 of one gloo
    # group; without the shim the executor stops at "current platform cpu does not support ray".
    assert "(RayWorkerProc pid=" in log and "Worker_TP1" in log
    assert "world_size=2 rank=1" in log and "backend=gloo" in log
    # The workers' diffusion metrics reached the API process.
    samples = {name: value for name, _, value in serving.metric_samples(process.base)}
    assert samples.get("vllm_focus:focus_steps_total", 0) > 0
    assert samples.get("vllm_focus:block_commits_total", 0) > 0
