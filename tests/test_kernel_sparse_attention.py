"""The sparse paged-attention Triton kernel against its torch twin (Triton interpreter on CPU,
compiled under the `gpu` marker), and at density 1 against dense attention."""

from __future__ import annotations

import pytest
import torch

from vllm_focus.kernels.reference import sparse_paged_attention_ref
from vllm_focus.testing.paged import BLOCK_SIZE, HEAD_DIM, interpreted, paged_case, rel_rms

LAYOUTS = [(4, 4), (7, 1), (6, 2)]  # LLaDA-like MHA, Dream-like GQA 7, GQA 3
RAGGED = [([1], [1]), ([63, 200, 15], [3, 1, 15]), ([1000], [2])]


@pytest.mark.parametrize("num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize("seq_lens, num_queries", RAGGED, ids=["len1", "ragged", "long"])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_kernel_matches_torch_twin(num_heads, num_kv_heads, seq_lens, num_queries, density):
    kernel = interpreted("sparse_attention", "sparse_paged_attention")
    case = paged_case(seq_lens, num_queries, num_heads, num_kv_heads, density, seed=len(seq_lens))
    scale = HEAD_DIM**-0.5
    out = torch.full_like(case["q"], float("nan"))  # a row the kernel skips stays NaN
    got = kernel(**case, scale=scale, out=out)
    want = sparse_paged_attention_ref(**case, scale=scale)
    assert not got.isnan().any()
    assert rel_rms(got, want) < 1e-5


def test_density_one_equals_dense_attention():
    case = paged_case([63, 200], [4, 2], 6, 2, 1.0, seed=3)
    scale = HEAD_DIM**-0.5
    got = interpreted("sparse_attention", "sparse_paged_attention")(**case, scale=scale)
    # Dense attention from contiguous per-request K/V, without the paged-cache indirection.
    for token in range(case["q"].shape[0]):
        req = int(case["query_req"][token])
        length = [63, 200][req]
        blocks = case["block_table"][req, : -(-length // BLOCK_SIZE)].long()
        keys = case["key_cache"][blocks].reshape(-1, 2, HEAD_DIM)[:length]
        values = case["value_cache"][blocks].reshape(-1, 2, HEAD_DIM)[:length]
        want = torch.nn.functional.scaled_dot_product_attention(
            case["q"][token][:, None, :],
            keys.repeat_interleave(3, dim=1).transpose(0, 1),
            values.repeat_interleave(3, dim=1).transpose(0, 1),
            scale=scale,
        )[:, 0, :]
        assert rel_rms(got[token], want) < 1e-5
