"""The tiled sparse-attention Triton kernel against its torch twin (Triton interpreter on CPU,
compiled under the `gpu` marker): key sets of ranges and point lists, split over several
programs and merged, GQA layouts, and at full density against dense attention."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_focus.kernels.reference import key_tile_positions, tiled_sparse_attention_ref
from vllm_focus.testing.paged import BLOCK_SIZE, HEAD_DIM, interpreted, paged_case, rel_rms

LAYOUTS = [(4, 4), (7, 1), (6, 2)]  # LLaDA-like MHA, Dream-like GQA 7, GQA 3
SEQ_LENS = [63, 1100, 15]
NUM_QUERIES = [3, 40, 15]
# Per request: ranges and points. The long one spans several splits (8 tiles of 64 each),
# has a point list with skipped entries (-1), and a range cut mid-tile.
KEY_SETS = {
    "whole": [(0, [(0, 63)], None), (1, [(0, 1100)], None), (2, [(0, 15)], None)],
    "sparse": [
        (0, [(10, 11)], None),
        (1, [(0, 16), (64, 600), (1000, 1100)], [300, 5, -1, 9, 700]),
        (2, [], [3, 7]),
    ],
    "one-request": [(1, [(200, 300)], [0, 1, 2])],
    # Points in runs of neighbours (the CPU kernel reads each run at once): runs cut at cache
    # blocks of 16 (14-15 | 16-17, 96-111 | 112-127 | 128-140), by a skipped entry (-1 before
    # 18), by a step back (42 then 5); a long list spans several point tiles.
    "runs": [
        (0, [], [0, 1, 2, 3]),
        (1, [(600, 610)], [14, 15, 16, 17, -1, 18, 40, 41, 42, 5, 6, *range(96, 141)]),
        (2, [(8, 10)], [3, 4]),
    ],
}


def _query_start(num_queries):
    starts = [0]
    for n in num_queries:
        starts.append(starts[-1] + n)
    return starts


@pytest.mark.parametrize("num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize("key_set", list(KEY_SETS))
def test_kernel_matches_torch_twin(num_heads, num_kv_heads, key_set):
    from vllm_focus.kernels.sparse_attention import TILE_N, TILES_PER_SPLIT, key_tiles

    attention = interpreted("sparse_attention", "tiled_sparse_attention")
    case = paged_case(SEQ_LENS, NUM_QUERIES, num_heads, num_kv_heads, 1.0, seed=num_heads)
    starts = _query_start(NUM_QUERIES)
    keys = key_tiles(KEY_SETS[key_set], starts, "cpu")
    if key_set == "whole":
        tiles = math.ceil(1100 / TILE_N)
        assert keys.num_slots == math.ceil(tiles / TILES_PER_SPLIT) > 1  # split-K
    query_start = torch.tensor(starts, dtype=torch.int32)
    args = (case["q"], case["key_cache"], case["value_cache"], case["block_table"], query_start)
    scale = HEAD_DIM**-0.5
    # Rows outside the key set stay as they were (NaN here).
    got = attention(*args, keys, scale, torch.full_like(case["q"], float("nan")))
    want = tiled_sparse_attention_ref(*args, keys, scale, torch.full_like(case["q"], float("nan")))
    assert torch.equal(got.isnan(), want.isnan())
    rows = keys.rows
    assert not got[rows].isnan().any()
    assert rel_rms(got[rows], want[rows]) < 1e-5


def test_log_sum_exp_and_density_one_equal_dense_attention():
    """Whole-sequence tiles give plain softmax attention from contiguous K/V, and the
    log-sum-exp of every row's scores."""
    from vllm_focus.kernels.sparse_attention import key_tiles

    attention = interpreted("sparse_attention", "tiled_sparse_attention")
    lengths, counts = [63, 700], [4, 2]
    case = paged_case(lengths, counts, 6, 2, 1.0, seed=3)
    starts = _query_start(counts)
    keys = key_tiles([(r, [(0, n)], None) for r, n in enumerate(lengths)], starts, "cpu")
    assert {r: p.tolist() for r, p in key_tile_positions(keys).items()} == {
        r: list(range(n)) for r, n in enumerate(lengths)
    }
    scale = HEAD_DIM**-0.5
    lse = torch.zeros(sum(counts), 6)
    got = attention(
        case["q"], case["key_cache"], case["value_cache"], case["block_table"],
        torch.tensor(starts, dtype=torch.int32), keys, scale, torch.empty_like(case["q"]), lse=lse,
    )  # fmt: skip
    for r, length in enumerate(lengths):
        blocks = case["block_table"][r, : -(-length // BLOCK_SIZE)].long()
        k = case["key_cache"][blocks].reshape(-1, 2, HEAD_DIM)[:length].repeat_interleave(3, 1)
        v = case["value_cache"][blocks].reshape(-1, 2, HEAD_DIM)[:length].repeat_interleave(3, 1)
        rows = slice(starts[r], starts[r + 1])
        scores = torch.einsum("thd,nhd->thn", case["q"][rows], k) * scale
        want = torch.einsum("thn,nhd->thd", scores.softmax(-1), v)
        assert rel_rms(got[rows], want) < 1e-5
        assert torch.allclose(lse[rows], scores.logsumexp(-1), atol=1e-5)
