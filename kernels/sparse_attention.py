"""Tiled attention of each request's query tokens over a described set of keys in a paged cache.

Focus's sparse layers attend, per request, the kept prompt blocks, the sinks and the response
range. Those key sets are described, not listed (`KeyTiles`): a *tile* is up to `TILE_N`
consecutive positions `[start, end)`, or up to `TILE_N` entries of a small point list (the
sinks; an entry of -1 is skipped). A request's tiles are cut into *splits* of at most
`TILES_PER_SPLIT` tiles. One program per (split, KV head, query tile) loads each key tile of
its split once for a tile of `BLOCK_M` rows — the request's query tokens x the query heads
that share the KV head, flattened — keeps an online softmax in float32 and writes its partial
result (unnormalised output, running max, running sum). A log-sum-exp merge over the splits
of each request then gives the output. Long key sets therefore spread over many programs
(split-K) however few query tokens a Focus step has.

Plain-torch twin: `kernels.reference.tiled_sparse_attention_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_focus.kernels.paged import (
    check_heads,
    check_int32,
    dot,
    online_softmax_step,
    physical_blocks,
)

TILE_N = 64  # positions per key tile
TILES_PER_SPLIT = 8  # key tiles per program: 512 keys
BLOCK_M = 32  # rows (query token x query head of a KV head) per program


@dataclass
class KeyTiles:
    """The keys each request of a forward attends, as tiles (see the module docstring).

    splits: [S, 5] int32 (request, first tile, end tile, slot, row base): slot numbers the
            splits of one request from 0; row base is where the request's rows start in
            `rows`.
    tiles:  [NT, 3] int32 (start, end, point offset): a range [start, end) of positions when
            the offset is -1, else points[offset : offset + end - start].
    points: [NP] int32 key positions, -1 for none.
    rows:   [N] int64 batch rows of the requests' query tokens, request after request.
    num_slots: the most splits of any one request.
    max_query_len: the most query tokens of any one request.
    """

    splits: torch.Tensor
    tiles: torch.Tensor
    points: torch.Tensor
    rows: torch.Tensor
    num_slots: int
    max_query_len: int


@triton.jit
def _tiled_sparse_kernel(
    Q, K_CACHE, V_CACHE, ACC, MAX, SUM,
    SPLITS, TILES, POINTS, QUERY_START, BLOCK_TABLE,
    scale,
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_as, stride_an, stride_ah,
    stride_ms, stride_mn,
    stride_tr, stride_tb,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    i_s = tl.program_id(0).to(tl.int64)
    i_kvh = tl.program_id(1).to(tl.int64)
    i_m = tl.program_id(2).to(tl.int64)
    i_req = tl.load(SPLITS + i_s * 5).to(tl.int64)
    t_begin = tl.load(SPLITS + i_s * 5 + 1)
    t_end = tl.load(SPLITS + i_s * 5 + 2)
    slot = tl.load(SPLITS + i_s * 5 + 3).to(tl.int64)
    row_base = tl.load(SPLITS + i_s * 5 + 4).to(tl.int64)
    q_start = tl.load(QUERY_START + i_req).to(tl.int64)
    q_len = tl.load(QUERY_START + i_req + 1).to(tl.int64) - q_start

    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < q_len * GROUP
    token = o_m // GROUP
    head = i_kvh * GROUP + o_m % GROUP
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < HEAD_DIM
    p_q = Q + (q_start + token)[:, None] * stride_qt + head[:, None] * stride_qh
    b_q = tl.load(p_q + o_d[None, :] * stride_qd, mask=m_m[:, None] & m_d[None, :], other=0.0)

    b_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    b_sum = tl.zeros([BLOCK_M], tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    o_n = tl.arange(0, BLOCK_N)
    for t in range(t_begin, t_end):
        start = tl.load(TILES + t * 3)
        end = tl.load(TILES + t * 3 + 1)
        point = tl.load(TILES + t * 3 + 2)
        m_n = o_n < end - start
        is_point = (o_n * 0 + point) >= 0
        listed = tl.load(POINTS + tl.maximum(point, 0) + o_n, mask=m_n & is_point, other=-1)
        pos = tl.where(is_point, listed, start + o_n)
        m_n = m_n & (pos >= 0)
        pos = tl.where(m_n, pos, 0).to(tl.int64)
        blk = physical_blocks(BLOCK_TABLE, i_req, pos, m_n, stride_tr, stride_tb, CACHE_BLOCK)
        row = pos % CACHE_BLOCK
        p_k = K_CACHE + blk[:, None] * stride_kb + row[:, None] * stride_kn + i_kvh * stride_kh
        b_k = tl.load(p_k + o_d[None, :] * stride_kd, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_s = dot(b_q, tl.trans(b_k), IEEE)
        b_s = tl.where(m_n[None, :], b_s * scale, float("-inf"))
        p_v = V_CACHE + blk[:, None] * stride_vb + row[:, None] * stride_vn + i_kvh * stride_vh
        b_v = tl.load(p_v + o_d[None, :] * stride_vd, mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_max, b_sum, b_acc = online_softmax_step(b_s, b_v, b_max, b_sum, b_acc, IEEE)

    out_row = row_base + token
    p_a = ACC + slot * stride_as + out_row[:, None] * stride_an + head[:, None] * stride_ah
    tl.store(p_a + o_d[None, :], b_acc, mask=m_m[:, None] & m_d[None, :])
    p_stat = slot * stride_ms + out_row * stride_mn + head
    tl.store(MAX + p_stat, b_max, mask=m_m)
    tl.store(SUM + p_stat, b_sum, mask=m_m)


def tiled_sparse_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    keys: KeyTiles,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of the rows `keys.rows` of q over their request's key tiles, into out.

    q:               [num_tokens, num_heads, head_dim]
    key_cache:       [num_blocks, block_size, num_kv_heads, head_dim] (any strides)
    value_cache:     same shape as key_cache
    block_table:     [num_reqs, max_blocks] int32
    query_start_loc: [num_reqs + 1] int32, a request's query tokens are rows
                     query_start_loc[r] : query_start_loc[r + 1] of q
    lse:             [num_tokens, num_heads] float32, optional: also the log-sum-exp of
                     each (row, head)'s scores over its keys (the sink scores read it)
    Rows of q not in `keys.rows` are left as they are in out (and in lse). Every request
    with a split has at least one key.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[2]
    if value_cache.shape != key_cache.shape:
        raise ValueError(
            f"value_cache {tuple(value_cache.shape)} != key_cache {tuple(key_cache.shape)}"
        )
    if key_cache.shape[3] != head_dim:
        raise ValueError(
            f"head_dim of q ({head_dim}) and of the cache ({key_cache.shape[3]}) differ"
        )
    check_heads(num_heads, num_kv_heads)
    check_int32(
        block_table=block_table,
        query_start_loc=query_start_loc,
        splits=keys.splits,
        tiles=keys.tiles,
        points=keys.points,
    )
    num_rows = keys.rows.numel()
    if num_rows == 0:
        return out
    group = num_heads // num_kv_heads
    slots = keys.num_slots
    # A (row, slot) no split writes keeps max -inf, sum 0 and output 0: it weighs nothing.
    acc = torch.zeros(slots, num_rows, num_heads, head_dim, dtype=torch.float32, device=q.device)
    stats = torch.zeros(2, slots, num_rows, num_heads, device=q.device)
    stats[0] = float("-inf")
    grid = (keys.splits.shape[0], num_kv_heads, triton.cdiv(keys.max_query_len * group, BLOCK_M))
    _tiled_sparse_kernel[grid](
        q, key_cache, value_cache, acc, stats[0], stats[1],
        keys.splits, keys.tiles, keys.points, query_start_loc, block_table,
        scale,
        *q.stride(), *key_cache.stride(), *value_cache.stride(), *acc.stride()[:3],
        *stats.stride()[1:3],
        *block_table.stride(),
        GROUP=group, HEAD_DIM=head_dim, CACHE_BLOCK=key_cache.shape[1],
        BLOCK_M=BLOCK_M, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=TILE_N,
        IEEE=q.dtype == torch.float32,
    )  # fmt: skip
    merged, row_lse = merge_splits(acc, stats[0], stats[1])
    out[keys.rows] = merged.to(out.dtype)
    if lse is not None:
        lse[keys.rows] = row_lse
    return out


def merge_splits(acc: torch.Tensor, maxes: torch.Tensor, sums: torch.Tensor):
    """Combine the splits' partial results ([slots, rows, heads, (head_dim)]) by log-sum-exp;
    a slot a row has no split for holds max -inf and sum 0 and weighs nothing. Returns the
    output [rows, heads, head_dim] and the log-sum-exp [rows, heads]."""
    top = maxes.max(0).values
    weight = torch.where(maxes == float("-inf"), 0.0, torch.exp(maxes - top))
    total = (weight * sums).sum(0)
    merged = torch.einsum("srh,srhd->rhd", weight, acc) / total[..., None]
    return merged, top + torch.log(total)


def key_tiles(
    per_request: list[tuple[int, list[tuple[int, int]], list[int] | None]],
    query_start_loc: list[int],
    device: torch.device | str,
) -> KeyTiles:
    """KeyTiles from host lists: per request (index, ranges [(start, end)], points or None).

    The engine builds its tiles on the device (vllm_focus/attention/triton_path.py); this host
    version serves tests and benchmarks with the same layout.
    """
    splits, tiles, points, rows = [], [], [], []
    num_slots = max_query = 0
    for req, ranges, listed in per_request:
        first = len(tiles)
        for start, end in ranges:
            for low in range(start, end, TILE_N):
                tiles.append((low, min(end, low + TILE_N), -1))
        if listed:
            for low in range(0, len(listed), TILE_N):
                chunk = listed[low : low + TILE_N]
                tiles.append((0, len(chunk), len(points)))
                points.extend(chunk)
        q_start, q_end = query_start_loc[req], query_start_loc[req + 1]
        base = len(rows)
        rows.extend(range(q_start, q_end))
        max_query = max(max_query, q_end - q_start)
        slot = 0
        for low in range(first, len(tiles), TILES_PER_SPLIT):
            splits.append((req, low, min(len(tiles), low + TILES_PER_SPLIT), slot, base))
            slot += 1
        num_slots = max(num_slots, slot)
    as_int = dict(dtype=torch.int32, device=device)
    return KeyTiles(
        splits=torch.tensor(splits, **as_int).reshape(-1, 5),
        tiles=torch.tensor(tiles, **as_int).reshape(-1, 3),
        points=torch.tensor(points or [-1], **as_int),
        rows=torch.tensor(rows, dtype=torch.int64, device=device),
        num_slots=max(num_slots, 1),
        max_query_len=max_query,
    )
