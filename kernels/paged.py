"""Paged-KV-cache addressing and the online-softmax step shared by the Triton kernels, and
their launchers' input checks.

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


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a @ b with float32 accumulation; IEEE: exact float32 products (for float32 inputs)."""
    if IEEE:
        result = tl.dot(a, b, input_precision="ieee")
    else:
        result = tl.dot(a, b)
    return result


@triton.jit
def online_softmax_step(b_s, b_v, b_max, b_sum, b_acc, IEEE: tl.constexpr):
    """Fold one tile of scaled scores b_s [M, N] (-inf where there is no key) and its values
    b_v [N, D] into the running max and sum [M] and unnormalised output [M, D]; a tile with
    no key leaves them as they were. Returns the new (max, sum, output)."""
    b_new = tl.maximum(b_max, tl.max(b_s, 1))
    b_safe = tl.where(b_new == float("-inf"), 0.0, b_new)
    b_alpha = tl.exp(b_max - b_safe)
    b_p = tl.exp(b_s - b_safe[:, None])
    b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_v.dtype), b_v, IEEE)
    return b_new, b_sum, b_acc


def check_int32(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {tensor.dtype}")


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
