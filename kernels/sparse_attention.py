"""Attention of ragged query tokens over a selected set of key positions in a paged KV cache.

Focus attention keeps, per request, only some keys (kept prompt blocks, sinks, the response
range); this kernel attends each query token to exactly its request's listed key positions,
reading K/V through the request's block table. One program per (query token, KV head) covers
the GQA group of query heads that share that KV head; keys stream in tiles with an online
softmax. Plain-torch twin: `kernels.reference.sparse_paged_attention_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_focus.kernels.paged import check_heads, check_int32, load_rows, physical_blocks


@triton.jit
def _sparse_paged_attention_kernel(
    Q, K_CACHE, V_CACHE, OUT, BLOCK_TABLE, QUERY_REQ, KEY_POS, CU_K,
    scale,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_tr, stride_tb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # int64 ids before any stride arithmetic: caches can exceed 2**31 elements.
    i_t = tl.program_id(0).to(tl.int64)
    i_kvh = tl.program_id(1).to(tl.int64)
    i_req = tl.load(QUERY_REQ + i_t).to(tl.int64)
    k_start = tl.load(CU_K + i_req)
    k_end = tl.load(CU_K + i_req + 1)

    o_g = tl.arange(0, BLOCK_G)
    o_d = tl.arange(0, BLOCK_D)
    m_g = o_g < GROUP
    m_d = o_d < HEAD_DIM
    heads = i_kvh * GROUP + o_g
    p_q = Q + i_t * stride_qt + heads[:, None] * stride_qh + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0).to(tl.float32)

    b_m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_G], tl.float32)
    b_acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(k_start, k_end, BLOCK_N):
        o_n = start + tl.arange(0, BLOCK_N)
        m_n = o_n < k_end
        # Key positions -> physical cache rows through the request's block table.
        pos = tl.load(KEY_POS + o_n, mask=m_n, other=0).to(tl.int64)
        blk = physical_blocks(BLOCK_TABLE, i_req, pos, m_n, stride_tr, stride_tb, CACHE_BLOCK)
        b_k = load_rows(
            K_CACHE,
            blk,
            pos,
            m_n,
            i_kvh,
            o_d,
            m_d,
            stride_kb,
            stride_kn,
            stride_kh,
            stride_kd,
            CACHE_BLOCK,
        )
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))
        # Online softmax: rescale what was accumulated to the new running maximum.
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_alpha = tl.exp(b_m - b_m_new)
        b_p = tl.exp(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = load_rows(
            V_CACHE,
            blk,
            pos,
            m_n,
            i_kvh,
            o_d,
            m_d,
            stride_vb,
            stride_vn,
            stride_vh,
            stride_vd,
            CACHE_BLOCK,
        )
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_v)
        b_m = b_m_new

    b_o = b_acc / b_l[:, None]
    p_o = OUT + i_t * stride_ot + heads[:, None] * stride_oh + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(OUT.dtype.element_ty), mask=m_g[:, None] & m_d[None, :])


def sparse_paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_req: torch.Tensor,
    key_positions: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each query token over its request's listed key positions.

    q:              [num_tokens, num_heads, head_dim]
    key_cache:      [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    value_cache:    same shape as key_cache
    block_table:    [num_reqs, max_blocks] int32, physical block of each logical block
    query_req:      [num_tokens] int32, the request each query token belongs to
    key_positions:  [total_keys] int32, per request (ragged by cu_seqlens_k) the positions
                    to attend; every request with a query token lists at least one
    cu_seqlens_k:   [num_reqs + 1] int32
    returns out:    [num_tokens, num_heads, head_dim]
    """
    num_tokens, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_dim = key_cache.shape
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache {tuple(value_cache.shape)} != key_cache {tuple(key_cache.shape)}"
        )
    if cache_dim != head_dim:
        raise ValueError(f"head_dim of q ({head_dim}) and of the cache ({cache_dim}) differ")
    check_heads(num_heads, num_kv_heads)
    if query_req.shape != (num_tokens,) or cu_seqlens_k.dim() != 1:
        raise ValueError("query_req must be [num_tokens] and cu_seqlens_k one-dimensional")
    check_int32(
        block_table=block_table,
        query_req=query_req,
        key_positions=key_positions,
        cu_seqlens_k=cu_seqlens_k,
    )
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    group = num_heads // num_kv_heads
    grid = (num_tokens, num_kv_heads)
    _sparse_paged_attention_kernel[grid](
        q, key_cache, value_cache, out, block_table, query_req, key_positions, cu_seqlens_k,
        scale,
        *q.stride(), *key_cache.stride(), *value_cache.stride(), *out.stride(),
        *block_table.stride(),
        GROUP=group, HEAD_DIM=head_dim, CACHE_BLOCK=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=32,
    )  # fmt: skip
    return out
