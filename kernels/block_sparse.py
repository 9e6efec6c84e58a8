"""Block-sparse attention with one key-block list per query head and query block: SparseD's
attention after its pattern step (vllm_focus/attention/sparsed.py).

A request's sequence is cut into blocks of `size` positions from its start. Query head h's
block i attends the key blocks kept[h, i, :counts[h, i]] (in any order; softmax is order
free), each read whole but for the positions past the sequence's end. K/V are the forward's
fresh ones ([T, kv heads, head_dim], the request's whole sequence: SparseD keeps no cache).

One program per (query tile, query head): a tile is up to `BLOCK_M` rows of one query block
(a block longer than that spreads over several tiles). It walks its block's kept key blocks,
`BLOCK_N` positions at a time, with an online softmax in float32, and writes the normalised
output. Programs of heads that share a KV head read the same K/V rows, each from its own
list, so no program waits on another's.

Plain-torch twin, used by the CPU path at the same call site:
`vllm_focus.attention.sparsed.block_sparse_torch` (tests/test_kernel_block_sparse.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_focus.kernels.paged import check_heads, dot, online_softmax_step

BLOCK_M = 64  # query rows per program
BLOCK_N = 32  # key positions per inner step


@triton.jit
def _block_sparse_kernel(
    Q, K, V, OUT, KEPT, COUNTS,
    total, size, scale,
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_ph, stride_pi, stride_ch,
    TILES: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    i_t = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1).to(tl.int64)
    i_blk = i_t // TILES
    i_kvh = i_h // GROUP
    o_r = (i_t % TILES) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows within the query block
    row = i_blk * size + o_r
    m_r = (o_r < size) & (row < total)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    p_q = Q + row[:, None] * stride_qt + i_h * stride_qh + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)

    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    o_n = tl.arange(0, BLOCK_N)
    count = tl.load(COUNTS + i_h * stride_ch + i_blk)
    for t in range(0, count):
        j = tl.load(KEPT + i_h * stride_ph + i_blk * stride_pi + t).to(tl.int64)
        for low in range(0, size, BLOCK_N):
            within = low + o_n
            pos = j * size + within
            m_n = (within < size) & (pos < total)
            p_k = K + pos[:, None] * stride_kt + i_kvh * stride_kh + o_d[None, :] * stride_kd
            b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)
            b_s = dot(b_q, tl.trans(b_k), IEEE)
            b_s = tl.where(m_n[None, :], b_s * scale, float("-inf"))
            p_v = V + pos[:, None] * stride_vt + i_kvh * stride_vh + o_d[None, :] * stride_vd
            b_v = tl.load(p_v, mask=m_n[:, None] & m_d[None, :], other=0.0)
            b_max, b_sum, b_acc = online_softmax_step(b_s, b_v, b_max, b_sum, b_acc, IEEE)

    b_out = b_acc / tl.where(b_sum > 0, b_sum, 1.0)[:, None]
    p_o = OUT + row[:, None] * stride_ot + i_h * stride_oh + o_d[None, :] * stride_od
    tl.store(p_o, b_out.to(OUT.dtype.element_ty), mask=m_r[:, None] & m_d[None, :])


def kept_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[H, n, n] bool block mask -> (kept [H, n, n] int32: each (head, query block)'s kept key
    blocks first, ascending, then the others; counts [H, n] int32). On the mask's device."""
    counts = mask.sum(-1, dtype=torch.int32)
    kept = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    return kept.contiguous(), counts.contiguous()


def block_sparse_attention(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    size: int,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """One request's block-sparse attention into out.

    q:     [T, num_heads, head_dim], the request's whole sequence (any strides)
    key:   [T, num_kv_heads, head_dim], value the same shape
    mask:  [num_heads, n, n] bool, n = ceil(T / size): head h's query block i reads key
           block j where mask[h, i, j]; every (head, query block) keeps at least one
    out:   [T, num_heads, head_dim]
    """
    total, num_heads, head_dim = q.shape
    if key.shape != value.shape or key.shape[0] != total or key.shape[2] != head_dim:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} must both be "
            f"[{total}, kv heads, {head_dim}] for q {tuple(q.shape)}"
        )
    check_heads(num_heads, key.shape[1])
    blocks = -(-total // size)
    if mask.shape != (num_heads, blocks, blocks):
        raise ValueError(
            f"mask {tuple(mask.shape)} must be [{num_heads}, {blocks}, {blocks}] for {total} "
            f"positions in blocks of {size}"
        )
    if total == 0:
        return out
    kept, counts = kept_lists(mask)
    block_m = min(BLOCK_M, max(16, triton.next_power_of_2(size)))
    tiles = triton.cdiv(size, block_m)
    grid = (blocks * tiles, num_heads)
    _block_sparse_kernel[grid](
        q, key, value, out, kept, counts,
        total, size, scale,
        *q.stride(), *key.stride(), *value.stride(), *out.stride(),
        kept.stride(0), kept.stride(1), counts.stride(0),
        TILES=tiles, GROUP=num_heads // key.shape[1], HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=BLOCK_N,
        IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    return out
