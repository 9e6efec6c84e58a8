"""Every decoding method side by side through vLLM's `LLM`, as the context grows (CPU).

    python benchmarks/throughput.py                        # the committed sweep (~35 min, 2 cores)
    python benchmarks/throughput.py --models llada-mha --prompt-lens 1024 2048 --gen 64

Methods (one request at a time, the paper's setting: generation 256, block 32, 256 steps, one
token per step, EOS ignored so every method does the same work):

- vanilla: cache `none`, every step a full forward over prompt + canvas;
- Fast-dLLM `prefix` and `dual`, refresh `block`;
- Focus (`attention_backend="focus"`, default knobs), cache `dual`, refresh `block` (the
  paper's method) and refresh `prefill` (the prompt's K/V computed once).

The baselines run on vLLM's default attention backend (what a user gets without Focus), Focus
on the FOCUS backend: two engines on one checkpoint, alive together, the methods interleaved
per prompt so that machine noise hits them alike. Models: scaled-down random-weight checkpoints
in the published layouts that keep the real head layouts (LLaDA-8B's MHA, Dream-7B's GQA 7:1)
at head dim 64.

Per run: end-to-end tokens/s (wall clock of `generate`, prefill included), decode tokens/s
(the first engine step, the prompt's first forward, taken out), the model's time in refresh
steps and in within-block steps (the runner's own timers, `LLM.collective_rpc
("diffusion_stats")`), the per-step engine overhead (wall time outside the model forward,
divided by the steps) and the peak resident memory of the engine processes above their idle
level. Every throughput is also given with that overhead taken out (tokens / model seconds).
Vanilla above `--vanilla-max-len` runs one step per block (8 full forwards, each the same
work as any of its 256) and is extrapolated to 256 steps; its rows say so. Fidelity: the share
of output tokens equal to vanilla's (where vanilla ran in full) and to `dual`'s.

Results: benchmarks/results/throughput.json and the plots (benchmarks/plots.py) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

# Scaled-down checkpoints that keep the published head layouts at head dim 64: LLaDA-8B's MHA
# (32 query = 32 KV heads, here 4 = 4) and Dream-7B's GQA 7:1 (28 / 4, here 7 / 1).
MODELS = {
    "llada-mha": dict(
        arch="llada", num_heads=4, num_kv_heads=4, hidden_size=256, intermediate_size=768
    ),
    "dream-gqa7": dict(
        arch="dream", num_heads=7, num_kv_heads=1, hidden_size=448, intermediate_size=1216
    ),
}


@dataclass(frozen=True)
class Method:
    name: str
    engine: str  # "dense": vLLM's default attention backend; "focus": the FOCUS backend
    settings: dict


METHODS = [
    Method("vanilla", "dense", {"cache": "none"}),
    Method("prefix", "dense", {"cache": "prefix", "refresh": "block"}),
    Method("dual", "dense", {"cache": "dual", "refresh": "block"}),
    Method("focus-block", "focus", {"cache": "dual", "refresh": "block"}),
    Method("focus-prefill", "focus", {"cache": "dual", "refresh": "prefill"}),
]


class PeakMemory:
    """Samples the resident memory of this process's children (the engine processes)."""

    def __init__(self, interval: float = 0.02) -> None:
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = self.idle = self._rss()

    def _rss(self) -> int:
        total = 0
        for child in self._process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a process that just exited
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        self.peak = self.idle = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def prompt_ids(length: int, seed: int, vocab: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    # Ordinary tokens only (the tiny tokenizers' specials sit at the end of the vocabulary).
    return torch.randint(10, vocab - 16, (length,), generator=generator).tolist()


def run_one(llm, prompt: list[int], method: Method, args, steps: int) -> dict:
    from vllm import SamplingParams

    settings = {
        **method.settings,
        "gen_length": args.gen,
        "block_length": args.block,
        "steps": steps,
    }
    params = SamplingParams(
        temperature=0.0, max_tokens=args.gen, ignore_eos=True, extra_args=settings
    )
    llm.collective_rpc("diffusion_stats", kwargs={"reset": True})
    with PeakMemory() as memory:
        start = time.perf_counter()
        output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        wall = time.perf_counter() - start
    stats = llm.collective_rpc("diffusion_stats", kwargs={"reset": True})[0]
    model = stats["refresh_model_s"] + stats["block_model_s"]
    return {
        "wall_s": wall,
        "steps": stats["steps"],
        "refresh_steps": stats["refresh_steps"],
        "refresh_model_s": stats["refresh_model_s"],
        "block_model_s": stats["block_model_s"],
        "model_s": model,
        "first_step_s": stats["records"][0]["runner_s"],
        "overhead_s": wall - model,
        "peak_rss_mb": memory.peak / 2**20,
        "peak_over_idle_mb": (memory.peak - memory.idle) / 2**20,
        "token_ids": list(output.outputs[0].token_ids),
    }


def summarize(raw: dict, args, extrapolated: bool) -> dict:
    """Throughputs of one run; a vanilla run of one step per block scaled to `args.steps`."""
    row = {k: v for k, v in raw.items() if k != "token_ids"}
    scale = args.steps / raw["steps"] if extrapolated else 1.0
    wall, model = raw["wall_s"] * scale, raw["model_s"] * scale
    first = raw["first_step_s"]
    row.update(
        extrapolated=extrapolated,
        steps_measured=raw["steps"],
        total_s=wall,
        total_model_s=model,
        refresh_s=raw["refresh_model_s"] * scale,
        within_block_s=raw["block_model_s"] * scale,
        overhead_per_step_ms=1e3 * raw["overhead_s"] / raw["steps"],
        tokens_per_s=args.gen / wall,
        decode_tokens_per_s=args.gen / (wall - first),
        model_tokens_per_s=args.gen / model,
        within_block_step_ms=(
            1e3 * raw["block_model_s"] / (raw["steps"] - raw["refresh_steps"])
            if raw["steps"] > raw["refresh_steps"]
            else None
        ),
    )
    return row


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(len(a), len(b))


def make_engine(model_dir: Path, backend: str, max_len: int, kv_bytes: int):
    from vllm import LLM

    extra = {"attention_backend": "focus"} if backend == "focus" else {}
    return LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=max_len,
        max_num_batched_tokens=max_len,
        kv_cache_memory_bytes=kv_bytes,
        seed=0,
        **extra,
    )


