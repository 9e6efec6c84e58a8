"""The CPU path's compiled tiled attention (`focus_cpu.c`), loaded through ctypes.

`kernels.cpu.tiled_attention_cpu` gathers a request's kept cache blocks into new tensors and
attends them with torch matmuls: correct, but at a sparse layer of a within-block step most of
its time is the gathers and the small ops around them (about 1 ms per request and layer in
`benchmarks/throughput.py`'s profile), not the attention. The C kernel reads the kept rows
where they lie in the paged cache, one OpenMP task per (request, KV head), and returns the same
result (tests hold it to `tiled_attention_cpu` and the torch twins).

The source is compiled at first use with the machine's C compiler (`cc`, or `$CC`) for the
machine it runs on (`-march=native`), into `$VLLM_FOCUS_CACHE` (default
`~/.cache/vllm_focus`), one file per source, flags and CPU; concurrent processes (tensor
parallel workers) compile to private names and rename. OpenMP comes from the libgomp torch has
already loaded, so the kernel uses torch's threads and thread count. Where no compiler works,
or `VLLM_FOCUS_CPU_KERNEL=torch`, `available()` is False and the backend keeps the torch
implementation; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("focus_cpu.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11", "-ffp-contract=fast",
         "-fno-math-errno", "-fno-trapping-math", "-mprefer-vector-width=512"]  # fmt: skip

# With sink mass, each thread keeps the scores of its task's prompt keys (query rows x keys)
# so that one pass over K gives the mass; above this many floats it takes two passes instead.
STASH_FLOATS = 4 << 20


class _Strides(ctypes.Structure):
    _fields_ = [("block", ctypes.c_int64), ("row", ctypes.c_int64),
                ("head", ctypes.c_int64), ("dim", ctypes.c_int64)]  # fmt: skip


class _Args(ctypes.Structure):
    """`focus_args_t` of focus_cpu.c, field for field."""

    _fields_ = [
        ("q", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("ks", _Strides),
        ("vs", _Strides),
        ("block_table", ctypes.c_void_p),
        ("table_stride", ctypes.c_int64),
        ("tiles", ctypes.c_void_p),
        ("points", ctypes.c_void_p),
        ("reqs", ctypes.c_void_p),
        ("num_reqs", ctypes.c_int64),
        ("mass", ctypes.c_void_p),
        ("mass_width", ctypes.c_int64),
        ("q_stride", ctypes.c_int64),
        ("out_stride", ctypes.c_int64),
        ("num_heads", ctypes.c_int32),
        ("num_kv_heads", ctypes.c_int32),
        ("head_dim", ctypes.c_int32),
        ("block_size", ctypes.c_int32),
        ("bf16", ctypes.c_int32),
        ("want_out", ctypes.c_int32),
        ("splits", ctypes.c_int32),
        ("stash_floats", ctypes.c_int64),
        ("scale", ctypes.c_float),
    ]


def _cache_dir() -> Path:
    return Path(os.environ.get("VLLM_FOCUS_CACHE", Path.home() / ".cache" / "vllm_focus"))


def _compile(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    ident = hashlib.sha256(
        source + " ".join([compiler, *FLAGS, platform.machine(), platform.processor()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"focus_cpu-{ident}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, private = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", private, "-lm"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(private, target)
    finally:
        if os.path.exists(private):
            os.unlink(private)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("VLLM_FOCUS_CPU_KERNEL", "compiled") == "torch":
        logger.info("FOCUS CPU path: VLLM_FOCUS_CPU_KERNEL=torch, using the torch kernels")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("FOCUS CPU path: no C compiler found (cc, gcc, $CC); using the slower "
                       "torch kernels for sparse attention")  # fmt: skip
        return None
    try:
        path = _compile(compiler)
        library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("FOCUS CPU path: compiling %s failed (%s); using the slower torch "
                       "kernels for sparse attention", SOURCE.name, detail)  # fmt: skip
        return None
    library.focus_tiled_attention.argtypes = [ctypes.POINTER(_Args)]
    library.focus_tiled_attention.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether the compiled kernel can run here (compiles it on first call)."""
    return _library() is not None


