"""Paged-KV-cache addressing shared by the Triton kernels, and their launchers' input checks.

A request's token at position p lives in physical block block_table[req, p // block_size],
row p % block_size; caches are [num_blocks, block_size, num_kv_heads, head_dim] with any
strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def physical_blocks(BLOCK_TABLE, i_req, pos, m_n, stride_tr, stride_tb, CACHE_BLOCK: tl.constexpr):
    """Physical block (int64) holding each position of `pos`; 0 where `m_n` is off."""
    p_blk = BLOCK_TABLE + i_req * stride_tr + (pos // CACHE_BLOCK) * stride_tb
    return tl.load(p_blk, mask=m_n, other=0).to(tl.int64)


@triton.jit
def load_rows(
    CACHE, blk, pos, m_n, i_kvh, o_d, m_d,
    stride_b, stride_n, stride_h, stride_d,
    CACHE_BLOCK: tl.constexpr,
):  # fmt: skip
    """The [len(pos), BLOCK_D] float32 rows of KV head `i_kvh` at `pos`; 0 where masked."""
    p = CACHE + blk[:, None] * stride_b + (pos % CACHE_BLOCK)[:, None] * stride_n
    p = p + i_kvh * stride_h + o_d[None, :] * stride_d
    return tl.load(p, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)


def check_int32(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {tensor.dtype}")


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