def lengths_of(name: str, args) -> list[int]:
    cap = args.max_prompt_len.get(name)
    return [n for n in args.prompt_lens if cap is None or n <= cap]


def kv_bytes_per_token(spec: dict, layers: int) -> int:
    head_dim = spec["hidden_size"] // spec["num_heads"]
    return layers * spec["num_kv_heads"] * head_dim * 2 * 4  # K and V, float32


def bench_model(name: str, args, progress) -> dict:
    from vllm_focus.settings import DiffusionSettings
    from vllm_focus.testing.tiny import write_tiny_checkpoint

    spec = dict(MODELS[name])
    arch = spec.pop("arch")
    max_len = max(lengths_of(name, args)) + args.gen
    model_dir = write_tiny_checkpoint(
        Path(tempfile.gettempdir()) / f"bench-throughput-{name}-{args.layers}",
        arch,
        num_layers=args.layers,
        max_position_embeddings=max(8192, max_len),
        **spec,
    )
    vocab = json.loads((model_dir / "tiny_shape.json").read_text())["vocab_size"]
    # One request at a time: its prompt and canvas, plus paging slack.
    kv_bytes = int(1.25 * max_len * kv_bytes_per_token(spec, args.layers)) + (64 << 20)
    backends = sorted({m.engine for m in args.methods})
    engines = {b: make_engine(model_dir, b, max_len, kv_bytes) for b in backends}
    warmup = argparse.Namespace(gen=args.block, block=args.block)
    for backend, llm in engines.items():  # an engine's first steps pay one-off costs
        method = next(m for m in args.methods if m.engine == backend)
        run_one(llm, prompt_ids(args.block, 0, vocab), method, warmup, 2)

    rows = []
    for prompt_len in lengths_of(name, args):
        for p in range(args.num_prompts):
            prompt = prompt_ids(prompt_len, 1000 * prompt_len + p, vocab)
            outputs: dict[str, list[int] | None] = {}
            batch = []
            for method in args.methods:
                extrapolated = (
                    method.settings["cache"] == "none" and prompt_len > args.vanilla_max_len
                )
                steps = args.gen // args.block if extrapolated else args.steps
                progress.set_postfix_str(f"{name} P={prompt_len} {method.name}")
                raw = run_one(engines[method.engine], prompt, method, args, steps)
                progress.update(1)
                outputs[method.name] = None if extrapolated else raw["token_ids"]
                batch.append(
                    {
                        "model": name,
                        "prompt_len": prompt_len,
                        "prompt": p,
                        "method": method.name,
                        **summarize(raw, args, extrapolated),
                    }
                )
            for row in batch:
                mine = outputs[row["method"]]
                for ref in ("vanilla", "dual"):
                    theirs = outputs.get(ref)
                    known = mine is not None and theirs is not None
                    row[f"agree_{ref}"] = agreement(mine, theirs) if known else None
            rows.extend(batch)
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    shape = {"family": arch, "num_layers": args.layers, **spec}
    shape["head_dim"] = spec["hidden_size"] // spec["num_heads"]
    return {
        "model": name,
        "shape": shape,
        "rows": rows,
        "focus": asdict(DiffusionSettings().focus_plan()),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def table(rows: list[dict]) -> list[dict]:
    """Per model, prompt length and method: means over prompts, and the speedups over vanilla
    and `dual` (end to end as measured, and with the per-step overhead taken out)."""
    keys = sorted({(r["model"], r["prompt_len"]) for r in rows})
    out = []
    for model, prompt_len in keys:
        group = [r for r in rows if r["model"] == model and r["prompt_len"] == prompt_len]
        by_method: dict[str, dict] = {}
        for method in dict.fromkeys(r["method"] for r in group):
            mine = [r for r in group if r["method"] == method]
            entry = {"model": model, "prompt_len": prompt_len, "method": method}
            entry["extrapolated"] = any(r["extrapolated"] for r in mine)
            for key in (
                "total_s",
                "total_model_s",
                "refresh_s",
                "within_block_s",
                "tokens_per_s",
                "decode_tokens_per_s",
                "model_tokens_per_s",
                "overhead_per_step_ms",
                "peak_over_idle_mb",
            ):
                entry[key] = _mean([r[key] for r in mine])
            steps = [r["within_block_step_ms"] for r in mine if r["within_block_step_ms"]]
            entry["within_block_step_ms"] = _mean(steps) if steps else None
            for ref in ("vanilla", "dual"):
                agree = [r[f"agree_{ref}"] for r in mine if r[f"agree_{ref}"] is not None]
                entry[f"agree_{ref}"] = _mean(agree) if agree else None
            by_method[method] = entry
        for entry in by_method.values():
            for ref in ("vanilla", "dual"):
                base = by_method.get(ref)
                if base is None:
                    continue
                entry[f"speedup_vs_{ref}"] = entry["tokens_per_s"] / base["tokens_per_s"]
                entry[f"model_speedup_vs_{ref}"] = (
                    entry["model_tokens_per_s"] / base["model_tokens_per_s"]
                )
                if entry["within_block_step_ms"] and base["within_block_step_ms"]:
                    entry[f"step_speedup_vs_{ref}"] = (
                        base["within_block_step_ms"] / entry["within_block_step_ms"]
                    )
            out.append(entry)
    return out


def print_table(entries: list[dict]) -> None:
    header = (
        f"{'model':<11} {'prompt':>6} {'method':<14} {'tok/s':>7} {'model tok/s':>11} "
        f"{'x vanilla':>10} {'x dual':>7} {'x dual*':>7} {'step ms':>8} {'refresh s':>9} "
        f"{'ovh ms':>7} {'=van':>5} {'=dual':>5}"
    )
    print(header)

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))

    for e in entries:
        mark = "~" if e["extrapolated"] else " "
        print(
            f"{e['model']:<11} {e['prompt_len']:>6} {e['method']:<14}"
            f"{e['tokens_per_s']:>7.2f}{mark}{e['model_tokens_per_s']:>11.2f} "
            f"{fmt(e.get('speedup_vs_vanilla'), '9.2f')}x {fmt(e.get('speedup_vs_dual'), '6.2f')}x "
            f"{fmt(e.get('model_speedup_vs_dual'), '6.2f')}x "
            f"{fmt(e['within_block_step_ms'], '8.1f')} {e['refresh_s']:>9.2f} "
            f"{e['overhead_per_step_ms']:>7.1f} {fmt(e['agree_vanilla'], '5.2f')} "
            f"{fmt(e['agree_dual'], '5.2f')}"
        )
    print(
        "~ extrapolated from one step per block; x dual* = with the per-step engine overhead "
        "taken out (model time only); step ms = one within-block step's model time; "
        "=van/=dual: share of output tokens equal to vanilla's / dual's"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--prompt-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384]
    )
    parser.add_argument("--methods", nargs="+", default=[m.name for m in METHODS])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=1)
    parser.add_argument(
        "--vanilla-max-len",
        type=int,
        default=1024,
        help="longer prompts run vanilla one step per block and extrapolate",
    )
    parser.add_argument(
        "--max-prompt-len",
        nargs="*",
        default=["dream-gqa7=8192"],
        metavar="MODEL=N",
        help="per-model cap on the prompt lengths (time budget); none: every model all lengths",
    )
    parser.add_argument("--out", default=str(RESULTS / "throughput.json"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    known = {m.name: m for m in METHODS}
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        parser.error(f"unknown --methods {unknown}; choose from {list(known)}")
    args.methods = [known[m] for m in args.methods]
    try:
        args.max_prompt_len = {
            k: int(v) for k, v in (item.split("=", 1) for item in args.max_prompt_len)
        }
    except ValueError:
        parser.error("--max-prompt-len takes MODEL=N items, e.g. dream-gqa7=8192")

    from tqdm import tqdm

    runs = sum(len(lengths_of(name, args)) for name in args.models)
    total = runs * args.num_prompts * len(args.methods)
    started = time.time()
    models = []
    with tqdm(total=total, desc="throughput runs") as progress:
        for name in args.models:
            models.append(bench_model(name, args, progress))
    rows = [row for model in models for row in model["rows"]]
    entries = table(rows)
    print_table(entries)
    command = "python benchmarks/throughput.py " + " ".join(
        f"--{k.replace('_', '-')} "
        + (
            " ".join(str(getattr(x, "name", x)) for x in v)
            if isinstance(v, list)
            else " ".join(f"{a}={b}" for a, b in v.items())
            if isinstance(v, dict)
            else str(v)
        )
        for k, v in vars(args).items()
        if k not in ("out", "no_plots")
    )
    result = {
        "command": command,
        "seconds": time.time() - started,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
        },
        "settings": {"gen": args.gen, "block": args.block, "steps": args.steps},
        "models": [{k: v for k, v in m.items() if k != "rows"} for m in models],
        "table": entries,
        "runs": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.no_plots:
        from plots import plot_throughput

        for path in plot_throughput(result, out.parent):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
