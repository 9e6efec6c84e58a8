"""Sparse-dLLM (arXiv 2508.02558) inside the FOCUS backend: per block, every layer keeps part of
the K/V outside the block once, and the block's later steps attend only those and the block.

The rule, as OpenMOSS/Sparse-dLLM states it (read at commit 3fd8986, `llada_generate.py`,
`modeling_llada.py: CustomCache.filter_cache`, and the same in `dream/Cache.py`; README,
"Sparse-dLLM"): a block's first two steps are full forwards. At the second, each layer scores
every position outside the block by the block queries' mean dotted with its key (raw dot
product, no softmax, no 1/sqrt(d)), averaged over query heads (a query head reads its KV head),
max-pooled over the outside positions in order (width `kernel`, stride 1), and keeps the top
int(N x keep_ratio) of the N; one set per layer, shared by its KV heads. From the third step on
the block's queries attend the kept keys (their K/V as the second step wrote them) and the
block's own fresh K/V.

Here a score is the sum over the block's queries and heads instead of their mean (a positive
factor: the same order), all-reduced over tensor-parallel ranks; ties go to the lower position
(`selection.top_ranked`; torch.topk leaves them to the device, and max-pooling makes many).
The kept positions stay on the device, per layer, ascending, in the request's state. On
the Triton path the attention runs on the tiled kernel (point tiles for the kept keys, a range
for the block) over the paged cache. On the CPU path, where reading scattered rows costs about
what reading every key does, the SELECT step also copies each layer's kept K/V once into a
private cache of the request (`compact`: the kept rows in order, then room for the block's),
as the official code's `filter_cache` compacts its cache; each later step writes the block's
fresh K/V after them and attends that cache's first kept + block rows as one range. The copy
holds keep_ratio of the request's K/V per layer beside vLLM's cache, until the block ends.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from vllm_focus.attention.selection import top_ranked
from vllm_focus.kernels.sparse_attention import KeyTiles, key_tiles

SELECT, ATTEND = "select", "attend"
COMPACT_BLOCK = 128  # rows per block of the CPU path's compacted caches


@dataclass
class SparseDllmStep:
    """One request's Sparse-dLLM part in one forward."""

    mode: str  # SELECT (the block's second step) or ATTEND (a later one)
    start: int  # the block is [start, end)
    end: int
    keep: int  # keys kept outside the block
    kernel: int  # max-pool width
    kept: dict[int, torch.Tensor]  # layer index -> kept positions [keep] int32, on the device
    # CPU path: layer index -> (K, V) of the kept rows then the block's, in the kernels'
    # [blocks, COMPACT_BLOCK, kv_heads, head_dim] layout (K transposed per block)
    compact: dict[int, tuple[torch.Tensor, torch.Tensor]]


def requests_in(meta, mode: str, method: str = "sparse_dllm") -> list[int]:
    """The forward's requests in `mode` of a method whose per-request steps the FOCUS batch
    holds under the name `method` (Sparse-dLLM's; SparseD's reuse this)."""
    batch = meta.focus
    if batch is None:
        return []
    steps = getattr(batch, method)
    return [r for r, step in enumerate(steps) if step is not None and step.mode == mode]


def select(q: torch.Tensor, key: torch.Tensor, meta, requests: list[int], index: int, all_reduce):
    """At layer `index`, each SELECT request (its query: every position, in order) keeps its
    top keys outside the block; `key` holds this forward's fresh keys, row for row as `q`."""
    batch = meta.focus
    starts = meta.query_start_loc_cpu
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    width = max(starts[r + 1] - starts[r] for r in requests)
    scores = torch.zeros(len(requests), width, dtype=torch.float32, device=q.device)
    for row, r in enumerate(requests):
        step, base = batch.sparse_dllm[r], starts[r]
        block = q[base + step.start : base + step.end].float()
        summed = block.reshape(block.shape[0], num_kv_heads, -1, head_dim).sum((0, 2))
        keys = key[base : starts[r + 1]].float()
        scores[row, : keys.shape[0]] = torch.einsum("tkd,kd->t", keys, summed)
    scores = all_reduce(scores)
    for row, r in enumerate(requests):
        step, total = batch.sparse_dllm[r], starts[r + 1] - starts[r]
        outside = torch.cat(
            [
                torch.arange(step.start, device=q.device),
                torch.arange(step.end, total, device=q.device),
            ]
        )
        pooled = F.max_pool1d(
            scores[row, outside][None, None],
            kernel_size=step.kernel,
            stride=1,
            padding=step.kernel // 2,
        )[0, 0]
        chosen = top_ranked(pooled[None], step.keep)[0]
        # ascending: runs of neighbours become one tile run in the CPU kernel
        step.kept[index] = outside[chosen].sort().values.to(torch.int32)


