"""The FOCUS backend's CPU kernels that the engine takes on this machine: vLLM's C++ CPU
attention on a cache in CPU_ATTN's layout (written by its own cache write), read back through
the strided views the rest of the CPU path uses, and the batched attention over tiled key sets
(`tiled_attention_cpu`) — each against the torch twins."""

from __future__ import annotations

import pytest
import torch

from tests.test_kernel_sparse_attention import KEY_SETS, NUM_QUERIES, SEQ_LENS, _query_start
from vllm_focus.kernels import cpu, cpu_compiled
from vllm_focus.kernels.reference import (
    sparse_paged_attention_ref,
    tiled_sparse_attention_ref,
)
from vllm_focus.testing.paged import HEAD_DIM, paged_case, rel_rms

LAYOUTS = [(4, 4), (7, 1), (6, 2)]
# The batched tiled attention: torch's (gathers of whole blocks) and the compiled C kernel's
# (rows read in place), the same arguments and results.
TILED = {"torch": cpu.tiled_attention_cpu, "compiled": cpu_compiled.tiled_attention_compiled}


@pytest.mark.parametrize("impl", list(TILED))
@pytest.mark.parametrize("num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize("key_set", list(KEY_SETS))
def test_batched_tiles_match_twin(impl, num_heads, num_kv_heads, key_set):
    """Ranges cut mid-tile, point lists with skipped entries, several splits per request, a
    request with no key set left untouched (NaN rows stay NaN)."""
    from vllm_focus.kernels.sparse_attention import key_tiles

    case = paged_case(SEQ_LENS, NUM_QUERIES, num_heads, num_kv_heads, 1.0, seed=num_heads)
    starts = _query_start(NUM_QUERIES)
    keys = key_tiles(KEY_SETS[key_set], starts, "cpu")
    args = (case["q"], case["key_cache"], case["value_cache"], case["block_table"])
    scale = HEAD_DIM**-0.5
    got, _ = TILED[impl](*args, keys, starts, scale, torch.full_like(case["q"], float("nan")))
    query_start = torch.tensor(starts, dtype=torch.int32)
    want = tiled_sparse_attention_ref(
        *args, query_start, keys, scale, torch.full_like(case["q"], float("nan"))
    )
    assert torch.equal(got.isnan(), want.isnan())
    assert not got[keys.rows].isnan().any()
    assert rel_rms(got[keys.rows], want[keys.rows]) < 1e-5


@pytest.mark.parametrize("num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key_set", ["sparse", "runs"])
def test_compiled_tiles_on_native_layout(num_heads, num_kv_heads, dtype, key_set):
    """The C kernel on CPU_ATTN's layout (K transposed per block: its fast path) and on
    bfloat16 (widened on load, rounded to nearest even on store), against the twin in float32
    on the same values; query rows with a non-contiguous row stride, as the engine's are."""
    from vllm_focus.kernels.cpu_native import cache_isa
    from vllm_focus.kernels.sparse_attention import key_tiles
    from vllm_focus.testing.paged import BLOCK_SIZE

    case = paged_case(SEQ_LENS, NUM_QUERIES, num_heads, num_kv_heads, 1.0, seed=5, dtype=dtype)
    isa = cache_isa(torch.zeros(2, num_kv_heads, BLOCK_SIZE, 2 * HEAD_DIM, dtype=dtype), HEAD_DIM)
    assert isa is not None
    _, (keys, values) = _native_cache(case, num_kv_heads, BLOCK_SIZE, isa)
    assert keys.stride(1) == 1  # the transposed K the fast path reads
    starts = _query_start(NUM_QUERIES)
    tiles = key_tiles(KEY_SETS[key_set], starts, "cpu")
    wide = torch.randn(case["q"].shape[0], num_heads + 2, HEAD_DIM, dtype=dtype)
    q = wide[:, :num_heads]  # row stride (num_heads + 2) x head_dim, as a slice of qkv
    q.copy_(case["q"])
    scale = HEAD_DIM**-0.5
    got, _ = cpu_compiled.tiled_attention_compiled(
        q, keys, values, case["block_table"], tiles, starts, scale, torch.zeros_like(q)
    )
    floats = (q.float(), keys.float(), values.float(), case["block_table"])
    want = tiled_sparse_attention_ref(
        *floats, torch.tensor(starts, dtype=torch.int32), tiles, scale,
        torch.zeros(q.shape),
    )  # fmt: skip
    assert got.dtype == dtype
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_rms(got[tiles.rows].float(), want[tiles.rows]) < bound


def _native_cache(case, num_kv_heads, block_size, isa):
    """The case's K/V written through CPU_ATTN's own cache write into a cache of its layout."""
    from vllm_focus.kernels.cpu_native import native_views, write_kv_native

    blocks = case["key_cache"].shape[0]
    kv = torch.full(
        (blocks, num_kv_heads, block_size, 2 * HEAD_DIM), float("nan"), dtype=case["q"].dtype
    )
    slots = torch.arange(blocks * block_size)
    rows = case["key_cache"].reshape(-1, num_kv_heads, HEAD_DIM)
    write_kv_native(rows, case["value_cache"].reshape_as(rows), kv, slots, isa)
    return kv, native_views(kv, HEAD_DIM)


@pytest.mark.parametrize("num_heads, num_kv_heads", LAYOUTS)
def test_native_layout_and_dense_kernel_match_twin(num_heads, num_kv_heads):
    """The probe finds the layout; the views read back exactly what was written; vLLM's C++
    kernel's bidirectional attention equals the twin's; a slot of -1 is not written."""
    from vllm_focus.kernels.cpu_native import (
        cache_isa,
        dense_attention_native,
        dense_metadata,
        write_kv_native,
    )
    from vllm_focus.testing.paged import BLOCK_SIZE

    seq_lens, queries = [63, 700, 15], [3, 40, 15]
    case = paged_case(seq_lens, queries, num_heads, num_kv_heads, 1.0, seed=7)
    probe = torch.zeros(2, num_kv_heads, BLOCK_SIZE, 2 * HEAD_DIM)
    isa = cache_isa(probe, HEAD_DIM)
    assert isa is not None, "CPU_ATTN's layout was not recognised on this machine"
    kv, (keys, values) = _native_cache(case, num_kv_heads, BLOCK_SIZE, isa)
    assert torch.equal(keys, case["key_cache"]) and torch.equal(values, case["value_cache"])

    starts = torch.tensor(_query_start(queries), dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    scale = HEAD_DIM**-0.5
    schedule = dense_metadata(num_heads, num_kv_heads, HEAD_DIM, torch.float32, starts, seq, isa)
    got = torch.empty_like(case["q"])
    dense_attention_native(case["q"], kv, got, starts, seq, case["block_table"], scale, schedule)
    want = sparse_paged_attention_ref(
        case["q"], keys, values, case["block_table"], case["query_req"],
        case["key_positions"], case["cu_seqlens_k"], scale,
    )  # fmt: skip
    assert rel_rms(got, want) < 1e-5

    before = kv.clone()
    ones = torch.ones(2, num_kv_heads, HEAD_DIM)
    write_kv_native(ones, ones, kv, torch.tensor([-1, 5]), isa)
    changed = (kv != before) & ~(kv.isnan() & before.isnan())
    assert torch.equal(keys[0, 5], ones[1]) and torch.equal(values[0, 5], ones[1])
    assert int(changed.sum()) <= 2 * num_kv_heads * HEAD_DIM  # only slot 5's K and V


def test_head_major_cache_is_read_row_by_row():
    """In CPU_ATTN's layout a range of blocks is not one strided run of rows: the CPU path's
    readers gather rows instead of viewing a span (and get the same rows)."""
    from vllm_focus.kernels.cpu_native import native_views

    kv = torch.randn(6, 2, 16, 2 * HEAD_DIM)
    keys, _ = native_views(kv, HEAD_DIM)
    table = torch.tensor([[2, 3, 4]], dtype=torch.int32)
    positions = torch.arange(40)
    got = cpu.request_keys(keys, table, 0, positions)
    want = keys[table[0, positions // 16].long(), positions % 16]
    assert torch.equal(got, want)


@pytest.mark.parametrize("num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize(
    "source",
    ["tiled pass", "compiled", "compiled, K alone", "compiled, two passes",
     "compiled, K alone, two passes"],
)  # fmt: skip
def test_sink_scores_match_twin(num_heads, num_kv_heads, source, monkeypatch):
    """At a sink layer, the mass per prompt key of the wanted requests only (request 1 does not
    ask), the requests' query counts different (padding not counted): from the batched tiled
    pass over whole sequences (torch), or by the C kernel, with the layer's output or without
    it (K alone), in one pass (the prompt keys' scores stashed) or, where the stash would be
    too big, two."""
    from vllm_focus.kernels.reference import sink_scores_ref
    from vllm_focus.kernels.sparse_attention import key_tiles

    seq_lens, num_queries, prompt_lens = [63, 200, 15], [3, 1, 15], [40, 199, 1]
    case = paged_case(seq_lens, num_queries, num_heads, num_kv_heads, 1.0, seed=11)
    scale = HEAD_DIM**-0.5
    wanted = [40, 0, 1]
    starts = _query_start(num_queries)
    if source == "tiled pass":
        ranges = [(r, [(0, n)], None) for r, n in enumerate(seq_lens) if wanted[r]]
        args = (case["q"], case["key_cache"], case["value_cache"], case["block_table"])
        _, got = cpu.tiled_attention_cpu(
            *args, key_tiles(ranges, starts, "cpu"), starts, scale,
            torch.empty_like(case["q"]), wanted,
        )  # fmt: skip
    elif source.startswith("compiled"):
        if "two passes" in source:
            monkeypatch.setattr(cpu_compiled, "STASH_FLOATS", 0)
        ranges = [(r, [(0, n)], None) for r, n in enumerate(seq_lens) if wanted[r]]
        args = (case["q"], case["key_cache"], case["value_cache"], case["block_table"])
        out = None if "K alone" in source else torch.empty_like(case["q"])
        _, got = cpu_compiled.tiled_attention_compiled(
            *args, key_tiles(ranges, starts, "cpu"), starts, scale, out, wanted
        )
        if out is not None:
            want_out, _ = cpu.tiled_attention_cpu(
                *args, key_tiles(ranges, starts, "cpu"), starts, scale, torch.empty_like(out)
            )
            rows = [0, 1, 2, 18]  # the wanted requests' query rows
            assert rel_rms(out[rows], want_out[rows]) < 1e-5
    want = sink_scores_ref(
        case["q"], torch.tensor(starts, dtype=torch.int32), case["key_cache"],
        case["block_table"], torch.tensor(seq_lens, dtype=torch.int32),
        torch.tensor(prompt_lens, dtype=torch.int32), scale,
    )  # fmt: skip
    assert got.shape == (3, 40)
    for r, length in enumerate(wanted):
        assert torch.isinf(got[r, length:]).all()
        if length:
            assert rel_rms(got[r, :length], want[r, :length]) < 1e-5


@pytest.mark.parametrize("stash", [True, False])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (7, 1)])
@pytest.mark.parametrize("key_set", ["sparse", "runs"])
def test_compiled_mass_over_a_pruned_key_set(num_heads, num_kv_heads, stash, key_set, monkeypatch):
    """The mass over any key set (kept ranges, sink points, a point repeated inside a range,
    skipped points, runs of neighbouring points) by the C kernel in one pass or two, against
    the torch tiled path's."""
    from vllm_focus.kernels.sparse_attention import key_tiles

    if not stash:
        monkeypatch.setattr(cpu_compiled, "STASH_FLOATS", 0)
    case = paged_case(SEQ_LENS, NUM_QUERIES, num_heads, num_kv_heads, 1.0, seed=21)
    starts = _query_start(NUM_QUERIES)
    keys = key_tiles(KEY_SETS[key_set], starts, "cpu")  # "sparse": 5, 9, 300 inside ranges
    lengths = [min(n, 150) for n in SEQ_LENS]
    args = (case["q"], case["key_cache"], case["value_cache"], case["block_table"])
    scale = HEAD_DIM**-0.5
    got_out, got = cpu_compiled.tiled_attention_compiled(
        *args, keys, starts, scale, torch.zeros_like(case["q"]), lengths
    )
    want_out, want = cpu.tiled_attention_cpu(
        *args, keys, starts, scale, torch.zeros_like(case["q"]), lengths
    )
    assert torch.equal(got.isinf(), want.isinf())
    finite = ~want.isinf()
    assert rel_rms(got[finite], want[finite]) < 1e-5
    assert rel_rms(got_out[keys.rows], want_out[keys.rows]) < 1e-5


@pytest.mark.parametrize("impl", list(TILED))
def test_no_point_tiles_and_no_points(impl):
    """`num_sinks` 0: the selection hands over an empty point list and no point tiles; the
    batched path attends the ranges alone (an engine once died here)."""
    import dataclasses

    from vllm_focus.kernels.sparse_attention import key_tiles

    case = paged_case(SEQ_LENS, NUM_QUERIES, 4, 4, 1.0, seed=3)
    starts = _query_start(NUM_QUERIES)
    keys = key_tiles(KEY_SETS["whole"], starts, "cpu")
    empty = dataclasses.replace(keys, points=torch.empty(0, dtype=torch.int32))
    args = (case["q"], case["key_cache"], case["value_cache"], case["block_table"])
    scale = HEAD_DIM**-0.5
    got, _ = TILED[impl](*args, empty, starts, scale, torch.empty_like(case["q"]))
    want, _ = TILED[impl](*args, keys, starts, scale, torch.empty_like(case["q"]))
    assert torch.equal(got, want)


def test_compiled_kernel_builds_here_and_can_be_turned_off(tmp_path):
    """The C kernel compiles on this machine (CI has a C compiler, as vLLM's CPU users do), so
    the engine's sparse layers take it; `VLLM_FOCUS_CPU_KERNEL=torch` keeps the torch kernels,
    and a missing compiler falls back to them with a warning instead of failing."""
    import os
    import subprocess
    import sys

    assert cpu_compiled.available()
    probe = "from vllm_focus.kernels import cpu_compiled; print(cpu_compiled.available())"
    env = dict(os.environ, VLLM_FOCUS_CACHE=str(tmp_path))
    for extra, expected in (({}, "True"), ({"VLLM_FOCUS_CPU_KERNEL": "torch"}, "False"),
                            ({"CC": str(tmp_path / "no-such-cc")}, "False")):  # fmt: skip
        run = subprocess.run(
            [sys.executable, "-c", probe], env={**env, **extra}, capture_output=True, text=True
        )
        assert run.stdout.strip() == expected, run.stderr
    assert list(tmp_path.glob("focus_cpu-*.so"))  # built once into the cache folder


@pytest.mark.parametrize("k", [0, 1, 5, 16, 40])
def test_top_ranked_is_the_stable_order_prefix(k):
    """The sinks' top-k (no whole-row sort) equals the first k of the stable descending sort
    `selection.rank` gives, on rows full of ties, -inf tails (short prompts) and k past a
    row's width."""
    from vllm_focus.attention import selection

    generator = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (6, 33), generator=generator).float()
    scores[1, 10:] = float("-inf")
    scores[2] = 1.0
    scores[3, :] = float("-inf")
    got = selection.top_ranked(scores, k)
    assert torch.equal(got, selection.rank(scores)[:, :k])
