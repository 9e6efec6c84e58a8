"""The FOCUS backend's CPU path: attention read in place from the paged KV cache.

The torch twins (reference.py) gather a request's keys row by row into a new tensor before
attending. On a CPU, where a within-block step is bound by memory traffic, that strided copy
plus the second read costs several times the attention itself. Here a step with few query
tokens reads the request's rows where they lie: vLLM's CPU cache puts a block's rows one
after another ([blocks, block_size, kv_heads, K|V]), so when a request's blocks lie within a
compact range of the cache (consecutive for a fresh request, often the same blocks reversed
for a later one) that range is one strided [rows, kv_heads, head_dim] tensor. A dense layer
attends over it in place, rows outside the request's set masked (attention does not care about
key order); a sparse key set copies only its rows. The attention is two matmuls per KV head.
The same pass returns, when asked, the softmax mass each prompt key receives — the sink scores
of Focus's last dense layer — so that layer's keys are read once, not twice.

Requests with many query tokens (a block-start refresh) go through the twin's gather and
torch's fused attention, which amortises the gather. Results equal the twins' (tests hold
them to it).

In the engine the sparse layers and the sink layer take the compiled C kernel
(`kernels.cpu_compiled`, the same arguments and results) where it runs; `tiled_attention_cpu`
here is its torch counterpart, used where it does not (more than 256 query tokens in a
request, sizes it does not take, no C compiler).
"""

from __future__ import annotations

import torch

from vllm_focus.kernels.reference import _gather, attend_gathered

# Above this many query tokens a request's attention goes through the gathered path.
FEW_QUERIES = 256
# Score elements (query heads x query tokens x keys) per chunk of query tokens.
MAX_SCORES = 1 << 25


