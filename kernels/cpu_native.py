"""vLLM's C++ CPU attention (CPU_ATTN's kernels) for the FOCUS backend's dense work on a CPU.

A refresh, a request's first forward, a dense layer and a request not in Focus attend every
key: the same work vLLM's own CPU backend does, and its C++ kernel does it faster than the
torch path (about 1.7x at 4K in `benchmarks/throughput.py`'s profile). To call that kernel the
FOCUS backend keeps its CPU cache in CPU_ATTN's block layout and writes it with CPU_ATTN's own
cache write. The layout is not a documented interface, so it is checked, not assumed: at the
first forward a small cache is written through `cpu_attn_reshape_and_cache` with a known
pattern, and the layout is used only if it reads back as the two strided views the rest of the
CPU path takes ([blocks, block_size, kv_heads, head_size] for K and for V). Where it does not
(another ISA's packing, a strided cache), the backend keeps its own layout and its torch path.

The layout found on x86 with AVX-512 (ISA `vec` / `vec16`, float32 and bfloat16): per block
and KV head, K as [head_size, block_size] (transposed) followed by V as [block_size,
head_size], in the per-layer tensor vLLM allocates, [blocks, kv_heads, block_size, 2 x head].
"""

from __future__ import annotations

import functools

import torch


def native_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU_ATTN's per-layer cache as (keys, values), each [blocks, block_size, kv_heads,
    head_size] strided views (the CPU path's kernels read any strides)."""
    blocks, heads, block_size, _ = kv_cache.shape
    per_block, per_head = kv_cache.stride(0), kv_cache.stride(1)
    offset = kv_cache.storage_offset()
    shape = (blocks, block_size, heads, head_size)
    keys = kv_cache.as_strided(shape, (per_block, 1, per_head, block_size), offset)
    values = kv_cache.as_strided(
        shape, (per_block, head_size, per_head, 1), offset + block_size * head_size
    )
    return keys, values


def _halves(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (key_cache, value_cache) arguments of CPU_ATTN's kernels, as its backend makes them."""
    blocks, heads, block_size, _ = kv_cache.shape
    return kv_cache.view(blocks, heads, 2 * block_size, -1).chunk(2, dim=2)


def _slabs_contiguous(kv_cache: torch.Tensor) -> bool:
    """Each (block, KV head) slab of the cache is one run of memory, as the views assume."""
    _, _, block_size, width = kv_cache.shape
    return kv_cache.stride(3) == 1 and kv_cache.stride(2) == width


@functools.cache
def native_isa(dtype: torch.dtype, block_size: int, head_size: int) -> str | None:
    """CPU_ATTN's ISA for this cache when its layout reads back as `native_views` (a slot of
    -1 left unwritten), else None: the probe described in the module docstring."""
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(dtype, block_size, head_size)
        heads, rows = 2, 2 * block_size
        cache = torch.zeros(2, heads, block_size, 2 * head_size, dtype=dtype)
        pattern = torch.arange(rows * heads * head_size) % 251 + 1
        key = pattern.reshape(rows, heads, head_size).to(dtype)
        slots = torch.arange(rows)
        slots[1] = -1
        ops.cpu_attn_reshape_and_cache(key, -key, *_halves(cache), slots, isa)
    except Exception:  # no C++ CPU attention in this build, or it refuses the shape
        return None
    keys, values = native_views(cache, head_size)
    want = key.clone()
    want[1] = 0
    got_keys = keys.reshape(rows, heads, head_size)
    got_values = values.reshape(rows, heads, head_size)
    if torch.equal(got_keys, want) and torch.equal(got_values, -want):
        return isa
    return None


def cache_isa(kv_cache: torch.Tensor, head_size: int) -> str | None:
    """The ISA to use for this layer's cache, or None: keep the backend's own layout."""
    if kv_cache.device.type != "cpu" or kv_cache.dim() != 4 or not _slabs_contiguous(kv_cache):
        return None
    return native_isa(kv_cache.dtype, kv_cache.shape[2], head_size)


def write_kv_native(key, value, kv_cache, slot_mapping, isa: str) -> None:
    """CPU_ATTN's cache write (skips slots of -1)."""
    from vllm import _custom_ops as ops

    ops.cpu_attn_reshape_and_cache(key, value, *_halves(kv_cache), slot_mapping, isa)


@functools.lru_cache(maxsize=1)
def _split_kv() -> bool:
    import vllm.envs as envs

    return bool(envs.VLLM_CPU_ATTN_SPLIT_KV)


def dense_metadata(num_heads, num_kv_heads, head_size, dtype, query_start_loc, seq_lens, isa):
    """CPU_ATTN's work schedule for one batch of requests attending every key (causal=False)."""
    from vllm import _custom_ops as ops

    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=seq_lens.numel(),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_size,
        seq_lens=seq_lens,
        dtype=dtype,
        query_start_loc=query_start_loc,
        causal=False,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=_split_kv(),
    )


def dense_attention_native(
    q, kv_cache, out, query_start_loc, seq_lens, block_table, scale, schedule
) -> None:
    """Bidirectional attention of q [T, H, D] over every key of each request, into out."""
    from vllm import _custom_ops as ops

    key_cache, value_cache = _halves(kv_cache)
    ops.cpu_attention_with_kv_cache(
        query=q,
        key_cache=key_cache,
        value_cache=value_cache,
        output=out,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        scale=scale,
        causal=False,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=block_table,
        softcap=0,
        scheduler_metadata=schedule,
        s_aux=None,
    )