def supports(q: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these shapes and dtypes: float32 or bfloat16 (the same for
    queries and cache), head size and cache block size multiples of 16, at most 256."""
    head_dim, block_size = q.shape[-1], key_cache.shape[1]
    return (
        q.dtype in (torch.float32, torch.bfloat16)
        and key_cache.dtype == q.dtype
        and all(size % 16 == 0 and size <= 256 for size in (head_dim, block_size))
    )


def _strides(view: torch.Tensor) -> _Strides:
    return _Strides(*view.stride())


def _requests(tiles, query_start_loc_cpu: list[int]) -> torch.Tensor:
    """[NR, 5] int32 (request, first query row, end row, first tile, end tile)."""
    from vllm_focus.kernels.cpu import request_tile_spans

    spans = request_tile_spans(tiles)
    rows = [
        (r, query_start_loc_cpu[r], query_start_loc_cpu[r + 1], low, high)
        for r, (low, high) in spans.items()
    ]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 5)


def tiled_attention_compiled(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    tiles,
    query_start_loc_cpu: list[int],
    scale: float,
    out: torch.Tensor | None,
    sink_prompt_lens: list[int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`kernels.cpu.tiled_attention_cpu`'s arguments and result, by the C kernel. With `out`
    None only the sink scores are computed (K is read, V is not)."""
    from vllm_focus.kernels.cpu import empty_sink_scores

    library = _library()
    if library is None:
        raise RuntimeError("the compiled FOCUS CPU kernel is not available here")
    if not supports(q, key_cache):
        raise TypeError(
            f"the compiled FOCUS CPU kernel takes float32 or bfloat16 queries and cache of the "
            f"same dtype, head and block sizes multiples of 16 up to 256; not {q.dtype} / "
            f"{key_cache.dtype}, head {q.shape[-1]}, block {key_cache.shape[1]}"
        )
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    target = out
    if out is not None and (out.stride(2) != 1 or out.stride(1) != out.shape[2]):
        target = torch.empty_like(q)
    reqs = _requests(tiles, query_start_loc_cpu)
    num_kv_heads = key_cache.shape[2]
    table = block_table if block_table.dtype == torch.int32 else block_table.int()
    table = table if table.stride(1) == 1 else table.contiguous()
    tile_table = tiles.tiles.int().contiguous()
    points = tiles.points.int().contiguous()
    mass = None
    if sink_prompt_lens is not None:
        width = max(sink_prompt_lens)
        mass = torch.zeros(reqs.shape[0], num_kv_heads, max(width, 1))
    threads = torch.get_num_threads()
    tasks = max(1, reqs.shape[0] * num_kv_heads)
    splits = 1 if mass is not None or tasks >= threads else -(-threads // tasks)
    args = _Args(
        q=q.data_ptr(),
        out=target.data_ptr() if target is not None else None,
        k=key_cache.data_ptr(),
        v=value_cache.data_ptr(),
        ks=_strides(key_cache),
        vs=_strides(value_cache),
        block_table=table.data_ptr(),
        table_stride=table.stride(0),
        tiles=tile_table.data_ptr(),
        points=points.data_ptr(),
        reqs=reqs.data_ptr(),
        num_reqs=reqs.shape[0],
        mass=mass.data_ptr() if mass is not None else None,
        mass_width=mass.shape[2] if mass is not None else 0,
        q_stride=q.stride(0),
        out_stride=target.stride(0) if target is not None else 0,
        num_heads=q.shape[1],
        num_kv_heads=num_kv_heads,
        head_dim=q.shape[2],
        block_size=key_cache.shape[1],
        bf16=int(q.dtype == torch.bfloat16),
        want_out=int(target is not None),
        splits=splits,
        stash_floats=STASH_FLOATS,
        scale=scale,
    )
    status = library.focus_tiled_attention(ctypes.byref(args))
    if status != 0:
        raise RuntimeError(
            f"the compiled FOCUS CPU kernel failed (status {status}: -1 sizes it does not "
            f"take, -2 out of memory)"
        )
    if target is not None and target is not out:
        out.copy_(target)
    sinks = None
    if mass is not None:
        sinks = empty_sink_scores(sink_prompt_lens)
        summed = mass.sum(1)  # [NR, width]
        for row, req in enumerate(reqs[:, 0].tolist()):
            length = sink_prompt_lens[req]
            sinks[req, :length] = summed[row, :length]
    return out, sinks
