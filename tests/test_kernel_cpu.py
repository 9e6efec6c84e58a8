"""The FOCUS backend's CPU path (kernels/cpu.py) against the torch twins: attention over any
key set, shuffled and consecutive cache blocks, the gathered path for many queries, and the
sink scores it returns from the same pass."""

from __future__ import annotations

import pytest
import torch

from vllm_focus.kernels import cpu
from vllm_focus.kernels.reference import (
    prompt_block_scores_ref,
    sink_scores_ref,
    sparse_paged_attention_ref,
)
from vllm_focus.testing.paged import BLOCK_SIZE, HEAD_DIM, paged_case, rel_rms

LAYOUTS = [(4, 4), (7, 1), (6, 2)]
RAGGED = [([1], [1]), ([63, 200, 15], [3, 1, 15]), ([1000], [2])]


def _arranged(case: dict, seq_lens: list[int], layout: str) -> dict:
    """The case's cache re-laid. "shuffled": as built (blocks anywhere, rows of a block
    interleaved with other KV heads); "consecutive": each request's blocks at consecutive ids;
    "engine": also rows stored as vLLM's CPU cache stores them, [blocks, block_size, kv_heads,
    K|V], where a range of blocks is one strided run of rows; "engine-reversed": that, each
    request's blocks in reverse order (as a request gets blocks another one freed)."""
    if layout == "shuffled":
        return case
    table = torch.zeros_like(case["block_table"])
    used = 0
    for r, n in enumerate(seq_lens):
        count = -(-n // BLOCK_SIZE)
        ids = torch.arange(used, used + count, dtype=table.dtype)
        table[r, :count] = ids.flip(0) if layout == "engine-reversed" else ids
        used += count
    case = {**case, "block_table": table}
    if layout.startswith("engine"):
        kv = torch.cat([case["key_cache"], case["value_cache"]], -1).contiguous()
        case.update(key_cache=kv[..., :HEAD_DIM], value_cache=kv[..., HEAD_DIM:])
    return case


LAYOUT_NAMES = ["shuffled", "consecutive", "engine", "engine-reversed"]


def test_engine_layout_reads_in_place():
    case = _arranged(paged_case([100], [1], 4, 2, 1.0, seed=1), [100], "engine")
    every = cpu.request_keys(case["key_cache"], case["block_table"], 0, torch.arange(100))
    assert every.data_ptr() == case["key_cache"].data_ptr()  # a view, not a copy
    some = torch.tensor([3, 50, 99])
    picked = cpu.request_keys(case["key_cache"], case["block_table"], 0, some)
    assert torch.equal(picked, every[some])
    # Blocks in reverse order: a dense set still attends over the span in place.
    case = _arranged(paged_case([100], [1], 4, 2, 1.0, seed=1), [100], "engine-reversed")
    positions = torch.arange(100)
    span = cpu._span(case["block_table"], 0, positions, BLOCK_SIZE)
    keys, _, owner = cpu._attended_rows(
        case["key_cache"], case["value_cache"], case["block_table"], 0, positions, span
    )
    assert keys.data_ptr() == case["key_cache"].data_ptr()
    assert sorted(owner[owner >= 0].tolist()) == list(range(100))


@pytest.mark.parametrize("num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize("seq_lens, num_queries", RAGGED, ids=["len1", "ragged", "long"])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_attention_matches_twin(num_heads, num_kv_heads, seq_lens, num_queries, density, layout):
    case = paged_case(seq_lens, num_queries, num_heads, num_kv_heads, density, seed=len(seq_lens))
    case = _arranged(case, seq_lens, layout)
    scale = HEAD_DIM**-0.5
    got, sinks = cpu.paged_attention_cpu(**case, scale=scale)
    assert sinks is None
    assert rel_rms(got, sparse_paged_attention_ref(**case, scale=scale)) < 1e-5


def test_many_queries_and_small_chunks(monkeypatch):
    """More queries than FEW_QUERIES take the gathered path; a tiny MAX_SCORES splits the
    in-place path into chunks of one query token. Both equal the twin."""
    seq_lens, num_queries = [300, 40], [290, 5]
    case = paged_case(seq_lens, num_queries, 6, 2, 0.5, seed=5)
    scale = HEAD_DIM**-0.5
    want = sparse_paged_attention_ref(**case, scale=scale)
    monkeypatch.setattr(cpu, "FEW_QUERIES", 8)
    assert rel_rms(cpu.paged_attention_cpu(**case, scale=scale)[0], want) < 1e-5
    monkeypatch.setattr(cpu, "FEW_QUERIES", 10_000)
    monkeypatch.setattr(cpu, "MAX_SCORES", 1)
    assert rel_rms(cpu.paged_attention_cpu(**case, scale=scale)[0], want) < 1e-5


@pytest.mark.parametrize("num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_sink_scores_from_the_attention_pass(num_heads, num_kv_heads, layout):
    seq_lens, num_queries, prompt_lens = [63, 200, 15], [3, 1, 15], [40, 199, 1]
    case = paged_case(seq_lens, num_queries, num_heads, num_kv_heads, 1.0, seed=11)
    case = _arranged(case, seq_lens, layout)
    scale = HEAD_DIM**-0.5
    wanted = [40, 0, 1]  # request 1 does not ask for sinks
    _, got = cpu.paged_attention_cpu(**case, scale=scale, sink_prompt_lens=wanted)
    cu = torch.zeros(len(num_queries) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(num_queries), 0)
    want = sink_scores_ref(
        case["q"],
        cu,
        case["key_cache"],
        case["block_table"],
        torch.tensor(seq_lens, dtype=torch.int32),
        torch.tensor(prompt_lens, dtype=torch.int32),
        scale,
    )
    assert got.shape == (3, 40)
    for r, length in enumerate(wanted):
        assert torch.isinf(got[r, length:]).all()
        if length:
            assert rel_rms(got[r, :length], want[r, :length]) < 1e-5


@pytest.mark.parametrize("num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_block_scores_from_means_match_twin(num_heads, num_kv_heads, layout):
    seq_lens, num_queries, prompt_lens = [63, 200, 15], [3, 1, 2], [40, 199, 1]
    case = paged_case(seq_lens, num_queries, num_heads, num_kv_heads, 1.0, seed=7)
    case = _arranged(case, seq_lens, layout)
    scale, size = HEAD_DIM**-0.5, 24  # prompt blocks straddle cache blocks of 16
    want = prompt_block_scores_ref(
        case["q"],
        case["query_req"],
        case["key_cache"],
        case["block_table"],
        torch.tensor(prompt_lens, dtype=torch.int32),
        size,
        scale,
    )
    for req, length in enumerate(prompt_lens):
        means = cpu.prompt_block_means(case["key_cache"], case["block_table"], req, length, size)
        assert means.shape == (-(-length // size), num_kv_heads, HEAD_DIM)
        got = cpu.block_scores_from_means(case["q"][case["query_req"] == req], means, scale)
        assert rel_rms(got, want[req, : means.shape[0]]) < 1e-5


def test_non_finite_rows_outside_the_set_do_not_leak():
    """A dense set attends over its blocks' span in place; rows of the span outside the set
    (here the unwritten tail of the last block) are masked, and when they hold inf/NaN (0 x inf
    would poison the sum) the exact rows are used instead."""
    case = _arranged(paged_case([100], [3], 4, 2, 1.0, seed=2), [100], "engine")
    last = int(case["block_table"][0, 100 // BLOCK_SIZE])
    case["value_cache"][last, 100 % BLOCK_SIZE :] = float("inf")
    case["key_cache"][last, 100 % BLOCK_SIZE :] = float("nan")
    scale = HEAD_DIM**-0.5
    got, _ = cpu.paged_attention_cpu(**case, scale=scale)
    assert torch.isfinite(got).all()
    assert rel_rms(got, sparse_paged_attention_ref(**case, scale=scale)) < 1e-5
