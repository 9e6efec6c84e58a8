"""The FOCUS backend's CPU path: attention read in place from the paged KV cache.

The torch twins (reference.py) gather a request's keys row by row into a new tensor before
attending. On a CPU, where a within-block step is bound by memory traffic, that strided copy
plus the second read costs several times the attention itself. Here a step with few query
tokens reads the request's cache blocks where they lie (a view when its physical blocks are
consecutive, else one copy of the whole blocks it touches) and runs batched matmuls over
(cache block, KV head) pairs; keys outside the request's set are masked to -inf. The same
pass returns, when asked, the softmax mass each prompt key receives — the sink scores of
Focus's last dense layer — so that layer's keys are read once, not twice.

Requests with many query tokens (a block-start refresh) go through the twin's gather and
torch's fused attention, which amortises the gather. Results equal the twins' (tests hold
them to it).
"""

from __future__ import annotations

import torch

from vllm_focus.kernels.reference import attend_gathered

# Above this many query tokens a request's attention goes through the gathered path.
FEW_QUERIES = 256
# Score elements (KV heads x query rows x keys) per chunk of query tokens.
MAX_SCORES = 1 << 25


def _request_blocks(cache: torch.Tensor, physical: torch.Tensor) -> torch.Tensor:
    """[u, kv_heads, block_size, head_dim] for the physical blocks `physical` of a cache viewed
    as [blocks, block_size, kv_heads, head_dim]; a view when the blocks are consecutive."""
    by_head = cache.transpose(1, 2)
    first, count = int(physical[0]), physical.numel()
    if torch.equal(physical, torch.arange(first, first + count, device=physical.device)):
        return by_head[first : first + count]
    return by_head[physical]


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sparse_paged_attention_ref`'s arguments and result, plus sink scores.

    With `sink_prompt_lens` (per request; 0 = not wanted), also returns [R, max prompt] float32:
    for each wanted request, the softmax mass its query tokens put on each prompt key, summed
    over heads and queries (`sink_scores_ref` when the request's key set is every position);
    -inf elsewhere.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = key_cache.shape[2], key_cache.shape[1]
    group = num_heads // num_kv_heads
    result = torch.empty_like(q) if out is None else out
    sinks = None
    if sink_prompt_lens is not None:
        width = max(sink_prompt_lens, default=0)
        sinks = torch.full((len(sink_prompt_lens), width), float("-inf"), device=q.device)
        for req, prompt_len in enumerate(sink_prompt_lens):
            sinks[req, :prompt_len] = 0.0  # a request without queries puts no mass anywhere
    for req in torch.unique(query_req).tolist():
        tokens = torch.nonzero(query_req == req).flatten()
        positions = key_positions[cu_seqlens_k[req] : cu_seqlens_k[req + 1]].long()
        prompt_len = sink_prompt_lens[req] if sink_prompt_lens is not None else 0
        if tokens.numel() > FEW_QUERIES and not prompt_len:
            result[tokens] = attend_gathered(
                q[tokens], key_cache, value_cache, block_table, req, positions, scale
            ).to(result.dtype)
            continue
        logical, local = torch.unique(positions // block_size, return_inverse=True)
        physical = block_table[req, logical].long()
        keys = _request_blocks(key_cache, physical)  # [u, Hkv, bs, D]
        values = _request_blocks(value_cache, physical)
        rows = local * block_size + positions % block_size  # each key's row in the blocks
        mask = torch.ones(logical.numel() * block_size, dtype=torch.bool, device=q.device)
        mask[rows] = False  # True: not in the key set
        mass = torch.zeros(mask.numel(), device=q.device) if prompt_len else None
        chunk = max(1, MAX_SCORES // (num_heads * mask.numel()))
        for part in tokens.split(chunk):
            t = part.numel()
            # [1, Hkv, group * t, D]: query head h = kv_head * group + g reads KV head kv_head.
            grouped = q[part].float().reshape(t, num_kv_heads, group, head_dim)
            grouped = grouped.permute(1, 2, 0, 3).reshape(1, num_kv_heads, group * t, head_dim)
            scores = torch.matmul(grouped, keys.transpose(-1, -2).float())  # [u, Hkv, gt, bs]
            scores = scores.permute(1, 2, 0, 3).reshape(num_kv_heads, group * t, -1) * scale
            probs = scores.masked_fill_(mask, float("-inf")).softmax(-1)
            if mass is not None:
                mass += probs.sum((0, 1))
            blocked = probs.reshape(num_kv_heads, group * t, logical.numel(), block_size)
            attended = torch.matmul(blocked.permute(2, 0, 1, 3), values.float()).sum(0)
            attended = attended.reshape(num_kv_heads, group, t, head_dim).permute(2, 0, 1, 3)
            result[part] = attended.reshape(t, num_heads, head_dim).to(result.dtype)
        if mass is not None:
            in_prompt = positions < prompt_len
            sinks[req, positions[in_prompt]] = mass[rows[in_prompt]]
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
    block_size = key_cache.shape[1]
    count = -(-prompt_len // block_size)
    keys = _request_blocks(key_cache, block_table[req, :count].long())  # [u, Hkv, bs, D]
    rows = keys.transpose(1, 2).reshape(count * block_size, keys.shape[1], keys.shape[3])
    rows = rows[:prompt_len].float()  # [P, Hkv, D]
    num_blocks = -(-prompt_len // prompt_block_size)
    block_of = torch.arange(prompt_len, device=rows.device) // prompt_block_size
    sums = torch.zeros(num_blocks, *rows.shape[1:], device=rows.device)
    sums.index_add_(0, block_of, rows)
    counts = torch.bincount(block_of, minlength=num_blocks).float()
    return sums / counts[:, None, None]


def block_scores_from_means(q: torch.Tensor, means: torch.Tensor, scale: float) -> torch.Tensor:
    """[prompt blocks] float32: sum over the query tokens q [t, H, D] and heads of q . the
    block's mean key (query head h reads KV head h // group), as `prompt_block_scores_ref`."""
    num_kv_heads, head_dim = means.shape[1], means.shape[2]
    summed = q.float().sum(0).reshape(num_kv_heads, -1, head_dim).sum(1)  # [Hkv, D]
    return torch.einsum("bkd,kd->b", means, summed) * scale
