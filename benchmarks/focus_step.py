"""Time of one within-block denoising step, Focus vs dense `dual`, through vLLM's `LLM` (CPU).

    python benchmarks/focus_step.py --prompt-lens 1024 4096 8000

One request with a G = 32 canvas, one block of 32. A run with 32 steps is one block-start
refresh plus 31 within-block steps; a run with 1 step is the refresh alone. The within-block
step time is their difference / 31 (median over `--repeats` interleaved pairs), so request
set-up, the refresh and the commit cancel. Two engines in one run on one tiny checkpoint
(default 4 layers, 8 query / 2 KV heads of 32): the default attention backend (CPU_ATTN,
dense `dual`: the Fast-dLLM baseline) and `attention_backend="focus"` (default Focus knobs).
Also reports the share of the prompt a sparse layer attends (kept blocks + sinks).
Results: benchmarks/results/focus_step-<arch>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

GEN = 32


def _measure(llm, prompt_len: int, steps: int, settings: dict) -> float:
    from vllm import SamplingParams

    prompt = [(17 * i + 5) % 300 for i in range(prompt_len)]
    params = SamplingParams(
        temperature=0,
        max_tokens=GEN,
        ignore_eos=True,
        extra_args={**settings, "gen_length": GEN, "block_length": GEN, "steps": steps},
    )
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="dream", choices=["dream", "llada"])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[1024, 4096, 8000])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from vllm_focus.settings import DiffusionSettings
    from vllm_focus.testing.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(
        Path(tempfile.gettempdir()) / f"bench-focus-{args.arch}",
        args.arch,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        hidden_size=32 * args.heads,
    )
    focus = DiffusionSettings().focus_plan()
    step_ms: dict[str, dict[int, float]] = {}
    for backend in ("dense", "focus"):
        llm = LLM(
            model=str(model),
            dtype="float32",
            enforce_eager=True,
            max_model_len=max(args.prompt_lens) + GEN,
            kv_cache_memory_bytes=512 << 20,
            seed=0,
            **({"attention_backend": "focus"} if backend == "focus" else {}),
        )
        llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8))
        step_ms[backend] = {}
        runs = [(n, r) for n in args.prompt_lens for r in range(args.repeats)]
        samples: dict[int, list[float]] = {n: [] for n in args.prompt_lens}
        for prompt_len, _ in tqdm(runs, desc=f"{backend} steps"):
            settings = {"cache": "dual"}
            many = _measure(llm, prompt_len, GEN, settings)
            one = _measure(llm, prompt_len, 1, settings)
            samples[prompt_len].append((many - one) / (GEN - 1) * 1e3)
        for prompt_len, values in samples.items():
            step_ms[backend][prompt_len] = statistics.median(values)
        llm.llm_engine.engine_core.shutdown()
        del llm

    rows = []
    for n in args.prompt_lens:
        applies = focus.applies(n, "dual")
        kept = min(n, focus.kept_blocks(n) * focus.prompt_block_size)
        share = min(n, kept + focus.num_sinks) / n if applies else 1.0
        dense, sparse = step_ms["dense"][n], step_ms["focus"][n]
        rows.append(
            {
                "prompt_len": n,
                "dense_dual_step_ms": round(dense, 2),
                "focus_step_ms": round(sparse, 2),
                "speedup": round(dense / sparse, 2),
                "focus_applies": applies,
                "prompt_share_attended_max": round(share, 4),
            }
        )
    print(f"{'prompt':>7} {'dense dual ms':>14} {'focus ms':>9} {'speedup':>8} {'prompt kept':>12}")
    for r in rows:
        print(
            f"{r['prompt_len']:>7} {r['dense_dual_step_ms']:>14.2f} {r['focus_step_ms']:>9.2f} "
            f"{r['speedup']:>7.2f}x {r['prompt_share_attended_max']:>11.1%}"
        )
    out = Path(args.out or Path(__file__).parent / "results" / f"focus_step-{args.arch}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "arch": args.arch,
        "layers": args.layers,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": 32,
        "gen": GEN,
        "repeats": args.repeats,
        "focus": asdict(focus),
        "machine": platform.processor() or platform.machine(),
        "command": "python benchmarks/focus_step.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if v is not None
        ),
    }
    out.write_text(json.dumps({"config": config, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
