"""Write fresh K/V rows into a paged cache at their slots, skipping slot -1.

A Focus step computes positions whose cached K/V it keeps (slot -1): a boolean-mask write
would make the host wait for the device to count them. One program per (token, KV head)
stores one row, or nothing. Plain-torch twin: `kernels.reference.write_kv_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
    KEY, VALUE, K_CACHE, V_CACHE, SLOTS,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cn, stride_ch, stride_db, stride_dn, stride_dh,
    HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    slot = tl.load(SLOTS + i_t).to(tl.int64)
    if slot >= 0:
        o_d = tl.arange(0, BLOCK_D)
        m_d = o_d < HEAD_DIM
        blk, row = slot // CACHE_BLOCK, slot % CACHE_BLOCK
        key = tl.load(KEY + i_t * stride_kt + i_h * stride_kh + o_d, mask=m_d)
        value = tl.load(VALUE + i_t * stride_vt + i_h * stride_vh + o_d, mask=m_d)
        p_k = K_CACHE + blk * stride_cb + row * stride_cn + i_h * stride_ch + o_d
        p_v = V_CACHE + blk * stride_db + row * stride_dn + i_h * stride_dh + o_d
        tl.store(p_k, key.to(K_CACHE.dtype.element_ty), mask=m_d)
        tl.store(p_v, value.to(V_CACHE.dtype.element_ty), mask=m_d)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key, value: [tokens, kv_heads, head_dim] (head_dim contiguous); caches
    [blocks, block_size, kv_heads, head_dim] with head_dim contiguous; slot_mapping [tokens]
    (int32 or int64), -1: leave that token's cached K/V as they are."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    for name, tensor in (("key", key), ("value", value), ("key_cache", key_cache)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension")
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *key_cache.stride()[:3], *value_cache.stride()[:3],
        HEAD_DIM=head_dim, CACHE_BLOCK=key_cache.shape[1],
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip
