"""SparseD's block-sparse attention kernel (kernels/block_sparse.py; Triton interpreter on CPU,
compiled under the `gpu` marker in test_gpu_kernels.py) against its torch twin, the CPU
path's `block_sparse_torch`: random per-(head, query block) masks, GQA layouts, blocks longer
than one program's query tile, not a power of two, and a short last block; at full density
against plain softmax attention."""

from __future__ import annotations

import pytest
import torch

from vllm_focus.attention.sparsed import block_sparse_torch
from vllm_focus.testing.paged import interpreted, rel_rms

LAYOUTS = [(4, 4), (7, 1), (6, 2)]  # LLaDA-like MHA, Dream-like GQA 7, GQA 3
# (positions, block size): one query tile per block; blocks of two tiles (128 = 2 x 64) with
# a short last block; a block size that is no power of two; tiny blocks.
SHAPES = [(200, 64), (300, 128), (170, 80), (45, 7)]


def _case(total, heads, kv_heads, size, seed, density=0.4):
    generator = torch.Generator().manual_seed(seed)
    dim = 32
    q = torch.randn(total, heads, dim, generator=generator)
    key = torch.randn(total, kv_heads, dim, generator=generator)
    value = torch.randn(total, kv_heads, dim, generator=generator)
    blocks = -(-total // size)
    mask = torch.rand(heads, blocks, blocks, generator=generator) < density
    # Every (head, query block) keeps at least one key block, as SparseD's budget does.
    first = torch.randint(0, blocks, (heads, blocks), generator=generator)
    mask.scatter_(2, first[..., None], True)
    return q, key, value, mask


@pytest.mark.parametrize("heads, kv_heads", LAYOUTS)
@pytest.mark.parametrize("total, size", SHAPES)
def test_kernel_matches_torch_twin(heads, kv_heads, total, size):
    attention = interpreted("block_sparse", "block_sparse_attention")
    q, key, value, mask = _case(total, heads, kv_heads, size, seed=total + heads)
    scale = q.shape[-1] ** -0.5
    got = attention(q, key, value, mask, size, scale, torch.full_like(q, float("nan")))
    want = block_sparse_torch(q, key, value, mask, size, scale, torch.full_like(q, float("nan")))
    assert not got.isnan().any() and not want.isnan().any()
    assert rel_rms(got, want) < 1e-5
    # The mask decides: another mask gives another result.
    other = interpreted("block_sparse", "block_sparse_attention")(
        q, key, value, ~mask | torch.eye(mask.shape[1], dtype=torch.bool), size, scale,
        torch.empty_like(q),
    )  # fmt: skip
    assert rel_rms(other, want) > 1e-2


def test_views_in_and_out_and_full_density_is_dense_attention():
    """Strided views (rows of a larger batch, heads of a fused projection) in and out, and an
    all-true mask gives softmax attention over every key."""
    attention = interpreted("block_sparse", "block_sparse_attention")
    heads, kv_heads, dim, total, size = 6, 2, 32, 150, 32
    generator = torch.Generator().manual_seed(5)
    fused = torch.randn(total + 20, (heads + 2 * kv_heads) * dim, generator=generator)
    q, key, value = fused[10 : 10 + total].split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q, key, value = (x.view(total, -1, dim) for x in (q, key, value))
    blocks = -(-total // size)
    mask = torch.ones(heads, blocks, blocks, dtype=torch.bool)
    out = torch.full((total + 5, heads * dim), float("nan"))
    view = out[5:].view(total, heads, dim)
    attention(q, key, value, mask, size, dim**-0.5, view)
    assert out[:5].isnan().all()
    keys = key.repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
    values = value.repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), keys, values)
    assert rel_rms(view, dense.transpose(0, 1)) < 1e-5


def test_bad_shapes_are_named():
    attention = interpreted("block_sparse", "block_sparse_attention")
    q, key, value, mask = _case(64, 4, 2, 16, seed=0)
    with pytest.raises(ValueError, match=r"mask \(4, 3, 3\) must be \[4, 4, 4\]"):
        attention(q, key, value, mask[:, :3, :3], 16, 1.0, torch.empty_like(q))
    with pytest.raises(ValueError, match="key .* and value"):
        attention(q, key[:10], value, mask, 16, 1.0, torch.empty_like(q))


def test_torch_twin_inside_and_outside_inference_mode(monkeypatch):
    """The twin's scratch buffers outlive a call: made in the engine's inference mode, a later
    call outside it (tests, benchmarks) still writes into them, and gives the same result."""
    from vllm_focus.attention import sparsed

    monkeypatch.setattr(sparsed, "_workspace", {})
    q, key, value, mask = _case(300, 4, 2, 128, seed=3)
    with torch.inference_mode():
        inside = block_sparse_torch(q, key, value, mask, 128, 0.2, torch.empty_like(q))
    outside = block_sparse_torch(q, key, value, mask, 128, 0.2, torch.empty_like(q))
    assert torch.equal(inside, outside)
