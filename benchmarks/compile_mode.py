"""vLLM's default (compiled) mode against `enforce_eager=True`: tokens/s, same tokens (CPU).

    python benchmarks/compile_mode.py                    # dream and llada, dual at 4K
    python benchmarks/compile_mode.py --arch llada --prompt-len 8192

Per family, one engine in each mode (the compiled one first pays torch.compile at start-up),
the same requests (dense `dual`, refresh `block`, generation 64 in blocks of 32, one token per
step, EOS ignored), three timed repetitions each after an untimed one. Reports end-to-end
tokens/s (best of three), the model seconds of refresh and within-block steps from the runner's
per-step records, the start-up time, and whether the two modes gave the same tokens. Ratios
are compiled / eager within one run. Results: benchmarks/results/compile_mode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def _run(model: str, args, eager: bool) -> dict:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=eager,
        max_model_len=args.prompt_len + args.max_tokens,
        kv_cache_memory_bytes=512 << 20,
        seed=0,
    )
    startup_s = time.perf_counter() - started
    prompts = [
        {"prompt_token_ids": [(17 * i + 5 * p) % 300 for i in range(args.prompt_len)]}
        for p in range(args.num_prompts)
    ]
    settings = {"cache": "dual", "block_length": args.block_length, "gen_length": args.max_tokens}
    params = SamplingParams(
        temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, extra_args=settings
    )
    llm.generate(prompts, params, use_tqdm=False)  # untimed: one-off allocations
    best, tokens, stats = None, None, None
    for _ in range(args.repeats):
        llm.collective_rpc("diffusion_stats", kwargs={"reset": True})
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        if best is None or seconds < best:
            best = seconds
            (stats,) = llm.collective_rpc("diffusion_stats", kwargs={"reset": True})
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
    llm.llm_engine.engine_core.shutdown()
    count = sum(len(t) for t in tokens)
    return {
        "startup_s": startup_s,
        "seconds": best,
        "tokens_per_s": count / best,
        "refresh_model_s": stats["refresh_model_s"],
        "block_model_s": stats["block_model_s"],
        "tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["dream", "llada"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--num-prompts", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "compile_mode.json"
    )
    args = parser.parse_args()

    from tqdm import tqdm

    from vllm_focus.testing.tiny import write_tiny_checkpoint

    results = {}
    for arch in tqdm(args.arch, desc="families"):
        root = Path(tempfile.gettempdir()) / f"bench-compile-{arch}-{args.layers}"
        model = str(write_tiny_checkpoint(root, arch, num_layers=args.layers))
        compiled, eager = _run(model, args, eager=False), _run(model, args, eager=True)
        results[arch] = {
            "compiled": {k: v for k, v in compiled.items() if k != "tokens"},
            "eager": {k: v for k, v in eager.items() if k != "tokens"},
            "compiled_over_eager": compiled["tokens_per_s"] / eager["tokens_per_s"],
            "same_tokens": compiled["tokens"] == eager["tokens"],
        }
    for arch, row in results.items():
        c, e = row["compiled"], row["eager"]
        print(
            f"{arch}: compiled {c['tokens_per_s']:.1f} tok/s, eager {e['tokens_per_s']:.1f} tok/s "
            f"({row['compiled_over_eager']:.2f}x); model s refresh {c['refresh_model_s']:.2f} vs "
            f"{e['refresh_model_s']:.2f}, within-block {c['block_model_s']:.2f} vs "
            f"{e['block_model_s']:.2f}; start-up {c['startup_s']:.0f} s vs {e['startup_s']:.0f} s; "
            f"same tokens: {row['same_tokens']}"
        )
    command = "python benchmarks/compile_mode.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k != "out"
    )
    machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
    payload = {"command": command, "machine": machine, "results": results}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
