"""Tokens/s of each KV-cache mode through vLLM's `LLM` API, on tiny checkpoints (CPU).

    python benchmarks/cache_modes.py --arch dream --prompt-lens 512 4096

Same engine, same prompts, same schedule (generation 64, block 32, one token per step,
EOS ignored so every run does the same work); only the per-request cache settings change.
Ratios are taken within one run. Results go to benchmarks/results/cache_modes-<arch>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

MODES = [
    ("none", "block"),
    ("prefix", "block"),
    ("dual", "block"),
    ("prefix", "prefill"),
    ("dual", "prefill"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="dream", choices=["dream", "dream-gqa3", "llada"])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from vllm_focus.testing.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(Path(tempfile.gettempdir()) / f"bench-{args.arch}", args.arch)
    max_len = max(args.prompt_lens) + args.max_tokens + args.block_length
    llm = LLM(
        model=str(model),
        dtype="float32",
        max_model_len=max_len,
        kv_cache_memory_bytes=512 << 20,
        seed=0,
    )
    # One untimed request first: the first engine step pays one-off allocation costs.
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8), use_tqdm=False)
    results = []
    runs = [(n, mode) for n in args.prompt_lens for mode in MODES]
    for prompt_len, (cache, refresh) in tqdm(runs, desc="cache modes"):
        prompts = [
            {"prompt_token_ids": [(17 * i + 5 * p) % 300 for i in range(prompt_len)]}
            for p in range(args.num_prompts)
        ]
        settings = {
            "cache": cache,
            "refresh": refresh,
            "block_length": args.block_length,
            "gen_length": args.max_tokens,
        }
        params = SamplingParams(
            temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, extra_args=settings
        )
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        results.append(
            {
                "prompt_len": prompt_len,
                "cache": cache,
                "refresh": refresh,
                "seconds": seconds,
                "tokens": tokens,
                "tokens_per_s": tokens / seconds,
            }
        )
    for prompt_len in args.prompt_lens:
        rows = [r for r in results if r["prompt_len"] == prompt_len]
        base = next(r for r in rows if r["cache"] == "none")["tokens_per_s"]
        print(f"\nprompt {prompt_len}, {args.num_prompts} prompts x {args.max_tokens} tokens")
        for row in rows:
            row["speedup_vs_none"] = row["tokens_per_s"] / base
            print(
                f"  cache={row['cache']:<6} refresh={row['refresh']:<7} "
                f"{row['tokens_per_s']:8.1f} tok/s  ({row['speedup_vs_none']:.1f}x none)"
            )
    out = Path(args.out or Path(__file__).parent / "results" / f"cache_modes-{args.arch}.json")
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/cache_modes.py "
                + " ".join(
                    f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(args).items()
                    if k != "out"
                ),
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpus": __import__("os").cpu_count(),
                },
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
