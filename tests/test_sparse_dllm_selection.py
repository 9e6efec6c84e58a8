"""Sparse-dLLM's key selection: the reference's plain statement of the rule by hand, and the
engine's batched selection (`vllm_focus.attention.sparse_dllm.select`, what both attention
paths call) against it on random inputs, no engine needed; the CPU path's attention over its
compacted kept K/V against plain attention over the same keys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_focus.attention.sparse_dllm import (
    ATTEND,
    SELECT,
    SparseDllmStep,
    attend_compact,
    compact,
    select,
)
from vllm_focus.reference.model import SparseDllmForward, _sparse_dllm_keep


def _hand_made():
    """8 positions, block [3, 5); 2 query heads over 1 KV head, head dim 2. Every block query
    is (1, 0), so a position's score is its key's first coordinate."""
    q = torch.zeros(8, 2, 2)
    q[3:5, :, 0] = 1.0
    keys = torch.zeros(8, 1, 2)
    first = {0: 0.1, 1: 0.5, 2: 0.2, 5: 0.3, 6: 0.9, 7: 0.0}
    for position, value in first.items():
        keys[position, 0, 0] = value
        keys[position, 0, 1] = 7.0  # the block queries' second coordinate is 0: no effect
    return q, keys


@pytest.mark.parametrize(
    "keep_ratio, kernel, kept",
    [
        # outside positions 0 1 2 5 6 7, scores .1 .5 .2 .3 .9 0; pooled by 3 (across the
        # block's seam between 2 and 5): .5 .5 .5 .9 .9 .9
        (0.5, 3, [5, 6, 7]),  # int(6 x 0.5) = 3: the three .9s
        (0.7, 3, [0, 5, 6, 7]),  # int(4.2) = 4: a fourth from the tied .5s, the lowest position
        (0.7, 1, [1, 2, 5, 6]),  # no pooling: .9 .5 .3 .2
        (0.1, 3, []),  # int(0.6) = 0
    ],
)
def test_reference_rule_by_hand(keep_ratio, kernel, kept):
    q, keys = _hand_made()
    rule = SparseDllmForward(3, 5, keep_ratio, kernel)
    assert _sparse_dllm_keep(q, keys, rule).tolist() == kept


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 2), (4, 4)])
def test_engine_selection_equals_the_reference(heads, kv_heads):
    """Three SELECT requests in one batch (their queries every position), each layer's kept
    keys as the reference finds them."""
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads)
    # (total length, block start, block end, keep ratio, kernel); blocks at the start and end
    specs = [(40, 8, 24, 0.5, 3), (65, 0, 16, 0.3, 5), (33, 17, 33, 0.9, 1)]
    lengths = [total for total, *_ in specs]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], heads, 16, generator=generator)
    key = torch.randn(starts[-1], kv_heads, 16, generator=generator)
    steps = []
    for total, low, high, ratio, kernel in specs:
        keep = int((total - (high - low)) * ratio)
        steps.append(SparseDllmStep(SELECT, low, high, keep, kernel, {}, {}))
    meta = SimpleNamespace(focus=SimpleNamespace(sparse_dllm=steps), query_start_loc_cpu=starts)
    select(q, key, meta, [0, 1, 2], 3, lambda scores: scores)
    for r, (_total, low, high, ratio, kernel) in enumerate(specs):
        rows = slice(starts[r], starts[r + 1])
        want = _sparse_dllm_keep(q[rows], key[rows], SparseDllmForward(low, high, ratio, kernel))
        assert sorted(steps[r].kept[3].tolist()) == want.tolist()
        assert steps[r].kept[3].dtype == torch.int32


def _tiled(name):
    from vllm_focus.kernels import cpu, cpu_compiled

    if name == "compiled" and not cpu_compiled.available():
        pytest.skip("no C compiler here")
    return {"torch": cpu.tiled_attention_cpu, "compiled": cpu_compiled.tiled_attention_compiled}[
        name
    ]


@pytest.mark.parametrize("impl", ["torch", "compiled"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (7, 1)])
def test_compacted_attention_is_attention_over_the_kept_keys(impl, heads, kv_heads):
    """The CPU path: at SELECT each request's kept K/V are copied (`compact`); at a later
    ATTEND step (new block K/V) its block attends the copy plus the block's fresh K/V: equal
    to plain softmax attention over exactly those keys. Two requests with more kept keys than
    one compacted block (128 rows), one with none kept."""
    generator = torch.Generator().manual_seed(heads)
    specs = [(300, 32, 64, 0.5), (45, 0, 16, 0.5), (20, 4, 20, 0.1)]  # total, block, ratio
    steps = [
        SparseDllmStep(SELECT, low, high, int((total - high + low) * ratio), 3, {}, {})
        for total, low, high, ratio in specs
    ]
    starts = [0]
    for total, *_ in specs:
        starts.append(starts[-1] + total)
    dim = 16
    q = torch.randn(starts[-1], heads, dim, generator=generator)
    key = torch.randn(starts[-1], kv_heads, dim, generator=generator)
    value = torch.randn(starts[-1], kv_heads, dim, generator=generator)
    meta = SimpleNamespace(
        focus=SimpleNamespace(sparse_dllm=steps), query_start_loc_cpu=starts, step_cache={}
    )
    select(q, key, meta, [0, 1, 2], 5, lambda scores: scores)
    compact(key, value, meta, [0, 1, 2], 5)
    assert steps[0].kept[5].numel() > 128 and steps[2].kept[5].numel() == 0

    block_starts = [0]
    for _total, low, high, _ratio in specs:
        block_starts.append(block_starts[-1] + high - low)
    block_q = torch.randn(block_starts[-1], heads, dim, generator=generator)
    block_k = torch.randn(block_starts[-1], kv_heads, dim, generator=generator)
    block_v = torch.randn(block_starts[-1], kv_heads, dim, generator=generator)
    for step in steps:
        step.mode = ATTEND
    meta = SimpleNamespace(
        focus=SimpleNamespace(sparse_dllm=steps), query_start_loc_cpu=block_starts, step_cache={}
    )
    out = torch.full_like(block_q, float("nan"))
    scale = dim**-0.5
    attend_compact(block_q, block_k, block_v, meta, [0, 1, 2], 5, scale, out, _tiled(impl))

    for r, step in enumerate(steps):
        kept = step.kept[5].long() + starts[r]
        rows = slice(block_starts[r], block_starts[r + 1])
        keys = torch.cat([key[kept], block_k[rows]]).repeat_interleave(heads // kv_heads, 1)
        values = torch.cat([value[kept], block_v[rows]]).repeat_interleave(heads // kv_heads, 1)
        weights = (torch.einsum("qhd,khd->hqk", block_q[rows], keys) * scale).softmax(-1)
        want = torch.einsum("hqk,khd->qhd", weights, values)
        assert torch.allclose(out[rows], want, atol=1e-5, rtol=1e-5)
