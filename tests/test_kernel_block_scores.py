"""Prompt-block scoring kernel against its torch twin (interpreter on CPU, compiled on GPU)."""

from __future__ import annotations

import pytest
import torch

from vllm_focus.kernels.reference import prompt_block_scores_ref
from vllm_focus.testing.paged import HEAD_DIM, interpreted, paged_case, rel_rms


def _args(seq_lens, num_queries, num_heads, num_kv_heads, prompt_lens, device="cpu"):
    case = paged_case(seq_lens, num_queries, num_heads, num_kv_heads, 1.0, seed=7, device=device)
    return dict(
        q=case["q"],
        query_req=case["query_req"],
        key_cache=case["key_cache"],
        block_table=case["block_table"],
        prompt_lens=torch.tensor(prompt_lens, dtype=torch.int32, device=device),
    )


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (7, 1), (6, 2)])
@pytest.mark.parametrize(
    "seq_lens, num_queries, prompt_lens, prompt_block_size",
    [
        ([1], [1], [1], 1),
        ([63, 200, 15], [3, 1, 15], [40, 199, 1], 1),
        ([63, 200, 15], [3, 1, 15], [40, 199, 1], 15),
        ([63, 200, 15], [3, 1, 15], [40, 199, 1], 64),
        ([1000], [2], [1000], 64),
    ],
    ids=["len1", "ragged-1", "ragged-15", "ragged-64", "long-64"],
)
def test_scores_match_torch_twin(
    num_heads, num_kv_heads, seq_lens, num_queries, prompt_lens, prompt_block_size
):
    args = _args(seq_lens, num_queries, num_heads, num_kv_heads, prompt_lens)
    scale = HEAD_DIM**-0.5
    got = interpreted("block_scores", "prompt_block_scores")(
        **args, prompt_block_size=prompt_block_size, scale=scale
    )
    want = prompt_block_scores_ref(**args, prompt_block_size=prompt_block_size, scale=scale)
    assert got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # -inf exactly past each prompt
    finite = torch.isfinite(want)
    assert rel_rms(got[finite], want[finite]) < 1e-5


def test_top_block_is_the_one_that_matches_the_queries():
    """A block whose keys equal the query direction must score highest."""
    args = _args([128], [2], 4, 2, [128])
    key_cache, block_table = args["key_cache"], args["block_table"]
    target = 5  # prompt block of 16 positions: positions 80..95
    direction = torch.randn(HEAD_DIM)
    for position in range(80, 96):
        key_cache[block_table[0, position // 16], position % 16] = direction * 4
    args["q"] = direction.expand_as(args["q"]).clone()
    scores = interpreted("block_scores", "prompt_block_scores")(
        **args, prompt_block_size=16, scale=HEAD_DIM**-0.5
    )
    assert int(scores[0].argmax()) == target
