"""The K/V cache-write Triton kernel (interpreter on CPU) against its torch twin, on the
backend's strided cache views: rows with slot -1 leave the cache as it was."""

from __future__ import annotations

import pytest
import torch

from vllm_focus.attention.backend import split_kv_cache
from vllm_focus.kernels.reference import write_kv_ref
from vllm_focus.testing.paged import interpreted


@pytest.mark.parametrize("num_kv_heads, head_dim", [(2, 32), (1, 48)])
def test_write_matches_twin_and_skips_unwritten(num_kv_heads, head_dim):
    write_kv = interpreted("cache_write", "write_kv")
    generator = torch.Generator().manual_seed(head_dim)
    blocks, block_size, tokens = 6, 16, 20
    # The CPU backend's logical view [blocks, kv_heads, block_size, K|V].
    cache = torch.randn(blocks, num_kv_heads, block_size, 2 * head_dim, generator=generator)
    key = torch.randn(tokens, num_kv_heads, head_dim, generator=generator)
    value = torch.randn(tokens, num_kv_heads, head_dim, generator=generator)
    slots = torch.randperm(blocks * block_size, generator=generator)[:tokens]
    slots[::3] = -1
    got, want = cache.clone(), cache.clone()
    write_kv(key, value, *split_kv_cache(got, head_dim), slots.to(torch.int64))
    write_kv_ref(key, value, *split_kv_cache(want, head_dim), slots)
    assert torch.equal(got, want)
    assert not torch.equal(got, cache)  # something was written
    untouched = torch.ones(blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    flat = got.permute(0, 2, 1, 3).reshape(blocks * block_size, -1)
    before = cache.permute(0, 2, 1, 3).reshape(blocks * block_size, -1)
    assert torch.equal(flat[untouched], before[untouched])
