"""Attention-sink scoring for Focus attention (at the last dense layer).

Each prompt key's score is the softmax attention it receives from the active queries of its
request, summed over those queries and all query heads (the softmax runs over every key of the
request, as in the dense layer). Summed rather than averaged so tensor-parallel ranks can
all-reduce before dividing. Two kernels: the log-sum-exp of every (query, head) row over all
keys, then per (request, tile of prompt keys) the sum of exp(q . k * scale - lse).
Plain-torch twin: `kernels.reference.sink_scores_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_focus.kernels.paged import check_heads, check_int32, load_rows, physical_blocks


@triton.jit
def _row_lse_kernel(
    Q, K_CACHE, BLOCK_TABLE, QUERY_REQ, SEQ_LENS, LSE,
    scale,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_tr, stride_tb,
    stride_lt, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    i_t = tl.program_id(0).to(tl.int64)
    i_kvh = tl.program_id(1).to(tl.int64)
    i_req = tl.load(QUERY_REQ + i_t).to(tl.int64)
    seq_len = tl.load(SEQ_LENS + i_req)
    o_g = tl.arange(0, BLOCK_G)
    o_d = tl.arange(0, BLOCK_D)
    m_g = o_g < GROUP
    m_d = o_d < HEAD_DIM
    heads = i_kvh * GROUP + o_g
    p_q = Q + i_t * stride_qt + heads[:, None] * stride_qh + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    b_l = tl.zeros([BLOCK_G], tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        m_n = pos < seq_len
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
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_l = b_l * tl.exp(b_m - b_m_new) + tl.sum(tl.exp(b_s - b_m_new[:, None]), 1)
        b_m = b_m_new
    p_lse = LSE + i_t * stride_lt + heads * stride_lh
    tl.store(p_lse, b_m + tl.log(b_l), mask=m_g)


@triton.jit
def _sink_scores_kernel(
    Q, K_CACHE, BLOCK_TABLE, CU_Q, PROMPT_LENS, LSE, SCORES,
    scale,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_tr, stride_tb,
    stride_lt, stride_lh,
    stride_sr, stride_sn,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    prompt_len = tl.load(PROMPT_LENS + i_r)
    pos = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = pos < prompt_len
    p_out = SCORES + i_r * stride_sr + pos * stride_sn
    q_start = tl.load(CU_Q + i_r)
    q_end = tl.load(CU_Q + i_r + 1)
    o_g = tl.arange(0, BLOCK_G)
    o_d = tl.arange(0, BLOCK_D)
    m_g = o_g < GROUP
    m_d = o_d < HEAD_DIM
    blk = physical_blocks(BLOCK_TABLE, i_r, pos, m_n, stride_tr, stride_tb, CACHE_BLOCK)
    b_acc = tl.zeros([BLOCK_N], tl.float32)
    for i_kvh in range(NUM_KV_HEADS):
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
        heads = i_kvh * GROUP + o_g
        for i_t in range(q_start, q_end):
            p_q = Q + i_t * stride_qt + heads[:, None] * stride_qh + o_d[None, :] * stride_qd
            b_q = tl.load(p_q, mask=m_g[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            b_lse = tl.load(LSE + i_t * stride_lt + heads * stride_lh, mask=m_g, other=0.0)
            b_s = tl.dot(b_q, tl.trans(b_k)) * scale
            b_p = tl.exp(b_s - b_lse[:, None])
            b_p = tl.where(m_g[:, None] & m_n[None, :], b_p, 0.0)
            b_acc += tl.sum(b_p, 0)
    tl.store(p_out, tl.where(m_n, b_acc, float("-inf")))


def sink_scores(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    scale: float,
    max_prompt_len: int | None = None,
) -> torch.Tensor:
    """Summed softmax attention each prompt key receives from its request's queries.

    q:             [num_tokens, num_heads, head_dim], the tokens of request r are
                   q[cu_seqlens_q[r]:cu_seqlens_q[r + 1]]
    cu_seqlens_q:  [num_reqs + 1] int32
    key_cache:     [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    block_table:   [num_reqs, max_blocks] int32
    seq_lens:      [num_reqs] int32, keys 0..seq_len-1 form each softmax
    prompt_lens:   [num_reqs] int32, the keys that are scored
    max_prompt_len: prompt_lens.max() when the caller knows it (saves a device sync)
    returns:       [num_reqs, max_prompt_len] float32, -inf past a request's prompt
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    check_heads(num_heads, num_kv_heads)
    check_int32(
        cu_seqlens_q=cu_seqlens_q,
        block_table=block_table,
        seq_lens=seq_lens,
        prompt_lens=prompt_lens,
    )
    num_reqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    block_g = max(16, triton.next_power_of_2(group))
    block_d = max(16, triton.next_power_of_2(head_dim))
    counts = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    query_req = torch.repeat_interleave(torch.arange(num_reqs, device=q.device), counts)
    lse = torch.empty(num_tokens, num_heads, device=q.device, dtype=torch.float32)
    if max_prompt_len is None:
        max_prompt_len = int(prompt_lens.max()) if num_reqs else 0
    max_prompt = max_prompt_len
    scores = torch.empty(num_reqs, max_prompt, device=q.device, dtype=torch.float32)
    if num_tokens == 0 or max_prompt == 0:
        return scores.fill_(float("-inf"))
    _row_lse_kernel[(num_tokens, num_kv_heads)](
        q, key_cache, block_table, query_req.to(torch.int32), seq_lens, lse,
        scale,
        *q.stride(), *key_cache.stride(), *block_table.stride(), *lse.stride(),
        GROUP=group, HEAD_DIM=head_dim, CACHE_BLOCK=key_cache.shape[1],
        BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=32,
    )  # fmt: skip
    block_n = 32
    padded = torch.empty(num_reqs, triton.cdiv(max_prompt, block_n) * block_n,
                         device=q.device, dtype=torch.float32)  # fmt: skip
    _sink_scores_kernel[(num_reqs, triton.cdiv(max_prompt, block_n))](
        q, key_cache, block_table, cu_seqlens_q, prompt_lens, lse, padded,
        scale,
        *q.stride(), *key_cache.stride(), *block_table.stride(), *lse.stride(),
        *padded.stride(),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, HEAD_DIM=head_dim,
        CACHE_BLOCK=key_cache.shape[1], BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
    )  # fmt: skip
    scores.copy_(padded[:, :max_prompt])
    return scores
