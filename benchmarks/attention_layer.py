"""One layer of one within-block step: Focus attention vs dense attention over the same cache.

For each prompt length and head layout (LLaDA-8B 32/32x128, Dream-7B 28/4x128 on a GPU in
bfloat16; on the CPU the benchmark models' 4/4x64 and 7/1x64 in float32, `--layouts`) and
one request with G = 256 response tokens:

- dense, Fast-dLLM `dual`: the block's B = 32 queries over all P + G keys (torch SDPA on
  contiguous K/V: the fastest dense attention torch offers, no paging);
- focus: |A| = 3 queries over the kept keys (keep_ratio of the prompt in blocks of 64, 16
  sinks, the response) on the paged cache, plus the block scoring of |F| = 1 focus query;
- also: |A| queries over all keys (a dense layer of Focus) and the sink scoring (once per
  step, at the last dense layer); on CUDA a refresh's layer, all P + G queries, through
  vLLM's unified attention (where vLLM is installed) and SDPA, and SparseD's layer after its
  pattern step (all P + G queries over 0.3 of the 128-key blocks: the block-sparse kernel and
  its torch twin); on the CPU, the refresh's SDPA and SparseD's torch twin (what the CPU path
  runs); and each kernel's achieved K/V read bandwidth against `--peak-gbps`.

The Focus path is the one the FOCUS backend runs: on CUDA the Triton path (the tiled sparse
kernel, block scores from block means on the device, the sink layer through the tiled kernel's
log-sum-exp and the mass kernel; vllm_focus/attention/triton_path.py); on the CPU the
in-place torch path (kernels/cpu.py), where block scores come from block means computed once
per refresh (reported separately; a within-block step only reads them) and the sink scores
from the dense layer's own attention pass. Prints a table and the dual/focus ratio; `--out`
writes JSON. `--device interpret` runs the Triton kernels through Triton's interpreter on the
CPU at small sizes (a smoke test of the kernel path, not a timing).

    python benchmarks/attention_layer.py                   # cuda: 8K, 16K, 32K
    python benchmarks/attention_layer.py --device cpu      # 1K .. 16K
    TRITON_INTERPRET=1 python benchmarks/attention_layer.py --device interpret --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from tqdm import tqdm

from vllm_focus.testing.paged import rel_rms

# (query heads, KV heads, head dim)
LAYOUTS = {
    "llada-8b": (32, 32, 128),
    "dream-7b": (28, 4, 128),
    "llada-mha": (4, 4, 64),
    "dream-gqa7": (7, 1, 64),
}
DEFAULTS = {
    "cuda": (["llada-8b", "dream-7b"], [8192, 16384, 32768]),
    "cpu": (["llada-mha", "dream-gqa7"], [1024, 2048, 4096, 8192, 16384]),
    "interpret": (["llada-mha", "dream-gqa7"], [512]),
}
CACHE_BLOCK = {"cuda": 16, "cpu": 128}  # vLLM's KV-cache block size per platform
GEN = 256
BLOCK_QUERIES = 32
ACTIVE = 3
PROMPT_BLOCK = 64
SINKS = 16
SPARSED_BLOCK, SPARSED_DENSITY = 128, 0.3  # SparseD's long-prompt recipe


def _timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds of `fn()` after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _paged(keys: torch.Tensor, values: torch.Tensor, generator: torch.Generator):
    """Contiguous [T, Hkv, D] K/V laid into a paged cache as the engine holds it for the FOCUS
    backend ([blocks, block_size, kv_heads, K|V]: a block's rows one after another), its
    blocks consecutive but for a few swapped pairs (a fresh request's blocks mostly are)."""
    total, num_kv_heads, head_dim = keys.shape
    block_size = CACHE_BLOCK[keys.device.type]
    num_blocks = -(-total // block_size)
    order = torch.arange(num_blocks)
    swaps = torch.randint(0, num_blocks, (2, max(1, num_blocks // 64)), generator=generator)
    for a, b in swaps.T.tolist():
        order[[a, b]] = order[[b, a]]
    order = order.to(keys.device)
    cache = torch.zeros(
        num_blocks, block_size, num_kv_heads, 2 * head_dim, dtype=keys.dtype, device=keys.device
    )
    positions = torch.arange(total, device=keys.device)
    blocks, rows = order[positions // block_size], positions % block_size
    cache[blocks, rows, :, :head_dim] = keys
    cache[blocks, rows, :, head_dim:] = values
    key_cache, value_cache = cache[..., :head_dim], cache[..., head_dim:]
    return key_cache, value_cache, order.to(torch.int32)[None, :]


def _kept_keys(prompt: int, keep_ratio: float, generator: torch.Generator):
    """A Focus key set: random top blocks within keep_ratio, sinks, the response. Returns
    the positions (deduplicated) and the same set as (ranges, sinks) for the tiled kernel."""
    num_blocks = -(-prompt // PROMPT_BLOCK)
    kept = max(1, -(-int(keep_ratio * prompt) // PROMPT_BLOCK))
    blocks = torch.randperm(num_blocks, generator=generator)[:kept]
    positions = (blocks[:, None] * PROMPT_BLOCK + torch.arange(PROMPT_BLOCK)).flatten()
    positions = positions[positions < prompt]
    sinks = torch.randint(0, prompt, (SINKS,), generator=generator)
    sinks = sinks[~torch.isin(sinks // PROMPT_BLOCK, blocks)].unique()
    ranges = [(int(b) * PROMPT_BLOCK, min(prompt, int(b) * PROMPT_BLOCK + PROMPT_BLOCK))
              for b in blocks.sort().values]  # fmt: skip
    ranges.append((prompt, prompt + GEN))
    keys = torch.cat([positions, sinks, torch.arange(prompt, prompt + GEN)])
    return torch.unique(keys), (ranges, sinks.tolist())


def _focus_ops(device: str, scale: float):
    """(attention, per-step block scoring, sink layer, block means or None) as the FOCUS
    backend runs them on `device`; each takes the argument dicts built in run_case."""
    if device in ("cuda", "interpret"):
        from vllm_focus.attention.triton_path import block_means as device_means
        from vllm_focus.kernels.cpu import block_scores_from_means
        from vllm_focus.kernels.sink_scores import attention_and_sink_scores
        from vllm_focus.kernels.sparse_attention import tiled_sparse_attention

        def attention(a):
            out = torch.empty_like(a["q"])
            return tiled_sparse_attention(
                a["q"], a["key_cache"], a["value_cache"], a["block_table"],
                a["query_start"], a["tiles"], scale, out,
            )  # fmt: skip

        def sink_layer(a, s):
            # The sink layer on the Triton path: its dense attention through the tiled kernel
            # (which returns each row's log-sum-exp), then the mass per prompt key.
            return attention_and_sink_scores(
                a["q"], a["query_start"], a["key_cache"], a["value_cache"], a["block_table"],
                a["tiles"], s["prompt_lens"], int(s["prompt_lens"][0]), scale,
                torch.empty_like(a["q"]),
            )  # fmt: skip

        def means(b):
            return device_means(
                b["key_cache"], b["block_table"], 0, int(b["prompt_lens"][0]), PROMPT_BLOCK
            )

        return (
            attention,
            lambda b, m: block_scores_from_means(b["q"], m, scale),
            sink_layer,
            means,
        )
    from vllm_focus.kernels.cpu import (
        block_scores_from_means,
        paged_attention_cpu,
        prompt_block_means,
    )

    def means(b):
        return prompt_block_means(
            b["key_cache"], b["block_table"], 0, int(b["prompt_lens"][0]), PROMPT_BLOCK
        )

    def cpu_args(a):
        return {k: v for k, v in a.items() if k not in ("query_start", "tiles")}

    return (
        lambda a: paged_attention_cpu(**cpu_args(a))[0],
        lambda b, m: block_scores_from_means(b["q"], m, scale),
        # The sink layer: dense attention that also sums the mass per prompt key.
        lambda a, s: paged_attention_cpu(**cpu_args(a), sink_prompt_lens=s["prompt_lens"].tolist())[
            1
        ],
        means,
    )


def _refresh_ms(device, q, key_cache, value_cache, block_table, total, scale, repeats):
    """A refresh's layer on the Triton path: all P + G queries through vLLM's unified
    attention (None where vLLM is not installed, as on the lent GPU machine)."""
    try:
        from vllm_focus.attention.triton_path import DenseBatch, dense_attention
    except ImportError:
        return None
    try:
        import vllm  # noqa: F401
    except ImportError:
        return None
    where = q.device
    int32 = dict(dtype=torch.int32, device=where)
    batch = DenseBatch(
        None,
        torch.tensor([0, total], **int32),
        torch.tensor([total], **int32),
        block_table,
        total,
        total,
    )
    out = torch.empty_like(q)
    return _timed(
        lambda: dense_attention(q, key_cache, value_cache, scale, batch, out), device, repeats
    )


def run_case(prompt: int, layout: str, device: str, keep_ratio: float, repeats: int) -> dict:
    num_heads, num_kv_heads, head_dim = LAYOUTS[layout]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    where = "cuda" if device == "cuda" else "cpu"
    generator = torch.Generator().manual_seed(prompt)
    total = prompt + GEN
    keys = torch.randn(total, num_kv_heads, head_dim, generator=generator).to(where, dtype)
    values = torch.randn(total, num_kv_heads, head_dim, generator=generator).to(where, dtype)
    block_q = torch.randn(BLOCK_QUERIES, num_heads, head_dim, generator=generator)
    block_q = block_q.to(where, dtype)
    active_q = block_q[:ACTIVE].contiguous()
    scale = head_dim**-0.5
    key_cache, value_cache, block_table = _paged(keys, values, generator)
    int32 = dict(dtype=torch.int32, device=where)

    def sdpa(q: torch.Tensor):
        # [1, H, Q, D] over [1, Hkv, T, D]; GQA expanded by SDPA itself.
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )

    selected, (ranges, sinks) = _kept_keys(prompt, keep_ratio, generator)
    selected = selected.to(torch.int32).to(where)
    from vllm_focus.kernels.sparse_attention import key_tiles

    sparse_args = dict(
        q=active_q,
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=block_table,
        query_req=torch.zeros(ACTIVE, **int32),
        key_positions=selected,
        cu_seqlens_k=torch.tensor([0, selected.numel()], **int32),
        scale=scale,
        query_start=torch.tensor([0, ACTIVE], **int32),
        tiles=key_tiles([(0, ranges, sinks)], [0, ACTIVE], where),
    )
    every = torch.arange(total, **int32)
    dense_args = {
        **sparse_args,
        "key_positions": every,
        "cu_seqlens_k": torch.tensor([0, total], **int32),
        "tiles": key_tiles([(0, [(0, total)], None)], [0, ACTIVE], where),
    }
    prompt_lens = torch.tensor([prompt], **int32)
    block_args = dict(
        q=active_q[:1],
        query_req=torch.zeros(1, **int32),
        key_cache=key_cache,
        block_table=block_table,
        prompt_lens=prompt_lens,
        prompt_block_size=PROMPT_BLOCK,
        scale=scale,
    )
    sink_args = dict(
        q=active_q,
        cu_seqlens_q=torch.tensor([0, ACTIVE], **int32),
        key_cache=key_cache,
        block_table=block_table,
        seq_lens=torch.tensor([total], **int32),
        prompt_lens=prompt_lens,
        scale=scale,
    )
    attention, block_scores, sink_scores, block_means = _focus_ops(device, scale)
    means = block_means(block_args) if block_means else None
    # Correctness first: the Focus path's attention over every key is dense attention.
    error = rel_rms(attention(dense_args).float(), sdpa(active_q)[0].transpose(0, 1).float())
    row = {
        "prompt": prompt,
        "layout": layout,
        "device": device,
        "keys_kept": int(selected.numel()),
        "keys_total": total,
        "focus_vs_sdpa_rel_rms": error,
        "dual_block_sdpa_ms": _timed(lambda: sdpa(block_q), where, repeats),
        "active_sdpa_ms": _timed(lambda: sdpa(active_q), where, repeats),
        "active_dense_ms": _timed(lambda: attention(dense_args), where, repeats),
        "focus_attention_ms": _timed(lambda: attention(sparse_args), where, repeats),
        "block_scores_ms": _timed(lambda: block_scores(block_args, means), where, repeats),
        "sink_layer_ms": _timed(lambda: sink_scores(dense_args, sink_args), where, repeats),
        "block_means_per_refresh_ms": (
            _timed(lambda: block_means(block_args), where, repeats) if block_means else None
        ),
    }
    row["focus_layer_ms"] = row["focus_attention_ms"] + row["block_scores_ms"]
    row["dual_over_focus_layer"] = row["dual_block_sdpa_ms"] / row["focus_layer_ms"]
    # Achieved bandwidth: the K/V bytes each kernel must read once, over its time.
    per_key = 2 * num_kv_heads * head_dim * key_cache.element_size()
    row["focus_attention_gbps"] = selected.numel() * per_key / row["focus_attention_ms"] / 1e6
    row["active_dense_gbps"] = total * per_key / row["active_dense_ms"] / 1e6
    if device != "interpret":  # the interpreter would take minutes per refresh
        refresh_q = torch.randn(total, num_heads, head_dim, generator=generator).to(where, dtype)
        if device == "cuda":
            row["refresh_unified_ms"] = _refresh_ms(
                where, refresh_q, key_cache, value_cache, block_table, total, scale, repeats
            )
        row["refresh_sdpa_ms"] = _timed(lambda: sdpa(refresh_q), where, repeats)
        row.update(_sparsed_layer(refresh_q, keys, values, scale, generator, repeats))
    return row


def _sparsed_layer(q, keys, values, scale, generator, repeats) -> dict:
    """SparseD's layer after its pattern step: all P + G queries, each (head, 128-query block)
    over SPARSED_DENSITY of the 128-key blocks (a random pattern; the last block, where the
    generation is, always kept), through its torch twin (what the CPU path runs) and, on
    CUDA, the Triton kernel."""
    from vllm_focus.attention.sparsed import block_sparse_torch

    total, heads = q.shape[0], q.shape[1]
    blocks = -(-total // SPARSED_BLOCK)
    mask = torch.rand(heads, blocks, blocks, generator=generator) < SPARSED_DENSITY
    mask[:, :, -1] = True
    mask = mask.to(q.device)
    args = (q, keys, values, mask, SPARSED_BLOCK, scale)
    twin_out = torch.empty_like(q)
    where = q.device.type
    row = {
        "sparsed_torch_ms": _timed(lambda: block_sparse_torch(*args, twin_out), where, repeats),
        "sparsed_density": mask.float().mean().item(),
        "sparsed_kernel_ms": None,
        "sparsed_vs_torch_rel_rms": None,
    }
    if where == "cuda":
        from vllm_focus.kernels.block_sparse import block_sparse_attention

        kernel_out = torch.empty_like(q)
        row["sparsed_kernel_ms"] = _timed(
            lambda: block_sparse_attention(*args, kernel_out), where, repeats
        )
        row["sparsed_vs_torch_rel_rms"] = rel_rms(kernel_out.float(), twin_out.float())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "interpret"])
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS))
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument(
        "--peak-gbps", type=float, default=4800.0, help="device memory bandwidth (H200: 4800)"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu (torch path) or interpret (smoke run)")
    if args.device == "interpret" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device interpret needs TRITON_INTERPRET=1 in the environment")
    layouts, lengths = DEFAULTS[args.device]
    cases = [(n, layout) for n in args.lengths or lengths for layout in args.layouts or layouts]
    rows = [
        run_case(n, layout, args.device, args.keep_ratio, args.repeats)
        for n, layout in tqdm(cases, desc="attention layer")
    ]
    header = (
        f"{'prompt':>7} {'layout':>10} {'kept/total':>12} {'dual B=32':>10} {'A sdpa':>8} "
        f"{'A dense':>8} {'A focus':>8} {'blocks':>7} {'sinks':>7} {'dual/focus':>10} {'err':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['prompt']:>7} {r['layout']:>10} {r['keys_kept']:>5}/{r['keys_total']:<6} "
            f"{r['dual_block_sdpa_ms']:>10.3f} {r['active_sdpa_ms']:>8.3f} "
            f"{r['active_dense_ms']:>8.3f} {r['focus_attention_ms']:>8.3f} "
            f"{r['block_scores_ms']:>7.3f} {r['sink_layer_ms']:>7.3f} "
            f"{r['dual_over_focus_layer']:>9.1f}x {r['focus_vs_sdpa_rel_rms']:>8.1e}"
        )
    print("ms per layer and step; dual/focus = dense dual attention (B=32 queries, SDPA) over a")
    print("sparse Focus layer (|A| queries over the kept keys + block scoring); sinks: the sink")
    print("layer (its dense attention with the sink sums)")
    print(f"achieved K/V read bandwidth, GB/s (peak {args.peak_gbps:.0f}):")
    for r in rows:
        refresh = ""
        if r.get("refresh_sdpa_ms") is not None:
            unified = r.get("refresh_unified_ms")
            refresh = f"  refresh P+G queries: sdpa {r['refresh_sdpa_ms']:.2f} ms"
            refresh += "" if unified is None else f", unified attention {unified:.2f} ms"
            refresh += f"; sparsed ({r['sparsed_density']:.2f} of 128-blocks)"
            if r["sparsed_kernel_ms"] is not None:
                refresh += (
                    f" kernel {r['sparsed_kernel_ms']:.2f} ms"
                    f" (err {r['sparsed_vs_torch_rel_rms']:.1e}),"
                )
            refresh += f" torch {r['sparsed_torch_ms']:.2f} ms"
        print(
            f"{r['prompt']:>7} {r['layout']:>10} focus {r['focus_attention_gbps']:8.1f} "
            f"({100 * r['focus_attention_gbps'] / args.peak_gbps:4.1f}%)  dense |A| "
            f"{r['active_dense_gbps']:8.1f} ({100 * r['active_dense_gbps'] / args.peak_gbps:4.1f}%)"
            f"{refresh}"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": args.device, "rows": rows}, handle, indent=1)
            handle.write("\n")


if __name__ == "__main__":
    main()