def attend_tiles(meta, requests: list[int], index: int, device) -> KeyTiles:
    """The ATTEND requests' key sets at layer `index`: the block as a range, the kept keys as
    points. The layout is the host's, built once per forward; the points are the layer's."""
    batch = meta.focus
    key = ("sparse_dllm", tuple(requests))
    layout = meta.step_cache.get(key)
    if layout is None:
        per_request = []
        for r in requests:
            step = batch.sparse_dllm[r]
            per_request.append((r, [(step.start, step.end)], [-1] * step.keep))
        layout = meta.step_cache[key] = key_tiles(per_request, meta.query_start_loc_cpu, device)
    points = [batch.sparse_dllm[r].kept[index] for r in requests]
    if not sum(p.numel() for p in points):
        return layout
    return replace(layout, points=torch.cat(points))


def _compact_rows(cache: tuple[torch.Tensor, torch.Tensor], first: int, key, value) -> None:
    """Writes rows `first`.. of a compacted cache from [n, kv_heads, head_dim] K/V."""
    at = torch.arange(first, first + key.shape[0], device=key.device)
    blocks, rows = at // COMPACT_BLOCK, at % COMPACT_BLOCK
    cache[0][blocks, rows] = key
    cache[1][blocks, rows] = value


def compact(key, value, meta, requests: list[int], index: int) -> None:
    """CPU path, at layer `index` after `select`: each SELECT request's kept K/V, from this
    forward's fresh rows (every position, in order), copied into its compacted cache."""
    batch, starts = meta.focus, meta.query_start_loc_cpu
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    for r in requests:
        step = batch.sparse_dllm[r]
        kept = step.kept[index].long() + starts[r]
        blocks = -(-(kept.numel() + step.end - step.start) // COMPACT_BLOCK)
        shape = (blocks, num_kv_heads, head_dim, COMPACT_BLOCK)
        # zeros: torch's tiled attention reads whole blocks and masks the rows past the end
        keys = torch.zeros(shape, dtype=key.dtype, device=key.device).permute(0, 3, 1, 2)
        values = torch.zeros(
            blocks, COMPACT_BLOCK, num_kv_heads, head_dim, dtype=value.dtype, device=value.device
        )
        step.compact[index] = (keys, values)
        _compact_rows(step.compact[index], 0, key[kept], value[kept])


def attend_compact(q, key, value, meta, requests: list[int], index, scale, out, attention):
    """CPU path, at layer `index`: each ATTEND request's block (its query, in order) writes
    its fresh K/V after the kept rows of its compacted cache and attends all of them.
    `attention(q, keys, values, block_table, tiles, query_start, scale, out)` is the tiled
    attention that fits (`kernels.cpu` or `kernels.cpu_compiled`)."""
    from vllm_focus.kernels.sparse_attention import key_tiles

    batch, starts = meta.focus, meta.query_start_loc_cpu
    for r in requests:
        step, rows = batch.sparse_dllm[r], slice(starts[r], starts[r + 1])
        cache, keep, count = step.compact[index], step.kept[index].numel(), rows.stop - rows.start
        _compact_rows(cache, keep, key[rows], value[rows])
        shape = ("sparse_dllm-compact", keep, count, cache[0].shape[0])
        layout = meta.step_cache.get(shape)
        if layout is None:
            table = torch.arange(cache[0].shape[0], dtype=torch.int32, device=q.device)[None]
            tiles = key_tiles([(0, [(0, keep + count)], None)], [0, count], q.device)
            layout = meta.step_cache[shape] = (table, tiles)
        attention(q[rows], *cache, layout[0], layout[1], [0, count], scale, out[rows])
