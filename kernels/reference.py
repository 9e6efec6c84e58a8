"""Plain-torch twins of the Triton kernels: same arguments, float32, loops allowed.

They are the test oracles for the kernels and the CPU path where Triton does not run.
"""

from __future__ import annotations

import torch


def _gather(cache: torch.Tensor, block_table: torch.Tensor, req: int, positions: torch.Tensor):
    """Rows [n, num_kv_heads, head_dim] (float32) of one request's positions in a paged cache."""
    block_size = cache.shape[1]
    blocks = block_table[req, positions // block_size].long()
    return cache[blocks, positions % block_size].float()


def sparse_paged_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_req: torch.Tensor,
    key_positions: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    query_chunk: int = 512,
) -> torch.Tensor:
    """Twin of kernels.sparse_attention.sparse_paged_attention (shapes documented there).

    One request at a time, its query tokens in chunks of `query_chunk`, through torch's
    scaled_dot_product_attention on the gathered keys.
    """
    result = torch.empty_like(q) if out is None else out
    for req in torch.unique(query_req).tolist():
        tokens = torch.nonzero(query_req == req).flatten()
        positions = key_positions[cu_seqlens_k[req] : cu_seqlens_k[req + 1]].long()
        attended = attend_gathered(
            q[tokens], key_cache, value_cache, block_table, req, positions, scale, query_chunk
        )
        result[tokens] = attended.to(result.dtype)
    return result


def key_tile_positions(keys) -> dict[int, torch.Tensor]:
    """Per request, the positions a `KeyTiles` describes, in tile order (on the host)."""
    splits, tiles, points = keys.splits.cpu(), keys.tiles.cpu(), keys.points.cpu()
    per_request: dict[int, list[torch.Tensor]] = {}
    for req, begin, end, _, _ in splits.tolist():
        for start, stop, offset in tiles[begin:end].tolist():
            if offset < 0:
                chunk = torch.arange(start, stop)
            else:
                chunk = points[offset : offset + stop - start].long()
                chunk = chunk[chunk >= 0]
            per_request.setdefault(req, []).append(chunk)
    return {req: torch.cat(chunks) for req, chunks in per_request.items()}


def tiled_sparse_attention_ref(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    query_start_loc: torch.Tensor,
    keys,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Twin of kernels.sparse_attention.tiled_sparse_attention (shapes documented there)."""
    starts = query_start_loc.tolist()
    for req, positions in key_tile_positions(keys).items():
        rows = torch.arange(starts[req], starts[req + 1], device=q.device)
        attended = attend_gathered(
            q[rows], key_cache, value_cache, block_table, req, positions.to(q.device), scale
        )
        out[rows] = attended.to(out.dtype)
    return out


def attend_gathered(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    req: int,
    positions: torch.Tensor,
    scale: float,
    query_chunk: int = 512,
) -> torch.Tensor:
    """Attention (float32) of one request's query tokens q [t, H, D] over its key `positions`."""
    group = q.shape[1] // key_cache.shape[2]
    keys = _gather(key_cache, block_table, req, positions)  # [n, Hkv, D]
    values = _gather(value_cache, block_table, req, positions)
    result = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for chunk in torch.arange(q.shape[0], device=q.device).split(query_chunk):
        # [1, heads, t, D] over [1, kv_heads, n, D]; query head h reads KV head h // group.
        attended = torch.nn.functional.scaled_dot_product_attention(
            q[chunk].float().transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            scale=scale,
            enable_gqa=group > 1,
        )
        result[chunk] = attended[0].transpose(0, 1)
    return result


def prompt_block_scores_ref(
    q: torch.Tensor,
    query_req: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    prompt_lens: torch.Tensor,
    prompt_block_size: int,
    scale: float,
) -> torch.Tensor:
    """Twin of kernels.block_scores.prompt_block_scores (shapes documented there)."""
    num_heads, num_kv_heads = q.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_reqs = prompt_lens.shape[0]
    max_blocks = max(1, -(-int(prompt_lens.max()) // prompt_block_size)) if num_reqs else 0
    scores = torch.full((num_reqs, max_blocks), float("-inf"), device=q.device)
    for req in range(num_reqs):
        queries = q[query_req.long() == req].float()  # [t, H, D]
        length = int(prompt_lens[req])
        if length == 0:
            continue
        keys = _gather(key_cache, block_table, req, torch.arange(length, device=q.device))
        block_of = torch.arange(length, device=q.device) // prompt_block_size
        num_blocks = int(block_of[-1]) + 1
        sums = torch.zeros(num_blocks, num_kv_heads, keys.shape[-1], device=q.device)
        sums.index_add_(0, block_of, keys)
        counts = torch.bincount(block_of, minlength=num_blocks).float()
        representative = (sums / counts[:, None, None]).repeat_interleave(group, dim=1)
        scores[req, :num_blocks] = torch.einsum("thd,bhd->b", queries, representative) * scale
    return scores


def sink_scores_ref(
    q: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    prompt_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Twin of kernels.sink_scores.sink_scores (shapes documented there)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[2]
    num_reqs = seq_lens.shape[0]
    max_prompt = int(prompt_lens.max()) if num_reqs else 0
    scores = torch.full((num_reqs, max_prompt), float("-inf"), device=q.device)
    for req in range(num_reqs):
        queries = q[cu_seqlens_q[req] : cu_seqlens_q[req + 1]].float()  # [t, H, D]
        length = int(prompt_lens[req])
        if queries.shape[0] == 0:
            scores[req, :length] = 0.0  # no query puts mass anywhere
            continue
        positions = torch.arange(int(seq_lens[req]), device=q.device)
        keys = _gather(key_cache, block_table, req, positions)  # [n, Hkv, D]
        grouped = queries.reshape(-1, num_kv_heads, num_heads // num_kv_heads, head_dim)
        probs = (torch.einsum("tkgd,nkd->tkgn", grouped, keys) * scale).softmax(-1)
        scores[req, :length] = probs.sum((0, 1, 2))[:length]
    return scores


def write_kv_ref(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Twin of kernels.cache_write.write_kv: a masked scatter of the rows whose slot is >= 0."""
    slots = slot_mapping.long()
    written = slots >= 0
    slots = slots[written]
    block_size = key_cache.shape[1]
    blocks, rows = slots // block_size, slots % block_size
    key_cache[blocks, rows] = key[written].to(key_cache.dtype)
    value_cache[blocks, rows] = value[written].to(value_cache.dtype)
