"""Attention-sink scoring kernels against their torch twin (interpreter on CPU, GPU compiled)."""

from __future__ import annotations

import pytest
import torch

from vllm_focus.kernels.reference import sink_scores_ref
from vllm_focus.testing.paged import HEAD_DIM, interpreted, paged_case, rel_rms


def _args(seq_lens, num_queries, num_heads, num_kv_heads, prompt_lens, device="cpu"):
    case = paged_case(seq_lens, num_queries, num_heads, num_kv_heads, 1.0, seed=11, device=device)
    cu = torch.zeros(len(num_queries) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(num_queries), 0)
    return dict(
        q=case["q"],
        cu_seqlens_q=cu.to(device),
        key_cache=case["key_cache"],
        block_table=case["block_table"],
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        prompt_lens=torch.tensor(prompt_lens, dtype=torch.int32, device=device),
    )


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (7, 1), (6, 2)])
@pytest.mark.parametrize(
    "seq_lens, num_queries, prompt_lens",
    [
        ([1], [1], [1]),
        ([63, 200, 15], [3, 1, 15], [40, 199, 1]),
        ([1000], [2], [1000]),
        ([300, 90], [40, 3], [0, 80]),  # a request not scored (a refresh) beside one that is
    ],
    ids=["len1", "ragged", "long", "unscored"],
)
def test_scores_match_torch_twin(num_heads, num_kv_heads, seq_lens, num_queries, prompt_lens):
    args = _args(seq_lens, num_queries, num_heads, num_kv_heads, prompt_lens)
    scale = HEAD_DIM**-0.5
    got = interpreted("sink_scores", "sink_scores")(**args, scale=scale)
    want = sink_scores_ref(**args, scale=scale)
    assert got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert rel_rms(got[finite], want[finite]) < 1e-5


def test_whole_sequence_as_prompt_sums_to_the_number_of_rows():
    """When every key is a prompt key, each (query, head) row's probabilities sum to 1."""
    args = _args([50, 70], [3, 2], 6, 2, [50, 70])
    got = interpreted("sink_scores", "sink_scores")(**args, scale=HEAD_DIM**-0.5)
    totals = torch.where(torch.isfinite(got), got, 0.0).sum(1)
    assert torch.allclose(totals, torch.tensor([3 * 6.0, 2 * 6.0]), rtol=1e-5)
