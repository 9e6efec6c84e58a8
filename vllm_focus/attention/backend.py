"""The FOCUS attention backend: Focus-dLLM's sparse attention inside vLLM's attention layers.

Selected with `--attention-backend focus` (or `LLM(..., attention_backend="focus")`). It is
registered in vLLM's `CUSTOM` slot with `FOCUS` as an alias name (`register_focus_backend`),
and the model classes hand it to their `Attention` layers themselves, so the CPU platform,
which ignores the flag, cannot swap it for CPU_ATTN.

One forward's Focus state lives in `FocusBatch`, which the diffusion runner attaches to the
metadata every layer shares: per request, whether it runs Focus this step and with which knobs,
the rows of its focus queries F, and the sinks — found at the last dense layer and read by
every deeper one. Per layer and request, the keys attended are every position (dense layers,
requests not in Focus) or the kept prompt blocks ∪ sinks ∪ the response (sparse layers).
All selections sum scores over heads, and are all-reduced across tensor-parallel ranks before
the top-k, so every rank keeps the same keys. Kernels: Triton on CUDA; on the CPU the
in-place torch path of `vllm_focus.kernels.cpu`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
)

from vllm_focus.attention import selection, sparse_dllm, sparsed, triton_path
from vllm_focus.attention.triton_path import uses_triton_path
from vllm_focus.settings import FocusPlan

NAME = "FOCUS"


@dataclass
class FocusBatch:
    """The Focus state of one forward, per request of the batch (index r)."""

    plans: list[FocusPlan | None]  # None: this request attends densely in every layer
    prompt_lens: list[int]
    focus_rows: torch.Tensor  # [nF] int64, batch rows of the focus queries F
    focus_req: torch.Tensor  # [nF] int32, their request
    # Per request: (request id, version of its prompt K/V), the version bumped by every step
    # that writes prompt positions; the CPU path caches block means under it.
    prompt_keys: list[tuple[str, int]] = field(default_factory=list)
    sinks: list[torch.Tensor | None] = field(default_factory=list)
    # Per request, prompt keys its queries attended, summed over the sparse layers (metrics),
    # counted on the device by the shared selection.
    sparse_prompt_keys_device: torch.Tensor | None = None
    # Per request: its Sparse-dLLM part in this forward (None: not a Sparse-dLLM request, or
    # a block's first step, which is dense).
    sparse_dllm: list[sparse_dllm.SparseDllmStep | None] = field(default_factory=list)
    # Per request: its SparseD part in this forward (None: not SparseD, or a dense step
    # before the pattern step).
    sparsed: list[sparsed.SparsedStep | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sinks:
            self.sinks = [None] * len(self.plans)
        if not self.sparse_dllm:
            self.sparse_dllm = [None] * len(self.plans)
        if not self.sparsed:
            self.sparsed = [None] * len(self.plans)

    def add_device_prompt_keys(self, requests: list[int], counts: torch.Tensor) -> None:
        if self.sparse_prompt_keys_device is None:
            self.sparse_prompt_keys_device = torch.zeros(
                len(self.plans), dtype=torch.int64, device=counts.device
            )
        index = torch.tensor(requests).to(counts.device, non_blocking=True)
        self.sparse_prompt_keys_device.index_add_(0, index, counts)

    def prompt_keys_attended(self) -> list[int]:
        """Per request, the prompt keys its sparse layers attended (read after the forward)."""
        if self.sparse_prompt_keys_device is None:
            return [0] * len(self.plans)
        return self.sparse_prompt_keys_device.tolist()


@dataclass
class FocusMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor  # [R + 1] int32
    query_req: torch.Tensor  # [T] int32, the request of each token
    seq_lens: torch.Tensor  # [R] int32
    seq_lens_cpu: list[int]
    block_table: torch.Tensor  # [R, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64, -1: not written
    query_start_loc_cpu: list[int] = field(default_factory=list)
    max_query_len: int = 0
    max_seq_len: int = 0
    focus: FocusBatch | None = None  # set by the diffusion runner for Focus steps
    _dense_keys: tuple[torch.Tensor, torch.Tensor] | None = None
    # What the Triton path builds once per forward and every layer reuses.
    step_cache: dict = field(default_factory=dict)

    def dense_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every position of every request: (key_positions, cu_seqlens_k), built once."""
        if self._dense_keys is None:
            device = self.seq_lens.device
            positions = torch.cat([torch.arange(n, device=device) for n in self.seq_lens_cpu])
            self._dense_keys = (positions.to(torch.int32), _cumulative(self.seq_lens_cpu, device))
        return self._dense_keys


