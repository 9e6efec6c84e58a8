"""Focus's selection at a sparse layer, batched over the step's sparse requests (torch ops on
whatever device the cache is on: the Triton path's and the CPU path's).

Block scores come from block means cached per version of a request's prompt K/V (one matmul
for all sparse requests), the kept blocks from one stable sort, and the key set — kept blocks,
sinks not already in one, the response range — is described as `KeyTiles`, which
`kernels.sparse_attention.tiled_sparse_attention` (CUDA) and `kernels.cpu.tiled_attention_cpu`
read. Sizes (kept-block counts, sink counts, tiles per request) are known on the host from the
plans and lengths and built once per step; values (which blocks, which sinks) stay on the
device. The prompt keys attended (a metric) are summed on the device and read once after the
forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_focus.attention.means import BlockMeansCache
from vllm_focus.kernels.cpu import means_of_blocks
from vllm_focus.kernels.sparse_attention import TILE_N, TILES_PER_SPLIT, KeyTiles


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Per row, the column indices best first; ties go to the lower index and -inf (past a
    prompt) goes last, as `policy.top_indices` does."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def top_ranked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`rank(scores)[:, :k]` without sorting whole rows: a top-k finds each row's k-th
    value, the columns above it and the lowest-index ones equal to it are the first k of
    the stable order, and a stable sort of those k (in column order) orders them."""
    k = min(k, scores.shape[1])
    if k == 0:
        return torch.empty((scores.shape[0], 0), dtype=torch.int64, device=scores.device)
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    missing = k - above.sum(1, keepdim=True)
    chosen = above | (tied & (tied.cumsum(1) <= missing))
    columns = chosen.nonzero()[:, 1].view(scores.shape[0], k)  # row-major: ascending columns
    order = torch.sort(scores.gather(1, columns), dim=1, descending=True, stable=True).indices
    return columns.gather(1, order)


def whole_sequences(meta, wanted: list[int], device) -> tuple[KeyTiles, list[int]]:
    """The wanted requests' key sets as whole-sequence tiles, and per request of the batch
    its prompt length if wanted else 0 (None in a step without Focus requests); built once
    per forward."""
    from vllm_focus.kernels.sparse_attention import key_tiles

    key = ("whole", tuple(wanted))
    cached = meta.step_cache.get(key)
    if cached is None:
        ranges = [(r, [(0, meta.seq_lens_cpu[r])], None) for r in wanted]
        chosen = set(wanted)
        lengths = None
        if meta.focus is not None:  # None: a step without Focus requests (no sink scores)
            lengths = [n if r in chosen else 0 for r, n in enumerate(meta.focus.prompt_lens)]
        cached = (key_tiles(ranges, meta.query_start_loc_cpu, device), lengths)
        meta.step_cache[key] = cached
    return cached


def keep_sinks(batch, wanted: list[int], scores: torch.Tensor) -> None:
    """Each wanted request keeps its top `num_sinks` prompt keys by `scores` [R, width] (the
    softmax mass per prompt key, summed over heads and ranks), best first."""
    order = top_ranked(scores[wanted], max(batch.plans[r].num_sinks for r in wanted))
    for row, r in enumerate(wanted):
        batch.sinks[r] = order[row, : min(batch.plans[r].num_sinks, batch.prompt_lens[r])]


@dataclass
class _SparseLayout:
    """Host-known structure of the sparse requests' key tiles, shared by every sparse layer
    of a step with the same sparse requests (only the kept blocks and sinks change)."""

    requests: list[int]
    kept_row: torch.Tensor  # [sum k] row (sparse request) of each kept block
    kept_col: torch.Tensor  # [sum k] its rank in that row's sorted scores
    valid_blocks: torch.Tensor  # [R, max blocks] bool, blocks that exist in the prompt
    tile_kept: torch.Tensor  # [tiles from kept blocks] index into the kept blocks
    tile_part: torch.Tensor  # [same] which TILE_N piece of the block
    tile_index: torch.Tensor  # [same] the tile's row in `tiles`
    tile_block: torch.Tensor  # [same] prompt block size of the block's request
    tile_prompt: torch.Tensor  # [same] prompt length of the block's request
    tiles: torch.Tensor  # [NT, 3] int32: ranges of the response; point tiles of the sinks
    sink_row: torch.Tensor  # [sum sinks] row of each sink
    sink_sizes: torch.Tensor  # [sum sinks] prompt block size of its request
    splits: torch.Tensor  # [S, 5] int32
    rows: torch.Tensor  # [N] int64
    num_slots: int
    max_query_len: int


