"""SparseD (arXiv 2509.24014) inside the FOCUS backend: no KV cache, dense early steps, then a
per-head block pattern fixed once and reused by every later step of the request.

The rule, as INV-WZQ/SparseD states it (read at commit 52155b4, `models/LLaDA/modeling_llada.py`
and `models/Dream/modeling_dream.py` attention, `SparseD_utils.py::create_attention_block_mask`;
README, "SparseD"): every step computes the whole sequence. Steps 0 .. s, s =
int(total_steps x skip) + 1 counted over the whole request, attend densely; at step s every
layer builds, per query head, a mask over (query block, key block) tiles of `block_size`
positions from the start of the sequence:

- for each query block, the softmax of its queries over every key, averaged over each tile
  (a tile past the sequence's end counts its missing rows and columns as zeros), keeps the
  top int(n x select) + 1 of the n key blocks;
- the key blocks from `last` on (the first block starting inside the generation, else the
  final block) are then cleared and chosen again from a softmax over those keys alone, with
  their own budget int(n_gen x select) + 1.

Steps after s attend, per head and query block, only the kept key blocks. The mask's softmax
uses 1/sqrt(d) for Dream and, as the LLaDA copy does, 1/sqrt(num_heads) for LLaDA; the
attention itself always uses 1/sqrt(d).

Here ties go to the lower block (`selection.top_ranked`; torch.topk leaves them to the
device) and the scores are float32 whatever the model dtype (the published code rounds the
softmax to it first). Heads are independent, so under tensor parallelism each rank builds and
keeps its own heads' masks; nothing is reduced. Both paths run the code below; the
block-sparse attention itself is `block_sparse_torch` on the CPU path (the kept key blocks
gathered per head and query block, chunks of query blocks through one fused attention) and
its Triton twin `kernels.block_sparse` on the Triton path (one program per query tile and
head, walking that head's kept key blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_focus.attention import sparse_dllm
from vllm_focus.attention.selection import top_ranked
from vllm_focus.settings import SparsedPlan

SELECT, ATTEND = "select", "attend"


@dataclass
class SparsedStep:
    """One request's SparseD part in one forward (its query: every position, in order)."""

    mode: str  # SELECT (the pattern step: dense, and each layer builds its mask) or ATTEND
    block_size: int
    select: float
    last: int  # the first key block of the generation's own budget
    scale_by_heads: bool  # LLaDA's copy: the mask's softmax scale is 1/sqrt(num_heads)
    masks: dict[int, torch.Tensor]  # layer -> [local heads, n, n] bool, on the device


def requests_in(meta, mode: str) -> list[int]:
    """The forward's requests in SparseD's `mode`."""
    return sparse_dllm.requests_in(meta, mode, "sparsed")