def _span(block_table: torch.Tensor, req: int, positions: torch.Tensor, block_size: int):
    """(low, high, row of each position) when the physical blocks holding `positions` lie
    within a compact range [low, high) of the cache (in any order: a fresh request's blocks
    are consecutive, a later one's often the same blocks reversed), else None."""
    count = int(positions.max()) // block_size + 1
    physical = block_table[req, :count].long()
    low, high = int(physical.min()), int(physical.max()) + 1
    if high - low > 2 * count:
        return None
    return (
        low,
        high,
        (physical[positions // block_size] - low) * block_size + positions % block_size,
    )


def _span_rows(cache: torch.Tensor, low: int, high: int) -> torch.Tensor | None:
    """Blocks [low, high) as [rows, kv_heads, head_dim]: a view of the cache where a block's
    rows follow one another and the next block's follow them (vLLM's block-major layout);
    None where they do not (CPU_ATTN's head-major layout): the caller gathers rows."""
    blocks = cache[low:high]
    if blocks.shape[0] > 1 and blocks.stride(0) != blocks.shape[1] * blocks.stride(1):
        return None
    return blocks.reshape((high - low) * cache.shape[1], *cache.shape[2:])


def _rows_of(cache, block_table, req, positions, span) -> torch.Tensor:
    """The rows of `positions` in their order: a view when they are one run, else a copy."""
    rows = None if span is None else _span_rows(cache, span[0], span[1])
    if rows is None:
        return _gather(cache, block_table, req, positions)
    row_of = span[2]
    first = int(row_of[0])
    if torch.equal(row_of, torch.arange(first, first + row_of.numel(), device=row_of.device)):
        return rows[first : first + row_of.numel()]
    return rows[row_of]


def request_keys(
    cache: torch.Tensor, block_table: torch.Tensor, req: int, positions: torch.Tensor
) -> torch.Tensor:
    """[n, kv_heads, head_dim] rows of `positions` (in their order) from a cache viewed as
    [blocks, block_size, kv_heads, head_dim]: a view when they are one run of rows, else a
    copy of just those rows."""
    span = _span(block_table, req, positions, cache.shape[1])
    return _rows_of(cache, block_table, req, positions, span)


def _attended_rows(key_cache, value_cache, block_table, req, positions, span):
    """(keys, values, position of each row or -1) over which to attend `positions`: for a
    dense-enough set, the whole compact span of the request's blocks in place (rows outside
    the set masked); otherwise copies of exactly the set's rows."""
    dense = span is not None and 2 * positions.numel() >= (span[1] - span[0]) * key_cache.shape[1]
    keys = _span_rows(key_cache, span[0], span[1]) if dense else None
    values = _span_rows(value_cache, span[0], span[1]) if keys is not None else None
    if keys is not None and values is not None:
        row_of = span[2]
        owner = torch.full((keys.shape[0],), -1, dtype=torch.long, device=positions.device)
        owner[row_of] = positions
        return keys, values, owner
    return _exact_rows(key_cache, value_cache, block_table, req, positions, span)


def _exact_rows(key_cache, value_cache, block_table, req, positions, span):
    """(keys, values, positions): exactly the rows of `positions`, views where they allow."""
    keys = _rows_of(key_cache, block_table, req, positions, span)
    values = _rows_of(value_cache, block_table, req, positions, span)
    return keys, values, positions


def _attend(q, tokens, keys, values, owner, scale, result, want_mass: bool):
    """Attention of query rows `tokens` over rows keys/values [m, Hkv, D] (rows whose owner is
    -1 masked), written into `result`; returns the softmax mass per row if `want_mass`."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    # [Hkv, m, D]: KV head k's rows, strided views of the cache where it allows.
    keys, values = keys.transpose(0, 1).float(), values.transpose(0, 1).float()
    outside = owner < 0
    mass = torch.zeros(owner.numel(), device=q.device) if want_mass else None
    chunk = max(1, MAX_SCORES // (num_heads * owner.numel()))
    for part in tokens.split(chunk):
        t = part.numel()
        # [Hkv, group * t, D]: query head h = kv_head * group + g reads KV head kv_head.
        grouped = q[part].float().reshape(t, num_kv_heads, group, head_dim)
        grouped = grouped.permute(1, 2, 0, 3).reshape(num_kv_heads, group * t, head_dim)
        scores = torch.matmul(grouped, keys.transpose(1, 2)) * scale
        probs = scores.masked_fill_(outside, float("-inf")).softmax(-1)
        if mass is not None:
            mass += probs.sum((0, 1))
        attended = torch.matmul(probs, values)  # [Hkv, group * t, D]
        attended = attended.reshape(num_kv_heads, group, t, head_dim).permute(2, 0, 1, 3)
        result[part] = attended.reshape(t, num_heads, head_dim).to(result.dtype)
    return mass


def empty_sink_scores(sink_prompt_lens: list[int], device=None) -> torch.Tensor:
    """[R, max prompt] float32: 0 over each request's prompt (a request without queries puts
    no mass anywhere), -inf past it."""
    lengths = torch.tensor(sink_prompt_lens, device=device)
    sinks = torch.full((len(sink_prompt_lens), int(lengths.max())), float("-inf"), device=device)
    sinks[torch.arange(sinks.shape[1], device=device) < lengths[:, None]] = 0.0
    return sinks


def paged_attention_cpu(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_req: torch.Tensor,
    key_positions: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    sink_prompt_lens: list[int] | None = None,
    requests: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sparse_paged_attention_ref`'s arguments and result, plus sink scores; with `requests`,
    only those requests' rows are computed (the others' rows of `out` are left as they are).

    With `sink_prompt_lens` (per request; 0 = not wanted), also returns [R, max prompt] float32:
    for each wanted request, the softmax mass its query tokens put on each prompt key, summed
    over heads and queries (`sink_scores_ref` when the request's key set is every position);
    -inf elsewhere.
    """
    result = torch.empty_like(q) if out is None else out
    sinks = None
    if sink_prompt_lens is not None:
        sinks = empty_sink_scores(sink_prompt_lens, q.device)
    present = torch.unique(query_req).tolist()
    if requests is not None:
        chosen = set(requests)
        present = [r for r in present if r in chosen]
    for req in present:
        tokens = torch.nonzero(query_req == req).flatten()
        positions = key_positions[cu_seqlens_k[req] : cu_seqlens_k[req + 1]].long()
        prompt_len = sink_prompt_lens[req] if sink_prompt_lens is not None else 0
        if tokens.numel() > FEW_QUERIES and not prompt_len:
            result[tokens] = attend_gathered(
                q[tokens], key_cache, value_cache, block_table, req, positions, scale
            ).to(result.dtype)
            continue
        span = _span(block_table, req, positions, key_cache.shape[1])
        keys, values, owner = _attended_rows(
            key_cache, value_cache, block_table, req, positions, span
        )
        mass = _attend(q, tokens, keys, values, owner, scale, result, bool(prompt_len))
        if owner.numel() != positions.numel() and not torch.isfinite(result[tokens]).all():
            # A masked row of the span (another request's, or not yet written) holds a value
            # that is not finite, and 0 x inf poisons the sum: attend over exact rows instead.
            keys, values, owner = _exact_rows(
                key_cache, value_cache, block_table, req, positions, span
            )
            mass = _attend(q, tokens, keys, values, owner, scale, result, bool(prompt_len))
        if mass is not None:
            in_prompt = (owner >= 0) & (owner < prompt_len)
            sinks[req, owner[in_prompt]] = mass[in_prompt]
    return result, sinks


def prompt_block_means(
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    req: int,
    prompt_len: int,
    prompt_block_size: int,
) -> torch.Tensor:
    """[prompt blocks, kv_heads, head_dim] float32: the mean prompt key of each block of
    `prompt_block_size` positions (the last one partial), read in place from the cache."""
    positions = torch.arange(prompt_len, device=key_cache.device)
    rows = request_keys(key_cache, block_table, req, positions).float()  # [P, Hkv, D]
    return means_of_blocks(rows, prompt_block_size)


def means_of_blocks(rows: torch.Tensor, size: int) -> torch.Tensor:
    """[blocks, ...]: the mean of each run of `size` rows of `rows` [P, ...] (the last run
    partial)."""
    length = rows.shape[0]
    num_blocks = -(-length // size)
    block_of = torch.arange(length, device=rows.device) // size
    sums = torch.zeros(num_blocks, *rows.shape[1:], device=rows.device)
    sums.index_add_(0, block_of, rows)
    counts = torch.bincount(block_of, minlength=num_blocks).float()
    return sums / counts.reshape(-1, *([1] * (rows.dim() - 1)))


def block_scores_from_means(q: torch.Tensor, means: torch.Tensor, scale: float) -> torch.Tensor:
    """[prompt blocks] float32: sum over the query tokens q [t, H, D] and heads of q . the
    block's mean key (query head h reads KV head h // group), as `prompt_block_scores_ref`."""
    num_kv_heads, head_dim = means.shape[1], means.shape[2]
    summed = q.float().sum(0).reshape(num_kv_heads, -1, head_dim).sum(1)  # [Hkv, D]
    return torch.einsum("bkd,kd->b", means, summed) * scale


def request_tile_spans(tiles) -> dict[int, list[int]]:
    """Per request with a key set, [first tile, end tile) of its tiles, from the splits (a
    request's splits are consecutive), in the splits' order."""
    spans: dict[int, list[int]] = {}
    for req, low, high, _slot, _base in tiles.splits.tolist():
        span = spans.setdefault(req, [low, high])
        span[0], span[1] = min(span[0], low), max(span[1], high)
    return spans


def tiled_attention_cpu(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    tiles,
    query_start_loc_cpu: list[int],
    scale: float,
    out: torch.Tensor,
    sink_prompt_lens: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`tiled_sparse_attention`'s result on the CPU.

    A request's key set (the tiles of its splits, `kernels.sparse_attention.KeyTiles`) is read
    as whole cache blocks for its ranges (kept prompt blocks, the response), positions outside
    the ranges masked, plus rows for its point tiles (the sinks). In CPU_ATTN's layout a cache
    block holds, per KV head, K as one [head_dim, block_size] run and V as one [block_size,
    head_dim] run, so gathering blocks copies whole runs; requests are taken one at a time so
    that what one gathers stays in the CPU's caches while it is attended (measured here: 4x
    faster than gathering rows for all requests at once). Where the ranges and points need
    vectors per tile, they are built for all requests at once.

    With `sink_prompt_lens` (per request of the batch), also returns [R, max prompt] float32:
    the softmax mass each request's query tokens put on each of its prompt keys, summed over
    heads and queries (`paged_attention_cpu`'s sink scores; -inf past a prompt)."""
    from vllm_focus.kernels.sparse_attention import TILE_N

    spans = request_tile_spans(tiles)
    requests = list(spans)
    block_size = key_cache.shape[1]
    table = tiles.tiles.long()
    start, end, offset = table[:, :1], table[:, 1:2], table[:, 2:]
    is_range = offset < 0
    # Range tiles: the cache blocks each covers, and which of their positions are in range.
    cover = -(-TILE_N // block_size) + 1
    logical = start // block_size + torch.arange(cover)  # [NT, cover]
    at = logical[..., None] * block_size + torch.arange(block_size)  # [NT, cover, bs]
    in_range = (at >= start[..., None]) & (at < end[..., None]) & is_range[..., None]
    # Point tiles: their positions (-1 where none).
    lane = torch.arange(TILE_N)
    points = tiles.points.long()
    if points.numel() == 0:  # no point tiles then; index a placeholder
        points = torch.full((1,), -1, dtype=torch.long)
    pointed = points[(offset + lane).clamp(0, points.numel() - 1)]
    pointed = torch.where(~is_range & (lane < end - start), pointed, -1)  # [NT, TILE_N]

    sinks = None if sink_prompt_lens is None else empty_sink_scores(sink_prompt_lens)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    # [blocks, kv_heads, head_dim, block_size] and [blocks, kv_heads, block_size, head_dim]:
    # in CPU_ATTN's layout each (block, head) of these is one run of memory.
    key_runs, value_runs = key_cache.permute(0, 2, 3, 1), value_cache.permute(0, 2, 1, 3)
    for req in requests:
        first, stop = spans[req]
        used = in_range[first:stop].any(-1)  # [tiles, cover]
        blocks = logical[first:stop][used]
        mask = in_range[first:stop][used].flatten()  # [blocks x bs]
        positions = at[first:stop][used].flatten()
        physical = block_table[req, blocks].long()
        count = blocks.numel()
        keys = key_runs.index_select(0, physical).float()  # [n, Hkv, D, bs]
        keys = keys.permute(1, 2, 0, 3).reshape(num_kv_heads, head_dim, count * block_size)
        values = value_runs.index_select(0, physical).float()  # [n, Hkv, bs, D]
        values = values.permute(1, 0, 2, 3).reshape(num_kv_heads, count * block_size, head_dim)
        extra = pointed[first:stop].flatten()
        extra = extra[extra >= 0]
        if extra.numel():
            cache_block = block_table[req, extra // block_size].long()
            rows = extra % block_size
            keys = torch.cat([keys, key_cache[cache_block, rows].float().permute(1, 2, 0)], 2)
            values = torch.cat([values, value_cache[cache_block, rows].float().transpose(0, 1)], 1)
            mask = torch.cat([mask, torch.ones(extra.numel(), dtype=torch.bool)])
            positions = torch.cat([positions, extra])
        low, high = query_start_loc_cpu[req], query_start_loc_cpu[req + 1]
        t = high - low
        grouped = q[low:high].float().reshape(t, num_kv_heads, group, head_dim)
        grouped = grouped.permute(1, 2, 0, 3).reshape(num_kv_heads, group * t, head_dim)
        scores = torch.matmul(grouped, keys) * scale  # [Hkv, g*t, K]
        probs = scores.masked_fill_(~mask, float("-inf")).softmax(-1)
        if sinks is not None:
            hit = mask & (positions < sink_prompt_lens[req])
            # a position listed twice (a sink inside a kept block) holds both shares
            sinks[req].index_put_((positions[hit],), probs.sum((0, 1))[hit], accumulate=True)
        attended = torch.matmul(probs, values).reshape(num_kv_heads, group, t, head_dim)
        out[low:high] = attended.permute(2, 0, 1, 3).reshape(t, num_heads, head_dim).to(out.dtype)
    return out, sinks
