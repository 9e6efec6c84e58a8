"""tensor_parallel_size=2 on CPU (vLLM's mp executor over gloo) gives the reference tokens.

Heads are split across the two ranks (Dream GQA 6/2 -> 3 query and 1 KV head per rank); the
logits are all-gathered, so both ranks take the same unmask decisions. The engine runs the FOCUS
backend: its sink and block scores are summed over each rank's heads and all-reduced, so both
ranks keep the same keys (a 4-layer checkpoint, so there are sparse layers); so are
Sparse-dLLM's key scores.
"""

from __future__ import annotations

import os

import pytest
import torch

from vllm_focus.reference.decode import served_outputs
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from vllm import LLM, envs

    from vllm_focus.testing.tiny import write_tiny_checkpoint

    # An in-process engine earlier in this pytest process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    # froze vLLM's environment reads; the binding below must be read afresh.
    envs.disable_envs_cache()
    # The CPU worker binds each rank's threads to NUMA nodes; this machine has one, so bind
    # one core per rank by hand (the worker processes read it at start-up).
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    model_dir = str(
        write_tiny_checkpoint(tmp_path_factory.mktemp("tp"), "dream-gqa3", num_layers=4)
    )
    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=512,
        kv_cache_memory_bytes=32 << 20,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        attention_backend="focus",
    )
    yield llm, model_dir
    llm.llm_engine.engine_core.shutdown()
    if saved is None:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


FOCUS = {"min_prompt_len": 40, "prompt_block_size": 16, "min_keep_tokens": 32, "num_sinks": 4}
MODES = {
    "focus": {"cache": "dual", **FOCUS},
    "dense-dual": {"cache": "dual", "min_prompt_len": 100_000},
    "none": {"cache": "none"},
    # Its key scores are summed over each rank's heads and all-reduced too.
    "sparse-dllm": {"cache": "dual", "method": "sparse_dllm", "sparse_dllm_keep_ratio": 0.2},
    # Each rank fixes its own heads' patterns from its own q/k; nothing is reduced.
    "sparsed": {
        "cache": "none",
        "method": "sparsed",
        "sparsed_select": 0.2,
        "sparsed_block_size": 16,
    },
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("temperature, seed", [(0.0, None), (0.7, 9)], ids=["greedy", "seeded"])
def test_two_ranks_match_reference(engine, mode, temperature, seed):
    from vllm import SamplingParams

    llm, model_dir = engine
    reference = ReferenceModel(model_dir)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=generator).tolist() for n in (50, 1, 180)]
    settings = {"gen_length": 64, "block_length": 16, **MODES[mode]}
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=64, extra_args=settings)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    want = served_outputs(
        reference, prompts, DiffusionSettings(**settings), [64] * 3, temperature, seed, focus=True
    )
    assert [list(o.outputs[0].token_ids) for o in outputs] == want