def generation_block(total: int, gen_length: int, block_size: int) -> int:
    """`last`: the first block index whose start leaves at most `gen_length` positions,
    else the final block."""
    blocks = -(-total // block_size)
    for index in range(blocks):
        if total - index * block_size <= gen_length:
            return index
    return blocks - 1


def _tile_importance(weights: torch.Tensor, size: int) -> torch.Tensor:
    """[H, rows <= size, K] softmax weights -> [H, ceil(K / size)] tile means over size x size
    (missing rows and columns count as zeros)."""
    heads, _, width = weights.shape
    blocks = -(-width // size)
    padded = torch.zeros(heads, blocks * size, dtype=weights.dtype, device=weights.device)
    padded[:, :width] = weights.sum(1)
    return padded.view(heads, blocks, size).sum(-1) / (size * size)


def build_mask(q: torch.Tensor, key: torch.Tensor, step: SparsedStep, scale: float) -> torch.Tensor:
    """One layer's pattern from one request's fresh q [T, H, D] and keys [T, Hkv, D]:
    [H, n, n] bool."""
    total, heads = q.shape[0], q.shape[1]
    size, last = step.block_size, step.last
    blocks = -(-total // size)
    group = heads // key.shape[1]
    keys = key.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, T, D]
    mask = torch.zeros(heads, blocks, blocks, dtype=torch.bool, device=q.device)
    rows = torch.arange(heads, device=q.device)[:, None]
    keep, keep_tail = (SparsedPlan.kept_blocks(n, step.select) for n in (blocks, blocks - last))
    for index in range(blocks):
        block = q[index * size : (index + 1) * size].float().transpose(0, 1)  # [H, rows, D]
        scores = torch.einsum("hqd,hkd->hqk", block, keys) * scale
        first = top_ranked(_tile_importance(scores.softmax(-1), size), keep)
        mask[rows, index, first] = True
        mask[:, index, last:] = False
        tail_weights = scores[:, :, last * size :].softmax(-1)
        second = top_ranked(_tile_importance(tail_weights, size), keep_tail)
        mask[rows, index, second + last] = True
    return mask


def run_layer(
    q, key, value, meta, index: int, scale: float, num_heads: int, out, attention=None
) -> None:
    """SparseD's part of one layer, the same on both paths: the ATTEND requests' block-sparse
    attention into `out` (the caller leaves them out of its own), and the SELECT requests'
    masks (their attention is the caller's dense one). `num_heads`: the model's, all ranks'.
    `attention`: the block-sparse attention (`block_sparse_torch`, the CPU path's, by default;
    the Triton path passes `kernels.block_sparse.block_sparse_attention`, its twin)."""
    if attending := requests_in(meta, ATTEND):
        attend(q, key, value, meta, attending, index, scale, out, attention or block_sparse_torch)
    if selecting := requests_in(meta, SELECT):
        select(q, key, meta, selecting, index, num_heads, q.shape[-1])


def select(q, key, meta, requests: list[int], index: int, num_heads: int, head_dim: int) -> None:
    """At layer `index`, each SELECT request builds its mask from this forward's q and fresh
    keys (row for row; the request's rows are its whole sequence). `num_heads`: the model's
    (all ranks'), for LLaDA's scale."""
    batch, starts = meta.focus, meta.query_start_loc_cpu
    for r in requests:
        step = batch.sparsed[r]
        scale = 1 / math.sqrt(num_heads if step.scale_by_heads else head_dim)
        rows = slice(starts[r], starts[r + 1])
        step.masks[index] = build_mask(q[rows], key[rows], step, scale)


def attend(q, key, value, meta, requests: list[int], index, scale, out, attention) -> None:
    """At layer `index`, each ATTEND request's queries attend, per head and query block, the
    key blocks of its mask; K/V are this forward's fresh ones (the whole sequence)."""
    batch, starts = meta.focus, meta.query_start_loc_cpu
    for r in requests:
        step = batch.sparsed[r]
        rows = slice(starts[r], starts[r + 1])
        mask = step.masks[index]
        attention(q[rows], key[rows], value[rows], mask, step.block_size, scale, out[rows])


# The most gathered K (and as much V) one chunk of query blocks holds, in bytes.
GATHER_BYTES = 1 << 23
_workspace: dict[tuple, torch.Tensor] = {}


def _gather_buffer(device: torch.device, which: int, elements: int) -> torch.Tensor:
    """A float32 scratch buffer of at least `elements`, kept between calls (`which`: K or V):
    a fresh one per call costs its page faults, several times the copy into it on CPU. Made
    outside inference mode, so that a call outside it (after the engine's, inside it) may
    still write into it."""
    held = _workspace.get((device, which))
    if held is None or held.numel() < elements:
        with torch.inference_mode(False):
            held = torch.empty(elements, dtype=torch.float32, device=device)
        _workspace[(device, which)] = held
    return held[:elements]


def _gathered(x: torch.Tensor, picked: torch.Tensor, which: int, size: int) -> torch.Tensor:
    """Rows `picked` [c, H, width] of `x` [blocks, size * D] into scratch buffer `which`:
    [c, H, width * size, D]."""
    c, heads, width = picked.shape
    row = x.shape[1]
    buffer = _gather_buffer(x.device, which, picked.numel() * row)
    torch.index_select(x, 0, picked.flatten(), out=buffer.view(-1, row))
    return buffer.view(c, heads, width * size, row // size)


def block_sparse_torch(q, key, value, mask, size: int, scale: float, out) -> torch.Tensor:
    """q [T, H, D] over key/value [T, Hkv, D] into out [T, H, D], head h and query block i
    reading the key blocks where mask[h, i]. The twin of `kernels.block_sparse.
    block_sparse_attention` (same arguments).

    Query blocks go in chunks (at most `GATHER_BYTES` of gathered K per chunk): each head's
    kept key blocks, copied from its KV head's blocks (ascending, padded to the most any
    (head, query block) keeps; fillers and positions past the end masked out), and one fused
    softmax attention (torch's scaled_dot_product_attention, float32) over the chunk's query
    blocks and heads as one batch."""
    total, heads, dim = q.shape
    kv_heads = key.shape[1]
    blocks = mask.shape[1]
    padded = blocks * size

    def in_blocks(x):  # [T, h, D] -> [h, blocks, size, D] float32, zero past the end
        full = x.new_zeros(padded, x.shape[1], dim, dtype=torch.float32)
        full[:total] = x
        return full.permute(1, 0, 2).reshape(x.shape[1], blocks, size, dim)

    # [Hkv * blocks, size * D]: row j * blocks + b is KV head j's key block b.
    keys, values = (in_blocks(x).flatten(0, 1).flatten(1) for x in (key, value))
    queries = in_blocks(q)
    width = int(mask.sum(-1).max())
    # Per (head, query block): the kept key blocks first (ascending), then fillers.
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    inside = torch.arange(padded, device=q.device).view(blocks, size) < total
    valid = mask.gather(-1, order)[..., None] & inside[order]  # [H, blocks, width, size]
    kv_of_head = torch.arange(heads, device=q.device) // (heads // kv_heads)
    rows_of = (kv_of_head[:, None, None] * blocks + order).transpose(0, 1)  # [blocks, H, width]
    chunk = max(1, GATHER_BYTES // (heads * width * size * dim * 4))
    for first in range(0, blocks, chunk):
        last = min(blocks, first + chunk)
        picked = rows_of[first:last]  # [c, H, width]
        attended = torch.nn.functional.scaled_dot_product_attention(
            queries[:, first:last].transpose(0, 1),  # [c, H, size, D]
            _gathered(keys, picked, 0, size),
            _gathered(values, picked, 1, size),
            attn_mask=valid[:, first:last].flatten(2, 3).transpose(0, 1)[:, :, None, :],
            scale=scale,
        )  # [c, H, size, D]
        rows = slice(first * size, min(total, last * size))
        out[rows] = attended.transpose(1, 2).flatten(0, 1)[: rows.stop - rows.start].to(out.dtype)
    return out
