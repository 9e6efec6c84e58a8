"""Prompt-block scoring for Focus attention: one representative key per prompt block.

The prompt of each request is cut into blocks of `prompt_block_size` positions; a block's
representative key is the mean of its keys, per KV head. A block's score is the sum, over the
focus queries and the query heads of each KV group, of q . representative * scale — summed,
not averaged, so tensor-parallel ranks can all-reduce partial sums before dividing by the
total number of (query, head) pairs. One program per (request, prompt block).
Plain-torch twin: `kernels.reference.prompt_block_scores_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_focus.kernels.paged import check_heads, check_int32, load_rows, physical_blocks


@triton.jit
def _prompt_block_scores_kernel(
    Q_SUM, K_CACHE, BLOCK_TABLE, PROMPT_LENS, SCORES,
    scale,
    stride_qr, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_tr, stride_tb,
    stride_sr, stride_sb,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    PROMPT_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1).to(tl.int64)
    prompt_len = tl.load(PROMPT_LENS + i_r).to(tl.int64)
    start = i_b * PROMPT_BLOCK
    p_out = SCORES + i_r * stride_sr + i_b * stride_sb
    if start >= prompt_len:
        # Past this request's prompt: never selectable.
        tl.store(p_out, float("-inf"))
        return
    end = tl.minimum(start + PROMPT_BLOCK, prompt_len)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    total = 0.0
    for i_kvh in range(NUM_KV_HEADS):
        b_sum = tl.zeros([BLOCK_D], tl.float32)
        for tile in range(start, end, BLOCK_N):
            pos = tile + tl.arange(0, BLOCK_N)
            m_n = pos < end
            blk = physical_blocks(BLOCK_TABLE, i_r, pos, m_n, stride_tr, stride_tb, CACHE_BLOCK)
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
            b_sum += tl.sum(b_k, 0)
        b_rep = b_sum / (end - start).to(tl.float32)
        p_q = Q_SUM + i_r * stride_qr + i_kvh * stride_qh + o_d * stride_qd
        b_q = tl.load(p_q, mask=m_d, other=0.0).to(tl.float32)
        total += tl.sum(b_q * b_rep, 0)
    tl.store(p_out, total * scale)


def prompt_block_scores(
    q: torch.Tensor,
    query_req: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    prompt_lens: torch.Tensor,
    prompt_block_size: int,
    scale: float,
) -> torch.Tensor:
    """Summed scores of every prompt block of every request.

    q:            [num_tokens, num_heads, head_dim] focus queries
    query_req:    [num_tokens] int32, the request of each query token
    key_cache:    [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    block_table:  [num_reqs, max_blocks] int32
    prompt_lens:  [num_reqs] int32
    returns:      [num_reqs, max_prompt_blocks] float32, -inf past a request's prompt
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    check_heads(num_heads, num_kv_heads)
    if prompt_block_size < 1:
        raise ValueError(f"prompt_block_size must be >= 1, got {prompt_block_size}")
    check_int32(query_req=query_req, block_table=block_table, prompt_lens=prompt_lens)
    num_reqs = prompt_lens.shape[0]
    # The score is linear in q: sum the queries of each request and KV group first.
    grouped = q.float().view(num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    q_sum = torch.zeros(num_reqs, num_kv_heads, head_dim, device=q.device, dtype=torch.float32)
    q_sum.index_add_(0, query_req.long(), grouped.sum(2))
    max_blocks = max(1, -(-int(prompt_lens.max()) // prompt_block_size)) if num_reqs else 0
    scores = torch.empty(num_reqs, max_blocks, device=q.device, dtype=torch.float32)
    if num_reqs == 0:
        return scores
    _prompt_block_scores_kernel[(num_reqs, max_blocks)](
        q_sum, key_cache, block_table, prompt_lens, scores,
        scale,
        *q_sum.stride(), *key_cache.stride(), *block_table.stride(), *scores.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, CACHE_BLOCK=key_cache.shape[1],
        PROMPT_BLOCK=prompt_block_size, BLOCK_N=32,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )  # fmt: skip
    return scores