def sparse_layout(meta, requests: list[int]) -> _SparseLayout:
    key = ("sparse", tuple(requests))
    cached = meta.step_cache.get(key)
    if cached is not None:
        return cached
    batch = meta.focus
    device = meta.query_start_loc.device
    starts = meta.query_start_loc_cpu
    kept_row, kept_col, valid = [], [], []
    tile_kept, tile_part, tile_index, tile_block, tile_prompt = [], [], [], [], []
    tiles, splits, rows, sink_row, sink_sizes = [], [], [], [], []
    num_slots = max_query = 0
    max_blocks = max(batch.plans[r].prompt_blocks(batch.prompt_lens[r]) for r in requests)
    for row, r in enumerate(requests):
        plan, prompt_len = batch.plans[r], batch.prompt_lens[r]
        size, blocks = plan.prompt_block_size, plan.prompt_blocks(prompt_len)
        valid.append([b < blocks for b in range(max_blocks)])
        first = len(tiles)
        pieces = -(-size // TILE_N)
        for rank in range(plan.kept_blocks(prompt_len)):
            for part in range(pieces):
                tile_kept.append(len(kept_row))
                tile_part.append(part)
                tile_index.append(len(tiles))
                tile_block.append(size)
                tile_prompt.append(prompt_len)
                tiles.append((0, 0, -1))  # filled per layer
            kept_row.append(row)
            kept_col.append(rank)
        for low in range(prompt_len, meta.seq_lens_cpu[r], TILE_N):
            tiles.append((low, min(meta.seq_lens_cpu[r], low + TILE_N), -1))
        count = len(batch.sinks[r]) if batch.sinks[r] is not None else 0
        for low in range(0, count, TILE_N):
            tiles.append((0, min(count, low + TILE_N) - low, len(sink_row) + low))
        sink_row.extend([row] * count)
        sink_sizes.extend([size] * count)
        base = len(rows)
        rows.extend(range(starts[r], starts[r + 1]))
        max_query = max(max_query, starts[r + 1] - starts[r])
        slot = 0
        for low in range(first, len(tiles), TILES_PER_SPLIT):
            splits.append((r, low, min(len(tiles), low + TILES_PER_SPLIT), slot, base))
            slot += 1
        num_slots = max(num_slots, slot)

    def on_device(values, dtype=torch.int64):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    layout = _SparseLayout(
        requests=requests,
        kept_row=on_device(kept_row),
        kept_col=on_device(kept_col),
        valid_blocks=on_device(valid, torch.bool),
        tile_kept=on_device(tile_kept),
        tile_part=on_device(tile_part),
        tile_index=on_device(tile_index),
        tile_block=on_device(tile_block),
        tile_prompt=on_device(tile_prompt),
        tiles=on_device(tiles, torch.int32).reshape(-1, 3),
        sink_row=on_device(sink_row),
        sink_sizes=on_device(sink_sizes),
        splits=on_device(splits, torch.int32).reshape(-1, 5),
        rows=on_device(rows),
        num_slots=num_slots,
        max_query_len=max_query,
    )
    meta.step_cache[key] = layout
    return layout


def block_means(key_cache, block_table, req: int, prompt_len: int, size: int) -> torch.Tensor:
    """[prompt blocks, kv_heads, head_dim] float32: each prompt block's mean key (the last
    block partial), gathered on the device through the block table."""
    positions = torch.arange(prompt_len, device=key_cache.device)
    cache_block = key_cache.shape[1]
    physical = block_table[req, positions // cache_block].long()
    return means_of_blocks(key_cache[physical, positions % cache_block].float(), size)


class SparseSelector:
    """One layer's Focus selection on the device, with its cache of block means (per request
    and version of its prompt K/V, and stacked for the step's sparse requests)."""

    def __init__(self) -> None:
        self._means = BlockMeansCache(block_means)
        self._stacked: tuple[tuple, torch.Tensor] | None = None

    def _stacked_means(self, keys, meta, requests: list[int]) -> torch.Tensor:
        """[R, max blocks, kv_heads, head_dim]: the sparse requests' block means, zero-padded;
        rebuilt only when a request's prompt K/V changed or the set of requests did."""
        batch = meta.focus
        ident = tuple((*batch.prompt_keys[r], batch.plans[r].prompt_block_size) for r in requests)
        if self._stacked is not None and self._stacked[0] == ident:
            return self._stacked[1]
        self._means.forget_finished(batch)
        per_request = [self._means.get(keys, meta, r) for r in requests]
        stacked = torch.nn.utils.rnn.pad_sequence(per_request, batch_first=True)
        self._stacked = (ident, stacked)
        return stacked

    def key_tiles(self, q, keys, scale, meta, requests: list[int], all_reduce) -> KeyTiles:
        """The sparse requests' key sets at this layer: kept blocks by their F queries' block
        scores, the sinks not inside a kept block, the response range."""
        batch = meta.focus
        layout = sparse_layout(meta, requests)
        means = self._stacked_means(keys, meta, requests)
        # Block score = sum over F's tokens and query heads of q . mean key: linear in q, so
        # sum F's queries per request and KV head first.
        num_kv_heads, head_dim = means.shape[2], means.shape[3]
        member = torch.full((len(batch.plans),), -1, dtype=torch.int64)
        member[requests] = torch.arange(len(requests))
        owner = member.to(q.device, non_blocking=True)[batch.focus_req.long()]
        picked = owner >= 0
        grouped = (
            q[batch.focus_rows]
            .float()
            .reshape(-1, num_kv_heads, q.shape[1] // num_kv_heads, head_dim)
        )
        summed = torch.zeros(len(requests), num_kv_heads, head_dim, device=q.device)
        summed.index_add_(0, owner.clamp_min(0), grouped.sum(2) * picked[:, None, None])
        flat = means.reshape(means.shape[0], means.shape[1], num_kv_heads * head_dim)
        scores = torch.bmm(flat, summed.reshape(len(requests), -1, 1)).squeeze(2) * scale
        scores = all_reduce(scores)
        scores = scores.masked_fill(~layout.valid_blocks, float("-inf"))
        order = rank(scores)
        kept = order[layout.kept_row, layout.kept_col]  # [sum k] kept block per kept slot

        tiles = layout.tiles.clone()
        start = kept[layout.tile_kept] * layout.tile_block
        low = start + layout.tile_part * TILE_N
        high = torch.minimum(start + layout.tile_block, layout.tile_prompt)
        low = torch.minimum(low, high)
        high = torch.minimum(high, low + TILE_N)
        tiles[layout.tile_index, 0] = low.to(torch.int32)
        tiles[layout.tile_index, 1] = high.to(torch.int32)

        is_kept = torch.zeros_like(layout.valid_blocks)
        is_kept[layout.kept_row, kept] = True
        prompt_keys = torch.zeros(len(requests), dtype=torch.int64, device=q.device)
        prompt_keys.index_add_(0, layout.kept_row[layout.tile_kept], (high - low).long())
        sinks = [batch.sinks[r] for r in requests if batch.sinks[r] is not None]
        if sum(len(found) for found in sinks):  # `num_sinks` 0 leaves every list empty
            flat = torch.cat(sinks)
            duplicate = is_kept[layout.sink_row, flat // layout.sink_sizes]
            points = torch.where(duplicate, -1, flat).to(torch.int32)
            prompt_keys.index_add_(0, layout.sink_row, (~duplicate).long())
        else:
            points = torch.full((1,), -1, dtype=torch.int32, device=q.device)
        batch.add_device_prompt_keys(requests, prompt_keys)
        return KeyTiles(
            splits=layout.splits,
            tiles=tiles,
            points=points,
            rows=layout.rows,
            num_slots=layout.num_slots,
            max_query_len=layout.max_query_len,
        )
