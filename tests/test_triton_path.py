"""The FOCUS backend's CUDA call sites, run on the CPU: `VLLM_FOCUS_TRITON=1` makes the engine
take its Triton path (vLLM's unified attention for the dense work, the tiled sparse kernel,
the selection on the device) under Triton's interpreter, and it equals the reference decoder.

One engine per family (float32, tiny checkpoints with 2 layers: the first dense, where the
sinks are found, the second sparse), one batch:
a prompt above `min_prompt_len` (Focus: refreshes through the dense kernel, within-block steps
through both) beside one below it (dense in every layer, in the same forwards) and a
Sparse-dLLM request (its kept keys and block through the tiled kernel); then a SparseD one (its
dense steps through the dense kernel, its pattern built on the device and followed through
the block-sparse kernel, `kernels/block_sparse.py`). The interpreter runs every program in
Python, so the prompts and the canvas are short.
"""

from __future__ import annotations

import os

import pytest
import torch

from vllm_focus.reference.decode import served_outputs
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the engine takes this path anyway"
)

PROMPT_LENGTHS = [90, 20, 60, 40]
MAX_TOKENS = [16, 16, 16, 16]
SPARSE = {
    "gen_length": 16,
    "block_length": 8,
    "steps": 8,
    "dense_layers": 1,
    "min_prompt_len": 64,
    "prompt_block_size": 16,
    "min_keep_tokens": 32,
    "keep_ratio": 0.05,
    "num_sinks": 4,
}
UNPRUNED = {"keep_ratio": 1.0, "num_sinks": 100_000}
SPARSE_DLLM = {"gen_length": 16, "block_length": 8, "steps": 8, "method": "sparse_dllm"}
PRUNED_DLLM = {**SPARSE_DLLM, "sparse_dllm_keep_ratio": 0.1}
# SparseD: 8 steps, the pattern fixed at the third (int(8 x 0.2) + 1 = 2), 8-token blocks.
SPARSED = {"gen_length": 16, "block_length": 8, "steps": 8, "method": "sparsed", "cache": "none"}
PRUNED_SPARSED = {**SPARSED, "sparsed_select": 0.2, "sparsed_block_size": 8}
PER_PROMPT = [SPARSE, SPARSE, PRUNED_DLLM, PRUNED_SPARSED]


@pytest.fixture(scope="module", params=["dream", "llada"])
def engine(request, tmp_path_factory):
    from vllm import LLM

    from vllm_focus.testing.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp(f"triton-{request.param}")
    model_dir = str(write_tiny_checkpoint(root, request.param))
    previous = os.environ.get("VLLM_FOCUS_TRITON")
    os.environ["VLLM_FOCUS_TRITON"] = "1"  # read in the engine's processes
    try:
        llm = LLM(
            model=model_dir,
            dtype="float32",
            max_model_len=512,
            kv_cache_memory_bytes=8 << 20,
            attention_backend="focus",
            seed=0,
        )
    finally:
        if previous is None:
            del os.environ["VLLM_FOCUS_TRITON"]
        else:
            os.environ["VLLM_FOCUS_TRITON"] = previous
    yield llm, ReferenceModel(model_dir)
    llm.llm_engine.engine_core.shutdown()


def _prompts(reference: ReferenceModel) -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)  # a seed where pruning shows
    vocab = reference.config.vocab_size - 8
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def test_triton_path_matches_reference_focus(engine):
    from vllm import SamplingParams

    llm, reference = engine
    prompts = _prompts(reference)

    def reference_of(per_prompt):
        return [
            served_outputs(reference, [p], DiffusionSettings(**s), [m], focus=True)[0]
            for p, s, m in zip(prompts, per_prompt, MAX_TOKENS)
        ]

    want = reference_of(PER_PROMPT)
    # Discriminating: the pruning changes the long prompts' reference outputs.
    unpruned = reference_of(
        [
            {**SPARSE, **UNPRUNED},
            SPARSE,
            {**SPARSE_DLLM, "sparse_dllm_keep_ratio": 1.0},
            {**SPARSED, "sparsed_skip": 1.0},  # dense at every step
        ]
    )
    assert want[0] != unpruned[0] and want[2] != unpruned[2] and want[3] != unpruned[3]
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, extra_args=s)
        for m, s in zip(MAX_TOKENS, PER_PROMPT)
    ]
    llm.collective_rpc("diffusion_stats", kwargs={"reset": True})
    # The SparseD request computes everything at every step (each a full step in the
    # statistics), so it runs on its own after the batch the statistics below are about.
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts[:3]], params[:3], use_tqdm=False
    )
    (stats,) = llm.collective_rpc("diffusion_stats", kwargs={"reset": True})
    outputs += llm.generate({"prompt_token_ids": prompts[3]}, params[3], use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in outputs] == want
    # The long request ran Focus steps, its sparse layers attended part of the prompt.
    assert stats["steps"] > stats["refresh_steps"] > 0
