"""Time the Focus kernels against dense attention at long context (torch + Triton only).

For each prompt length and head layout (LLaDA-8B 32/32x128, Dream-7B 28/4x128, bfloat16) one
within-block step of one layer, for one request with G = 256 response tokens:

- dense, Fast-dLLM `dual`: the block's B = 32 queries over all P + G keys (torch SDPA on
  contiguous K/V, which picks flash / memory-efficient kernels);
- dense over the active set: |A| = 3 queries over all keys (SDPA), the dense Focus layers;
- focus: |A| queries over the kept keys (keep_ratio of the prompt in blocks of 64, 16 sinks,
  the response) with `sparse_paged_attention` on a paged cache, plus `prompt_block_scores`
  (|F| = 1 focus query) and `sink_scores` (run once per step, at the last dense layer).

Prints a table and the ratios; `--out` writes JSON. On a machine without a GPU, `--device cpu`
runs the same code through Triton's interpreter at small sizes (a smoke test, not a timing).

    python benchmarks/gpu_kernels.py                      # 8K, 16K, 32K on cuda
    TRITON_INTERPRET=1 python benchmarks/gpu_kernels.py --device cpu --lengths 512 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

from vllm_focus.testing.paged import rel_rms

LAYOUTS = {"llada-8b": (32, 32), "dream-7b": (28, 4)}
HEAD_DIM = 128
CACHE_BLOCK = 16
GEN = 256
BLOCK_QUERIES = 32
ACTIVE = 3
PROMPT_BLOCK = 64
SINKS = 16


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
    """Contiguous [T, Hkv, D] K/V laid into a shuffled paged cache (vLLM's per-layer view)."""
    total, num_kv_heads, head_dim = keys.shape
    num_blocks = -(-total // CACHE_BLOCK)
    order = torch.randperm(num_blocks, generator=generator).to(keys.device)
    cache = torch.zeros(
        num_blocks, num_kv_heads, CACHE_BLOCK, 2 * head_dim, dtype=keys.dtype, device=keys.device
    )
    positions = torch.arange(total, device=keys.device)
    blocks, rows = order[positions // CACHE_BLOCK], positions % CACHE_BLOCK
    cache[blocks, :, rows, :head_dim] = keys
    cache[blocks, :, rows, head_dim:] = values
    key_cache = cache[..., :head_dim].transpose(1, 2)
    value_cache = cache[..., head_dim:].transpose(1, 2)
    return key_cache, value_cache, order.to(torch.int32)[None, :]


def _kept_keys(prompt: int, keep_ratio: float, generator: torch.Generator) -> torch.Tensor:
    """A Focus key set: random top blocks within keep_ratio, sinks, the response."""
    num_blocks = -(-prompt // PROMPT_BLOCK)
    kept = max(1, -(-int(keep_ratio * prompt) // PROMPT_BLOCK))
    blocks = torch.randperm(num_blocks, generator=generator)[:kept]
    positions = (blocks[:, None] * PROMPT_BLOCK + torch.arange(PROMPT_BLOCK)).flatten()
    sinks = torch.randint(0, prompt, (SINKS,), generator=generator)
    keys = torch.cat([positions[positions < prompt], sinks, torch.arange(prompt, prompt + GEN)])
    return torch.unique(keys)


def run_case(prompt: int, layout: str, device: str, keep_ratio: float, repeats: int) -> dict:
    from vllm_focus.kernels.block_scores import prompt_block_scores
    from vllm_focus.kernels.sink_scores import sink_scores
    from vllm_focus.kernels.sparse_attention import sparse_paged_attention

    num_heads, num_kv_heads = LAYOUTS[layout]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(prompt)
    total = prompt + GEN
    keys = torch.randn(total, num_kv_heads, HEAD_DIM, generator=generator).to(device, dtype)
    values = torch.randn(total, num_kv_heads, HEAD_DIM, generator=generator).to(device, dtype)
    block_q = torch.randn(BLOCK_QUERIES, num_heads, HEAD_DIM, generator=generator)
    block_q = block_q.to(device, dtype)
    active_q = block_q[:ACTIVE].contiguous()
    scale = HEAD_DIM**-0.5
    key_cache, value_cache, block_table = _paged(keys, values, generator)
    int32 = dict(dtype=torch.int32, device=device)

    def sdpa(q: torch.Tensor):
        # [1, H, Q, D] over [1, Hkv, T, D]; GQA expanded by SDPA itself.
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None],
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )

    selected = _kept_keys(prompt, keep_ratio, generator).to(torch.int32).to(device)
    sparse_args = dict(
        q=active_q,
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=block_table,
        query_req=torch.zeros(ACTIVE, **int32),
        key_positions=selected,
        cu_seqlens_k=torch.tensor([0, selected.numel()], **int32),
        scale=scale,
    )
    every = torch.arange(total, **int32)
    dense_args = {
        **sparse_args,
        "key_positions": every,
        "cu_seqlens_k": torch.tensor([0, total], **int32),
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
    # Correctness first: the paged kernel over every key is dense attention.
    dense_kernel = sparse_paged_attention(**dense_args)
    error = rel_rms(dense_kernel.float(), sdpa(active_q)[0].transpose(0, 1).float())
    row = {
        "prompt": prompt,
        "layout": layout,
        "keys_kept": int(selected.numel()),
        "keys_total": total,
        "kernel_vs_sdpa_rel_rms": error,
        "dual_block_sdpa_ms": _timed(lambda: sdpa(block_q), device, repeats),
        "active_sdpa_ms": _timed(lambda: sdpa(active_q), device, repeats),
        "active_dense_kernel_ms": _timed(
            lambda: sparse_paged_attention(**dense_args), device, repeats
        ),
        "focus_attention_ms": _timed(
            lambda: sparse_paged_attention(**sparse_args), device, repeats
        ),
        "block_scores_ms": _timed(lambda: prompt_block_scores(**block_args), device, repeats),
        "sink_scores_ms": _timed(lambda: sink_scores(**sink_args), device, repeats),
    }
    row["focus_layer_ms"] = row["focus_attention_ms"] + row["block_scores_ms"]
    row["dual_over_focus_layer"] = row["dual_block_sdpa_ms"] / row["focus_layer_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--keep-ratio", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --device cpu with TRITON_INTERPRET=1 for a smoke run")
    cases = [(n, layout) for n in args.lengths for layout in args.layouts]
    rows = [
        run_case(n, layout, args.device, args.keep_ratio, args.repeats)
        for n, layout in tqdm(cases, desc="kernels")
    ]
    header = (
        f"{'prompt':>7} {'layout':>9} {'kept/total':>12} {'dual B=32':>10} {'A sdpa':>8} "
        f"{'A dense':>8} {'A focus':>8} {'blocks':>7} {'sinks':>7} {'dual/focus':>10} {'err':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['prompt']:>7} {r['layout']:>9} {r['keys_kept']:>5}/{r['keys_total']:<6} "
            f"{r['dual_block_sdpa_ms']:>10.3f} {r['active_sdpa_ms']:>8.3f} "
            f"{r['active_dense_kernel_ms']:>8.3f} {r['focus_attention_ms']:>8.3f} "
            f"{r['block_scores_ms']:>7.3f} {r['sink_scores_ms']:>7.3f} "
            f"{r['dual_over_focus_layer']:>9.1f}x {r['kernel_vs_sdpa_rel_rms']:>8.1e}"
        )
    print("times in ms per layer and step; dual/focus = dense dual block attention over a sparse")
    print("Focus layer (attention over kept keys + block scoring); sinks run once per step")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": args.device, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
