"""The Focus kernels compiled on CUDA against their torch twins, at the real head layouts.

LLaDA-8B (32 query / 32 KV heads x 128) and Dream-7B (28 / 4 x 128), bfloat16 caches, 8K and
32K prompts plus a short second request, Focus-sized query sets. Runs with `pytest -m gpu` on
a machine with a GPU. Our kernels need torch + Triton only; the dense call site is vLLM's
unified attention and is skipped where vLLM is not installed (the lent GPU machine).
"""

from __future__ import annotations

import pytest
import torch

from vllm_focus.kernels.reference import prompt_block_scores_ref, sink_scores_ref
from vllm_focus.testing.paged import paged_case, rel_rms

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LAYOUTS = {"llada-8b": (32, 32), "dream-7b": (28, 4)}
HEAD_DIM = 128
GEN = 256


def _case(prompt: int, layout: str, density: float):
    num_heads, num_kv_heads = LAYOUTS[layout]
    return paged_case(
        [prompt + GEN, 300],
        [96, 3],
        num_heads,
        num_kv_heads,
        density,
        seed=prompt,
        device="cuda",
        head_dim=HEAD_DIM,
        dtype=torch.bfloat16,
    )


def _focus_keys(prompt: int, generator: torch.Generator):
    """A Focus key set of the long request: 12% of its 64-token prompt blocks, 16 sinks, the
    response; the short request attends everything."""
    blocks = prompt // 64
    kept = torch.randperm(blocks, generator=generator)[: max(1, blocks * 12 // 100)].tolist()
    sinks = torch.randint(0, prompt, (16,), generator=generator).tolist()
    ranges = [(64 * b, 64 * b + 64) for b in sorted(kept)] + [(prompt, prompt + GEN)]
    return [(0, ranges, sinks), (1, [(0, 300)], None)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("prompt", [8192, 32768])
@pytest.mark.parametrize("dense", [False, True])
def test_tiled_sparse_attention(layout, prompt, dense):
    from vllm_focus.kernels.reference import tiled_sparse_attention_ref
    from vllm_focus.kernels.sparse_attention import key_tiles, tiled_sparse_attention

    case = _case(prompt, layout, 1.0)
    generator = torch.Generator().manual_seed(prompt)
    per_request = (
        [(0, [(0, prompt + GEN)], None), (1, [(0, 300)], None)]
        if dense
        else _focus_keys(prompt, generator)
    )
    starts = [0, 96, 99]
    keys = key_tiles(per_request, starts, "cuda")
    query_start = torch.tensor(starts, dtype=torch.int32, device="cuda")
    args = (case["q"], case["key_cache"], case["value_cache"], case["block_table"], query_start)
    scale = HEAD_DIM**-0.5
    got = tiled_sparse_attention(*args, keys, scale, torch.full_like(case["q"], float("nan")))
    torch.cuda.synchronize()
    want = tiled_sparse_attention_ref(*args, keys, scale, torch.empty_like(case["q"]))
    assert not got.isnan().any()
    assert rel_rms(got.float(), want.float()) < 2e-2


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("prompt", [8192, 32768])
def test_dense_call_site_unified_attention(layout, prompt):
    """The backend's dense call site (vLLM's Triton unified attention, bidirectional) on the
    cache views the backend hands it. Needs vLLM, which the lent GPU machine lacks."""
    pytest.importorskip("vllm")
    from vllm_focus.attention.triton_path import DenseBatch, dense_attention
    from vllm_focus.kernels.reference import sparse_paged_attention_ref

    case = _case(prompt, layout, 1.0)
    lengths = [prompt + GEN, 300]
    batch = DenseBatch(
        None,
        torch.tensor([0, 96, 99], dtype=torch.int32, device="cuda"),
        torch.tensor(lengths, dtype=torch.int32, device="cuda"),
        case["block_table"],
        96,
        max(lengths),
    )
    scale = HEAD_DIM**-0.5
    got = torch.full_like(case["q"], float("nan"))
    dense_attention(case["q"], case["key_cache"], case["value_cache"], scale, batch, got)
    torch.cuda.synchronize()
    want = sparse_paged_attention_ref(**case, scale=scale)
    assert rel_rms(got.float(), want.float()) < 2e-2


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("prompt", [8192, 32768])
def test_block_and_sink_scores(layout, prompt):
    from vllm_focus.kernels.block_scores import prompt_block_scores
    from vllm_focus.kernels.sink_scores import sink_scores

    case = _case(prompt, layout, 1.0)
    scale = HEAD_DIM**-0.5
    prompt_lens = torch.tensor([prompt, 250], dtype=torch.int32, device="cuda")
    blocks = dict(
        q=case["q"],
        query_req=case["query_req"],
        key_cache=case["key_cache"],
        block_table=case["block_table"],
        prompt_lens=prompt_lens,
        prompt_block_size=64,
        scale=scale,
    )
    got, want = prompt_block_scores(**blocks), prompt_block_scores_ref(**blocks)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert rel_rms(got[finite], want[finite]) < 2e-2
    counts = torch.bincount(case["query_req"].long(), minlength=2)
    cu_q = torch.zeros(3, dtype=torch.int32, device="cuda")
    cu_q[1:] = torch.cumsum(counts, 0)
    sinks = dict(
        q=case["q"],
        cu_seqlens_q=cu_q,
        key_cache=case["key_cache"],
        block_table=case["block_table"],
        seq_lens=torch.tensor([prompt + GEN, 300], dtype=torch.int32, device="cuda"),
        prompt_lens=prompt_lens,
        scale=scale,
    )
    got, want = sink_scores(**sinks), sink_scores_ref(**sinks)
    finite = torch.isfinite(want)
    assert rel_rms(got[finite], want[finite]) < 2e-2


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("prompt", [8192, 32768])
def test_block_sparse_attention(layout, prompt):
    """SparseD's block-sparse kernel at the published long-prompt recipe (blocks of 128, about
    0.3 of the key blocks per head and query block) against the CPU path's torch twin."""
    from vllm_focus.attention.sparsed import block_sparse_torch
    from vllm_focus.kernels.block_sparse import block_sparse_attention

    num_heads, num_kv_heads = LAYOUTS[layout]
    total, size = prompt + GEN, 128
    generator = torch.Generator(device="cuda").manual_seed(prompt)
    shape = (total, num_heads + 2 * num_kv_heads, HEAD_DIM)
    fused = torch.randn(shape, generator=generator, device="cuda", dtype=torch.bfloat16)
    q, key, value = fused.split([num_heads, num_kv_heads, num_kv_heads], 1)
    blocks = -(-total // size)
    mask = torch.rand(num_heads, blocks, blocks, generator=generator, device="cuda") < 0.3
    mask[:, :, -1] = True  # the generation's budget, never empty
    scale = HEAD_DIM**-0.5
    got = block_sparse_attention(q, key, value, mask, size, scale, torch.full_like(q, float("nan")))
    torch.cuda.synchronize()
    want = block_sparse_torch(q, key, value, mask, size, scale, torch.empty_like(q))
    assert not got.isnan().any()
    assert rel_rms(got.float(), want.float()) < 2e-2
