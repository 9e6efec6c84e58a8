"""Plain-torch twins of the Triton kernels: same arguments, float32, loops allowed.

They are the test oracles for the kernels and the CPU path where Triton does not run.
"""

from __future__ import annotations

import torch


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
) -> torch.Tensor:
    """Twin of kernels.sparse_attention.sparse_paged_attention (shapes documented there)."""
    num_heads = q.shape[1]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    result = torch.empty_like(q) if out is None else out
    for token in range(q.shape[0]):
        req = int(query_req[token])
        positions = key_positions[cu_seqlens_k[req] : cu_seqlens_k[req + 1]].long()
        blocks = block_table[req, positions // block_size].long()
        rows = positions % block_size
        keys = key_cache[blocks, rows].float().repeat_interleave(group, dim=1)  # [n, H, D]
        values = value_cache[blocks, rows].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[token].float(), keys) * scale
        result[token] = torch.einsum("hn,nhd->hd", scores.softmax(-1), values).to(q.dtype)
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
    num_heads = q.shape[1]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_reqs = prompt_lens.shape[0]
    max_blocks = max(1, -(-int(prompt_lens.max()) // prompt_block_size)) if num_reqs else 0
    scores = torch.full((num_reqs, max_blocks), float("-inf"))
    for req in range(num_reqs):
        queries = q[query_req.long() == req].float()  # [t, H, D]
        length = int(prompt_lens[req])
        for block in range(-(-length // prompt_block_size)):
            positions = torch.arange(block * prompt_block_size,
                                     min((block + 1) * prompt_block_size, length))  # fmt: skip
            keys = key_cache[block_table[req, positions // block_size].long(),
                             positions % block_size].float()  # fmt: skip
            representative = keys.mean(0).repeat_interleave(group, dim=0)  # [H, D]
            scores[req, block] = (queries * representative).sum() * scale
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
    num_heads = q.shape[1]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_reqs = seq_lens.shape[0]
    max_prompt = int(prompt_lens.max()) if num_reqs else 0
    scores = torch.full((num_reqs, max_prompt), float("-inf"))
    for req in range(num_reqs):
        queries = q[cu_seqlens_q[req] : cu_seqlens_q[req + 1]].float()  # [t, H, D]
        positions = torch.arange(int(seq_lens[req]))
        keys = key_cache[block_table[req, positions // block_size].long(),
                         positions % block_size].float()  # fmt: skip
        keys = keys.repeat_interleave(group, dim=1)  # [n, H, D]
        probs = (torch.einsum("thd,nhd->thn", queries, keys) * scale).softmax(-1)
        length = int(prompt_lens[req])
        scores[req, :length] = probs.sum((0, 1))[:length]
    return scores