def _cumulative(lengths: list[int], device: torch.device) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return cu.to(device)


class FocusMetadataBuilder(AttentionMetadataBuilder[FocusMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> FocusMetadata:
        common = common_attn_metadata
        starts = common.query_start_loc_cpu
        counts = (starts[1:] - starts[:-1]).long()
        query_req = torch.repeat_interleave(torch.arange(common.num_reqs), counts)
        seq_lens_cpu = common.seq_lens_cpu_upper_bound
        if seq_lens_cpu is None:
            seq_lens_cpu = common.seq_lens.cpu()
        return FocusMetadata(
            num_actual_tokens=common.num_actual_tokens,
            query_start_loc=common.query_start_loc,
            query_req=query_req.to(torch.int32).to(common.query_start_loc.device),
            seq_lens=common.seq_lens,
            seq_lens_cpu=[int(n) for n in seq_lens_cpu[: common.num_reqs]],
            block_table=common.block_table_tensor,
            slot_mapping=common.slot_mapping,
            query_start_loc_cpu=[int(n) for n in starts[: common.num_reqs + 1]],
            max_query_len=int(common.max_query_len),
            max_seq_len=int(common.max_seq_len),
        )


class FocusAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[FocusAttentionImpl]:
        return FocusAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[FocusMetadataBuilder]:
        return FocusMetadataBuilder

    @classmethod
    def supports_non_causal(cls) -> bool:
        return True

    @classmethod
    def supported_kv_cache_layouts(cls):
        """On a CPU (not forced onto the Triton path) the head-major layout CPU_ATTN's C++
        kernels read (`kernels/cpu_native.py`); elsewhere any layout (strided views)."""
        from vllm.platforms import current_platform
        from vllm.v1.kv_cache_layout import KVCacheLayout

        from vllm_focus.attention.triton_path import triton_path_forced

        if current_platform.is_cpu() and not triton_path_forced():
            return (KVCacheLayout.LBHNC,)
        return None


def focus_requested(vllm_config) -> bool:
    """`--attention-backend focus` (FOCUS is an alias of vLLM's CUSTOM slot holding ours)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_focus import FOCUS_BACKEND

    backend = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    custom = AttentionBackendEnum.CUSTOM
    return backend is custom and custom.is_overridden() and custom.get_path() == FOCUS_BACKEND


def _all_reduce(scores: torch.Tensor) -> torch.Tensor:
    """Sum head-summed scores over tensor-parallel ranks (heads are split across them)."""
    from vllm.distributed import (
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_reduce,
    )

    if get_tensor_model_parallel_world_size() == 1:
        return scores
    return tensor_model_parallel_all_reduce(scores.contiguous())


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-layer view [blocks, kv_heads, block_size, K|V] as two strided
    [blocks, block_size, kv_heads, head_size] views (the kernels' layout)."""
    keys = kv_cache[..., :head_size].transpose(1, 2)
    values = kv_cache[..., head_size:].transpose(1, 2)
    return keys, values


def _compiled_fits(q, keys, meta, requests: list[int]) -> bool:
    """Whether `kernels.cpu_compiled` takes these requests' tiled attention here: within-block
    steps (at most `FEW_QUERIES` query tokens a request; with more, a first forward or a
    refresh, torch's matmuls pay for their gathers)."""
    from vllm_focus.kernels import cpu_compiled
    from vllm_focus.kernels.cpu import FEW_QUERIES

    starts = meta.query_start_loc_cpu
    return (
        max(starts[r + 1] - starts[r] for r in requests) <= FEW_QUERIES
        and cpu_compiled.supports(q, keys)
        and cpu_compiled.available()
    )


def _tiled_cpu(q, keys, meta, requests: list[int]):
    """The CPU path's tiled attention for `requests`: the compiled kernel where it fits, else
    torch's (same arguments, same results)."""
    from vllm_focus.kernels.cpu import tiled_attention_cpu

    if _compiled_fits(q, keys, meta, requests):
        from vllm_focus.kernels.cpu_compiled import tiled_attention_compiled

        return tiled_attention_compiled
    return tiled_attention_cpu


class FocusAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = "decoder",
        kv_sharing_target_layer_name: str | None = None,
        **unsupported: Any,
    ) -> None:
        for name, value in (
            ("alibi_slopes", alibi_slopes),
            ("sliding_window", sliding_window),
            ("logits_soft_cap", logits_soft_cap),
            ("kv_sharing_target_layer_name", kv_sharing_target_layer_name),
        ):
            if value is not None:
                raise NotImplementedError(f"the FOCUS attention backend does not support {name}")
        if kv_cache_dtype != "auto":
            raise NotImplementedError(
                f"the FOCUS attention backend keeps the KV cache in the model dtype; "
                f"kv_cache_dtype {kv_cache_dtype!r} is not supported"
            )
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_sharing_target_layer_name = None
        self._layer_index: int | None = None
        # CPU path: CPU_ATTN's ISA where this cache uses its layout (False: not probed yet).
        self._isa: str | None | bool = False
        # Both paths: the batched selection, with its cache of block means.
        self.selector = selection.SparseSelector()
        self._model_heads: int | None = None

    @property
    def model_heads(self) -> int:
        """Query heads of the whole model (this rank holds num_heads of them)."""
        if self._model_heads is None:
            from vllm.distributed import get_tensor_model_parallel_world_size

            self._model_heads = self.num_heads * get_tensor_model_parallel_world_size()
        return self._model_heads

    def _cpu_isa(self, kv_cache: torch.Tensor) -> str | None:
        """CPU_ATTN's ISA when this layer's cache is in its layout (probed once), else None."""
        if self._isa is False:
            from vllm_focus.kernels.cpu_native import cache_isa

            self._isa = cache_isa(kv_cache, self.head_size)
        return self._isa

    def _views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) as [blocks, block_size, kv_heads, head_size] strided views."""
        if not uses_triton_path(kv_cache.device) and self._cpu_isa(kv_cache):
            from vllm_focus.kernels.cpu_native import native_views

            return native_views(kv_cache, self.head_size)
        return split_kv_cache(kv_cache, self.head_size)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Write the K/V of the tokens whose slot is >= 0 (Focus leaves some unwritten): on the
        Triton path without a host sync (`kernels.cache_write`); on a CPU in CPU_ATTN's layout
        with its own write, else the torch twin."""
        count = slot_mapping.shape[0]
        key, value = key[:count], value[:count]
        if uses_triton_path(key.device):
            from vllm_focus.kernels.cache_write import write_kv

            write_kv(key, value, *split_kv_cache(kv_cache, self.head_size), slot_mapping)
        elif isa := self._cpu_isa(kv_cache):
            from vllm_focus.kernels.cpu_native import write_kv_native

            write_kv_native(key, value, kv_cache, slot_mapping, isa)
        else:
            from vllm_focus.kernels.reference import write_kv_ref

            write_kv_ref(key, value, *split_kv_cache(kv_cache, self.head_size), slot_mapping)

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: FocusMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None:  # profiling / dummy runs
            return output
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the FOCUS attention backend has no fused output quant")
        meta = attn_metadata
        count = meta.num_actual_tokens
        q = query[:count]
        keys, values = self._views(kv_cache)
        index = self._index(layer)
        wanted = self._sink_requests(index, meta)
        if uses_triton_path(q.device):
            triton_path.forward(
                self, index, q, key[:count], value[:count], keys, values, meta, output[:count],
                wanted, _all_reduce,
            )  # fmt: skip
            return output
        # Per request: every key (the compiled kernel over whole-sequence tiles in a within-block
        # step; CPU_ATTN's C++ kernel, or the torch path off its layout, for first forwards and
        # refreshes), every key with the sink scores (this is its last dense layer), or the
        # pruned key set of a sparse layer (batched over the sparse requests), or Sparse-dLLM's
        # kept keys and the block, or SparseD's block pattern.
        out = output[:count]
        sparse = self._sparse_requests(index, meta)
        kept = sparse_dllm.requests_in(meta, sparse_dllm.ATTEND)
        own = set(sparse) | set(wanted) | set(kept) | set(sparsed.requests_in(meta, sparsed.ATTEND))
        every = [r for r in range(len(meta.seq_lens_cpu)) if r not in own]
        quick = [r for r in every if _compiled_fits(q, keys, meta, [r])]
        rest = [r for r in every if r not in quick]
        if rest:
            isa = self._cpu_isa(kv_cache)
            if isa:
                self._dense_native(q, kv_cache, meta, rest, out, isa)
            else:
                self._every_key(q, keys, values, meta, out, rest)
        args = (q, keys, values, meta.block_table)
        starts = meta.query_start_loc_cpu
        if quick:
            from vllm_focus.kernels.cpu_compiled import tiled_attention_compiled

            tiles, _ = selection.whole_sequences(meta, quick, q.device)
            tiled_attention_compiled(*args, tiles, starts, self.scale, out)
        if wanted:  # every key, as whole-sequence tiles, and the mass per prompt key
            tiles, lengths = selection.whole_sequences(meta, wanted, q.device)
            _, scores = _tiled_cpu(q, keys, meta, wanted)(
                *args, tiles, starts, self.scale, out, lengths
            )
            selection.keep_sinks(meta.focus, wanted, _all_reduce(scores))
        if sparse:
            tiles = self.selector.key_tiles(q, keys, self.scale, meta, sparse, _all_reduce)
            _tiled_cpu(q, keys, meta, sparse)(*args, tiles, starts, self.scale, out)
        if kept:  # over each request's compacted kept K/V and its block
            sparse_dllm.attend_compact(
                q, key[:count], value[:count], meta, kept, index, self.scale, out,
                _tiled_cpu(q, keys, meta, kept),
            )  # fmt: skip
        if selecting := sparse_dllm.requests_in(meta, sparse_dllm.SELECT):
            sparse_dllm.select(q, key[:count], meta, selecting, index, _all_reduce)
            sparse_dllm.compact(key[:count], value[:count], meta, selecting, index)
        sparsed.run_layer(
            q, key[:count], value[:count], meta, index, self.scale, self.model_heads, out
        )
        return output

    def _every_key(self, q, keys, values, meta, out, requests) -> None:
        """The torch path's attention of `requests` over every key (`kernels.cpu`)."""
        from vllm_focus.kernels.cpu import paged_attention_cpu

        key_positions, cu_k = meta.dense_keys()
        paged_attention_cpu(
            q, keys, values, meta.block_table, meta.query_req, key_positions, cu_k, self.scale,
            out=out, requests=requests,
        )  # fmt: skip

    def _index(self, layer) -> int:
        if self._layer_index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer_index = extract_layer_index(layer.layer_name)
        return self._layer_index

    def _dense_native(self, q, kv_cache, meta: FocusMetadata, dense, out, isa) -> None:
        """Attention of the `dense` requests over every key, by CPU_ATTN's C++ kernel: the
        sub-batch is the Triton path's `dense_subset`, its schedule built once per forward and
        shared by the layers."""
        from vllm_focus.kernels.cpu_native import dense_attention_native, dense_metadata

        batch = triton_path.dense_subset(meta, dense)
        key = ("native schedule", tuple(dense))
        schedule = meta.step_cache.get(key)
        if schedule is None:
            schedule = meta.step_cache[key] = dense_metadata(
                self.num_heads, self.num_kv_heads, self.head_size, q.dtype,
                batch.query_start_loc, batch.seq_lens, isa,
            )  # fmt: skip
        args = (batch.query_start_loc, batch.seq_lens, batch.block_table, self.scale, schedule)
        if batch.rows is None:
            dense_attention_native(q, kv_cache, out, *args)
            return
        result = torch.empty((batch.rows.numel(), *q.shape[1:]), dtype=out.dtype, device=out.device)
        dense_attention_native(q[batch.rows], kv_cache, result, *args)
        out[batch.rows] = result

    @staticmethod
    def _sparse_requests(index: int, meta: FocusMetadata) -> list[int]:
        """The requests that attend a pruned key set at this layer."""
        if meta.focus is None:
            return []
        return [
            r
            for r, plan in enumerate(meta.focus.plans)
            if plan is not None and index >= plan.dense_layers
        ]

    @staticmethod
    def _sink_requests(index: int, meta: FocusMetadata) -> list[int]:
        """The Focus requests whose last dense layer this is: their sinks are found here."""
        if meta.focus is None:
            return []
        return [
            r
            for r, plan in enumerate(meta.focus.plans)
            if plan is not None and index == plan.dense_layers - 1
        ]
