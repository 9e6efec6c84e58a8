"""tensor_parallel_size=2 on CPU (vLLM's mp executor over gloo) gives the reference tokens.

Heads are split across the two ranks (Dream GQA 6/2 -> 3 query and 1 KV head per rank); the
logits are all-gathered, so both ranks take the same unmask decisions.
"""

from __future__ import annotations

import os

import pytest

from vllm_focus.reference.decode import served_outputs
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    from vllm import LLM

    # The CPU worker binds each rank's threads to NUMA nodes; this machine has one, so bind
    # one core per rank by hand (the worker processes read it at start-up).
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    model_dir = tiny_dirs["dream-gqa3"]
    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        kv_cache_memory_bytes=32 << 20,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
    )
    yield llm, model_dir
    llm.llm_engine.engine_core.shutdown()
    if saved is None:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


@pytest.mark.parametrize("cache", ["dual", "none"])
@pytest.mark.parametrize("temperature, seed", [(0.0, None), (0.7, 9)], ids=["greedy", "seeded"])
def test_two_ranks_match_reference(engine, cache, temperature, seed):
    from vllm import SamplingParams

    llm, model_dir = engine
    reference = ReferenceModel(model_dir)
    prompts = [list(range(10, 60)), [5], list(range(200, 20, -1))]
    settings = {"gen_length": 64, "block_length": 16, "cache": cache}
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=64, extra_args=settings)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    want = served_outputs(
        reference, prompts, DiffusionSettings(**settings), [64] * 3, temperature, seed
    )
    assert [list(o.outputs[0].token_ids) for o in outputs] == want
