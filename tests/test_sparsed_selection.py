"""SparseD's block pattern and its attention: the reference's plain statement of the rule by
hand, and the engine's (`vllm_focus.attention.sparsed.run_layer`, what both attention paths
call) against the reference on random inputs, no engine needed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vllm_focus.attention.sparsed import ATTEND, SELECT, SparsedStep, generation_block, run_layer
from vllm_focus.reference.model import (
    ReferenceConfig,
    SparsedForward,
    _attention,
    _expand_pattern,
    _sparsed_pattern,
)
from vllm_focus.testing.paged import interpreted


def _config(family: str, heads: int, kv_heads: int, head_dim: int) -> ReferenceConfig:
    return ReferenceConfig(family, heads * head_dim, 1, heads, kv_heads, 16, 1e-6, 1e4, 1.0, 0)


def test_reference_pattern_by_hand():
    """8 positions in blocks of 2, the last 4 the generation (its blocks: 2 and 3); one head,
    head dim 2, LLaDA (scale 1/sqrt(1 head) = 1). Key j is (a_j, 0) with a = 0 0 3 0 1 1 0 2,
    so a query (s, 0) weighs key j by exp(s a_j) / Z and a tile by the sum of its two.

    - s = 1: tiles 2, e^3+1, 2e, 1+e^2; int(4 x 0.3) + 1 = 2 kept: 1 and 3, the generation's
      cleared: {1}; then over keys 4..7 alone the better of 2e and 1+e^2 (1 of 2): 3.
    - s = -1: tiles 2, 1+e^-3, 2/e, 1+e^-2: 0 and 3, cleared to {0}; then 3.
    - s = 0: every tile equal: ties to the lower blocks, {0, 1}; then 2.
    """
    keys = torch.zeros(8, 1, 2)
    keys[:, 0, 0] = torch.tensor([0, 0, 3, 0, 1, 1, 0, 2], dtype=torch.float32)
    q = torch.zeros(8, 1, 2)
    for block, s in enumerate([1.0, -1.0, 0.0, 1.0]):
        q[2 * block : 2 * block + 2, 0, 0] = s
    rule = SparsedForward(block_size=2, select=0.3, gen_length=4)
    pattern = _sparsed_pattern(q, keys, rule, _config("llada", 1, 1, 2))
    rows = [torch.nonzero(pattern[0, i]).flatten().tolist() for i in range(4)]
    assert rows == [[1, 3], [0, 3], [0, 1, 2], [1, 3]]


@pytest.mark.parametrize(
    "total, gen_length, size, last",
    [(70, 20, 8, 7), (64, 16, 16, 3), (33, 40, 32, 0), (10, 1, 4, 2)],
)
def test_generation_block(total, gen_length, size, last):
    """The first block starting inside the last `gen_length` positions, else the final one."""
    assert generation_block(total, gen_length, size) == last


# (total length, generation length, block size, select) per request of one batch; lengths
# that are not a multiple of the block leave a short last block.
SPECS = [(70, 20, 8, 0.3), (64, 16, 16, 0.5), (33, 10, 32, 0.3), (100, 64, 7, 0.2)]


@pytest.mark.parametrize("path", ["cpu", "triton"])
@pytest.mark.parametrize(
    "family, heads, kv_heads", [("llada", 4, 4), ("dream", 4, 2), ("dream", 6, 2)]
)
def test_engine_pattern_and_attention_equal_the_reference(family, heads, kv_heads, path):
    """A batch of SELECT requests, then the same as ATTEND requests: each layer's pattern as
    the reference builds it, and the attention through it as the reference's masked softmax,
    on either path's block-sparse attention (the Triton kernel through the interpreter)."""
    attention = None
    if path == "triton":
        attention = interpreted("block_sparse", "block_sparse_attention")
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads)
    starts = [0]
    for total, *_ in SPECS:
        starts.append(starts[-1] + total)
    dim = 16
    q = torch.randn(starts[-1], heads, dim, generator=generator) * 2
    key = torch.randn(starts[-1], kv_heads, dim, generator=generator) * 2
    value = torch.randn(starts[-1], kv_heads, dim, generator=generator)
    steps = [
        SparsedStep(SELECT, size, select, generation_block(total, gen, size), family == "llada", {})
        for total, gen, size, select in SPECS
    ]
    meta = SimpleNamespace(focus=SimpleNamespace(sparsed=steps), query_start_loc_cpu=starts)
    scale = 1 / math.sqrt(dim)
    out = torch.full_like(q, float("nan"))
    run_layer(q, key, value, meta, 2, scale, heads, out)
    assert out.isnan().all()  # a SELECT step's attention is the caller's (dense)
    config = _config(family, heads, kv_heads, dim)
    patterns = []
    for r, (_total, gen, size, select) in enumerate(SPECS):
        rows = slice(starts[r], starts[r + 1])
        want = _sparsed_pattern(q[rows], key[rows], SparsedForward(size, select, gen), config)
        assert torch.equal(steps[r].masks[2], want)
        patterns.append(want)
    for step in steps:
        step.mode = ATTEND
    run_layer(q, key, value, meta, 2, scale, heads, out, attention)
    for r, (total, _gen, size, _select) in enumerate(SPECS):
        rows = slice(starts[r], starts[r + 1])
        allowed = _expand_pattern(patterns[r], size, total)
        want, _ = _attention(q[rows], key[rows], value[rows], allowed)
        torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-5)
