"""Attention-sink scoring for Focus attention (at the last dense layer).

Each prompt key's score is the softmax attention it receives from the active queries of its
request, summed over those queries and all query heads (the softmax runs over every key of the
request, as in the dense layer). Summed rather than averaged so tensor-parallel ranks can
all-reduce before dividing. Two passes: the log-sum-exp of every (query, head) row over all
keys — which the tiled attention kernel returns beside the dense layer's output, so on the
engine's Triton path that pass *is* the layer's attention — then `sink_mass`: one program per
(request, tile of prompt keys) loads each key tile once per KV head and sums
exp(q . k * scale - lse) over the request's query rows, `BLOCK_M` rows (query token x query
head of the KV head) at a time.
Plain-torch twin: `kernels.reference.sink_scores_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_focus.kernels.paged import check_heads, check_int32, physical_blocks
from vllm_focus.kernels.sparse_attention import key_tiles, tiled_sparse_attention

BLOCK_M = 32
BLOCK_N = 64


@triton.jit
def _sink_mass_kernel(
    Q, K_CACHE, BLOCK_TABLE, QUERY_START, PROMPT_LENS, LSE, SCORES,
    scale,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_tr, stride_tb,
    stride_lt, stride_lh,
    stride_sr, stride_sn,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    i_r = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    prompt_len = tl.load(PROMPT_LENS + i_r)
    pos = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = pos < prompt_len
    p_out = SCORES + i_r * stride_sr + pos * stride_sn
    q_start = tl.load(QUERY_START + i_r).to(tl.int64)
    rows = (tl.load(QUERY_START + i_r + 1).to(tl.int64) - q_start) * GROUP
    # A tile past the request's prompt (or a request not scored: prompt length 0) reads
    # nothing: a refresh sharing the forward costs no work here.
    rows = tl.where(i_n * BLOCK_N < prompt_len, rows, 0)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    safe = tl.where(m_n, pos, 0).to(tl.int64)
    blk = physical_blocks(BLOCK_TABLE, i_r, safe, m_n, stride_tr, stride_tb, CACHE_BLOCK)
    row = safe % CACHE_BLOCK
    b_acc = tl.zeros([BLOCK_N], tl.float32)
    for i_kvh in range(NUM_KV_HEADS):
        p_k = K_CACHE + blk[:, None] * stride_kb + row[:, None] * stride_kn + i_kvh * stride_kh
        b_k = tl.load(p_k + o_d[None, :] * stride_kd, mask=m_n[:, None] & m_d[None, :], other=0.0)
        for low in range(0, rows, BLOCK_M):
            o_m = low + tl.arange(0, BLOCK_M)
            m_m = o_m < rows
            token = q_start + o_m // GROUP
            head = i_kvh * GROUP + o_m % GROUP
            p_q = Q + token[:, None] * stride_qt + head[:, None] * stride_qh
            b_q = tl.load(
                p_q + o_d[None, :] * stride_qd, mask=m_m[:, None] & m_d[None, :], other=0.0
            )
            b_lse = tl.load(LSE + token * stride_lt + head * stride_lh, mask=m_m, other=0.0)
            if IEEE:
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
            else:
                b_s = tl.dot(b_q, tl.trans(b_k))
            b_p = tl.exp(b_s * scale - b_lse[:, None])
            b_p = tl.where(m_m[:, None] & m_n[None, :], b_p, 0.0)
            b_acc += tl.sum(b_p, 0)
    tl.store(p_out, tl.where(m_n, b_acc, float("-inf")))


def sink_mass(
    q: torch.Tensor,
    query_start_loc: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    prompt_lens: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    max_prompt_len: int,
) -> torch.Tensor:
    """Per request and prompt key, sum of exp(q . k * scale - lse) over the request's query
    rows and heads: [num_reqs, max_prompt_len] float32, -inf past a request's prompt.

    lse: [num_tokens, num_heads] float32, each row's log-sum-exp over all its request's keys
    (rows of requests with prompt length 0 are not read).
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[2]
    num_reqs = prompt_lens.shape[0]
    block_n = BLOCK_N
    padded = torch.empty(
        num_reqs, max(1, triton.cdiv(max_prompt_len, block_n)) * block_n,
        device=q.device, dtype=torch.float32,
    )  # fmt: skip
    if max_prompt_len == 0 or num_reqs == 0:
        return padded[:, :0]
    _sink_mass_kernel[(num_reqs, triton.cdiv(max_prompt_len, block_n))](
        q, key_cache, block_table, query_start_loc, prompt_lens, lse, padded,
        scale,
        *q.stride(), *key_cache.stride(), *block_table.stride(), *lse.stride(),
        *padded.stride(),
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        CACHE_BLOCK=key_cache.shape[1],
        BLOCK_M=BLOCK_M, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    return padded[:, :max_prompt_len]


def attention_and_sink_scores(
    q, query_start_loc, key_cache, value_cache, block_table, tiles, prompt_lens,
    max_prompt_len: int, scale: float, out: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """The tiles' rows' attention (into out) and, from its log-sum-exp, the sink scores
    (`sink_mass`): a sink layer's two passes. `tiles` cover each scored request's whole
    sequence."""
    lse = torch.empty(q.shape[0], q.shape[1], device=q.device)
    tiled_sparse_attention(
        q, key_cache, value_cache, block_table, query_start_loc, tiles, scale, out, lse=lse
    )
    return sink_mass(
        q, query_start_loc, key_cache, block_table, prompt_lens, lse, scale, max_prompt_len
    )


def sink_scores(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Summed softmax attention each prompt key receives from its request's queries.

    q:             [num_tokens, num_heads, head_dim], the tokens of request r are
                   q[cu_seqlens_q[r]:cu_seqlens_q[r + 1]]
    cu_seqlens_q:  [num_reqs + 1] int32
    key_cache:     [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    block_table:   [num_reqs, max_blocks] int32
    seq_lens:      [num_reqs] int32, keys 0..seq_len-1 form each softmax
    prompt_lens:   [num_reqs] int32, the keys that are scored
    returns:       [num_reqs, max_prompt_len] float32, -inf past a request's prompt

    A standalone launcher (tests, benchmarks): it reads the lengths on the host to lay out the
    log-sum-exp pass. The engine runs the two passes itself (vllm_focus/attention).
    """
    num_heads = q.shape[1]
    check_heads(num_heads, key_cache.shape[2])
    check_int32(
        cu_seqlens_q=cu_seqlens_q,
        block_table=block_table,
        seq_lens=seq_lens,
        prompt_lens=prompt_lens,
    )
    starts, lengths = cu_seqlens_q.tolist(), seq_lens.tolist()
    wanted = [
        (r, [(0, lengths[r])], None)
        for r, n in enumerate(prompt_lens.tolist())
        if n > 0 and starts[r + 1] > starts[r]
    ]
    max_prompt = int(prompt_lens.max()) if prompt_lens.numel() else 0
    return attention_and_sink_scores(
        q, cu_seqlens_q, key_cache, key_cache, block_table, key_tiles(wanted, starts, q.device),
        prompt_lens, max_prompt, scale, torch.empty_like(q),
    )  # fmt: skip
