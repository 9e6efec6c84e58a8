"""Every decoding method side by side through vLLM's `LLM`: concurrency x context (CPU).

    python benchmarks/throughput.py                        # the committed sweep (see --help)
    python benchmarks/throughput.py --models llada-mha --prompt-lens 4096 --concurrency 1 4

Methods (the paper's schedule: generation 256, block 32, 256 steps, one token per step, EOS
ignored so every method does the same work), each against the dense method with the same
refresh policy:

- vanilla: cache `none`, every step a full forward over prompt + canvas;
- Fast-dLLM `prefix` and `dual`, refresh `block` (every block start recomputes everything);
- `dual-prefill`: dense `dual` with refresh `prefill` (the prompt's K/V computed once);
- Focus (`attention_backend="focus"`, default knobs), cache `dual`: `focus-block` (refresh
  `block`, the paper's method; its baseline is `dual`) and `focus-prefill` (its baseline is
  `dual-prefill`);
- `sparse-dllm`: Sparse-dLLM (`method` `sparse_dllm`, its published defaults) on the FOCUS
  backend, cache `dual`, refresh `block` (baseline `dual`);
- `sparsed`: SparseD (`method` `sparsed`, its published recipe) on the FOCUS backend, cache
  `none` (baseline vanilla).

`--methods paper` names the paper's five: vanilla, dual (Fast-dLLM), sparse-dllm, sparsed and
focus-block.

N requests are submitted together (`--concurrency`) with a token budget that holds all their
first forwards in one engine step, so after it every step is one batched step of all N. The
baselines run on vLLM's default attention backend (what a user gets without Focus), Focus on
the FOCUS backend: two engines on one checkpoint, alive together, the methods interleaved per
(prompt length, N) so that machine noise hits them alike. Models: random-weight checkpoints in
the published layouts that keep the real head layouts (LLaDA-8B's MHA, Dream-7B's GQA 7:1) at
head dim 64, `--layers` deep (12 by default, Focus's `dense_layers` 2: the dense layers are a
sixth of the model, as 2 of 28-32 are a fifteenth of the real ones), the width shrunk for time.

Per run: aggregate end-to-end tokens/s (wall clock of `generate`, first forwards included),
decode tokens/s (the leading refresh step(s) holding the first forwards taken out), the
model's time in refresh steps and in within-block steps (the runner's own timers,
`LLM.collective_rpc("diffusion_stats")`), one batched within-block step's time and its roofline
floor, the per-step engine overhead, peak resident memory, and the share of tokens equal to
vanilla's / `dual`'s / `dual-prefill`'s.

The floor: the same run measures this machine's copy bandwidth (a large tensor copy) and its
float32 matmul rate (torch.mm at 2048^3); a method's batched within-block step moves at least
its bytes (the weights once + the K/V it attends, every layer, every request) and does its
FLOPs (2 x parameters x computed positions + the attention's 4 x query rows x heads x head
dim x keys); its floor is max(bytes / bandwidth, FLOPs / matmul rate), and the table reports
each measured step as a multiple of it.

Methods that recompute the whole prompt per block (vanilla, prefix, dual, focus-block) cost 8
first forwards per request; above `--full-refresh-max` prompt tokens in flight (N x prompt)
they are skipped for time and the table says so. Vanilla and SparseD above `--vanilla-max-len`
run one step per block and are extrapolated to 256 steps (marked `~`; SparseD per kind of
step, `extrapolation`).

Results: benchmarks/results/throughput.json, the README's tables from it (throughput.md) and
the plots (benchmarks/plots.py) beside it; `--render JSON` redoes the tables and plots of a run.
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

# Checkpoints that keep the published head layouts at head dim 64: LLaDA-8B's MHA (32 query =
# 32 KV heads, here 4 = 4) and Dream-7B's GQA 7:1 (28 / 4, here 7 / 1).
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
    baseline: str | None = None  # the dense method with the same refresh policy

    @property
    def full_refresh(self) -> bool:
        """Recomputes the whole prompt at every block start (or every step)."""
        return self.settings.get("refresh", "block") == "block"


METHODS = [
    Method("vanilla", "dense", {"cache": "none"}),
    Method("prefix", "dense", {"cache": "prefix", "refresh": "block"}),
    Method("dual", "dense", {"cache": "dual", "refresh": "block"}),
    Method("dual-prefill", "dense", {"cache": "dual", "refresh": "prefill"}),
    Method("focus-block", "focus", {"cache": "dual", "refresh": "block"}, baseline="dual"),
    Method(
        "focus-prefill", "focus", {"cache": "dual", "refresh": "prefill"}, baseline="dual-prefill"
    ),
    # Sparse-dLLM at its published defaults (keep half the keys outside the block).
    Method(
        "sparse-dllm",
        "focus",
        {"cache": "dual", "refresh": "block", "method": "sparse_dllm"},
        baseline="dual",
    ),
    # SparseD at its published recipe: no cache, dense for the first fifth of the steps, then
    # its fixed pattern; the dense method with the same (absent) cache is vanilla.
    Method("sparsed", "focus", {"cache": "none", "method": "sparsed"}, baseline="vanilla"),
]
REFERENCES = ("vanilla", "dual", "dual-prefill")
# The paper's Table 1 methods (`--methods paper`).
PAPER = ["vanilla", "dual", "sparse-dllm", "sparsed", "focus-block"]


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


def measure_machine(seconds: float = 1.0) -> dict:
    """This process's copy bandwidth (GB/s, bytes read + written) and float32 matmul rate
    (GFLOP/s), best of repeated runs with torch's default threads (the engine's too)."""
    import torch

    def best(fn, repeat_s):
        fn()
        times, deadline = [], time.perf_counter() + repeat_s
        while time.perf_counter() < deadline or len(times) < 3:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    src = torch.rand(64 << 20)  # 256 MiB, far beyond the caches
    dst = torch.empty_like(src)
    copy_s = best(lambda: dst.copy_(src), seconds)
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    mm_s = best(lambda: torch.mm(a, b), seconds)
    return {
        "copy_gbps": 2 * src.numel() * 4 / copy_s / 1e9,
        "matmul_gflops": 2 * 2048**3 / mm_s / 1e9,
        "torch_threads": torch.get_num_threads(),
    }


def step_cost(method: Method, spec: dict, layers: int, weights: dict, prompt_len: int,
              n: int, args, rows_per_request: float) -> dict:  # fmt: skip
    """(bytes, FLOPs) of one batched within-block step of `n` requests: the weights read
    once, the K/V each request attends in every layer, 2 x parameters per computed position,
    and the attention's two matmuls over the keys each query row attends."""
    from vllm_focus.settings import DiffusionSettings

    head_dim = spec["hidden_size"] // spec["num_heads"]
    kv_row = spec["num_kv_heads"] * head_dim * 2 * 4  # K and V of one position, float32
    dense_keys = prompt_len + args.gen
    if method.settings.get("method") == "sparse_dllm":
        plan = DiffusionSettings().sparse_dllm_plan()
        per_layer = [plan.kept(dense_keys, args.block) + args.block] * layers
    elif method.engine == "focus":
        plan = DiffusionSettings().focus_plan()
        kept = min(prompt_len, plan.kept_blocks(prompt_len) * plan.prompt_block_size)
        sparse_keys = min(prompt_len, kept + plan.num_sinks) + args.gen
        per_layer = [dense_keys] * plan.dense_layers + [sparse_keys] * (layers - plan.dense_layers)
    else:
        per_layer = [dense_keys] * layers
    keys = n * sum(per_layer)
    rows = n * rows_per_request
    attention = 4 * rows * spec["num_heads"] * head_dim * sum(per_layer)
    return {
        "bytes": weights["bytes"] + keys * kv_row,
        "flops": 2 * weights["params"] * rows + attention,
        "kv_bytes": keys * kv_row,
    }


def run_one(llm, prompts: list[list[int]], method: Method, args, steps: int) -> dict:
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
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        wall = time.perf_counter() - start
    stats = llm.collective_rpc("diffusion_stats", kwargs={"reset": True})[0]
    records = stats["records"]
    # The first forwards: the leading refresh step(s) (one when the budget holds them all).
    first = 0
    while first < len(records) and records[first]["refresh"]:
        first += 1
    within = [r for r in records if not r["refresh"]]
    model = stats["refresh_model_s"] + stats["block_model_s"]
    return {
        "wall_s": wall,
        "steps": stats["steps"],
        "refresh_steps": stats["refresh_steps"],
        "refresh_model_s": stats["refresh_model_s"],
        "block_model_s": stats["block_model_s"],
        "model_s": model,
        "first_forward_steps": first,
        "first_forward_s": sum(r["runner_s"] for r in records[:first]),
        "within_block_rows": (
            sum(r["query_tokens"] for r in within) / len(within) if within else None
        ),
        "overhead_s": wall - model,
        "peak_rss_mb": memory.peak / 2**20,
        "peak_over_idle_mb": (memory.peak - memory.idle) / 2**20,
        "step_model_s": [r["model_s"] for r in records],
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
    }


def extrapolation(raw: dict, method: Method, args) -> float:
    """The factor from a cache-`none` run of one step per block to `args.steps` steps. Every
    such step computes everything, so vanilla's steps cost alike: steps / measured. SparseD's
    come in two kinds, dense up to its pattern step and pattern-following after it: each
    kind's mean measured time times its count in the real schedule, over the time measured."""
    if method.settings.get("method") != "sparsed":
        return args.steps / raw["steps"]
    from vllm_focus.settings import DiffusionSettings

    plan = DiffusionSettings(**method.settings).sparsed_plan()
    times = raw["step_model_s"]
    dense_measured = min(len(times) - 1, plan.pattern_step(raw["steps"]) + 1)
    dense = sum(times[:dense_measured]) / dense_measured
    sparse = sum(times[dense_measured:]) / (len(times) - dense_measured)
    dense_real = min(args.steps, plan.pattern_step(args.steps) + 1)
    predicted = dense_real * dense + (args.steps - dense_real) * sparse
    return predicted / sum(times)


def summarize(raw: dict, args, n: int, extrapolated: bool, method: Method) -> dict:
    """Throughputs of one run; a cache-`none` run of one step per block scaled to
    `args.steps` (`extrapolation`)."""
    row = {k: v for k, v in raw.items() if k not in ("token_ids", "step_model_s")}
    scale = extrapolation(raw, method, args) if extrapolated else 1.0
    wall, model = raw["wall_s"] * scale, raw["model_s"] * scale
    tokens = n * args.gen
    within_steps = raw["steps"] - raw["refresh_steps"]
    row.update(
        extrapolated=extrapolated,
        steps_measured=raw["steps"],
        total_s=wall,
        total_model_s=model,
        refresh_s=raw["refresh_model_s"] * scale,
        within_block_s=raw["block_model_s"] * scale,
        overhead_per_step_ms=1e3 * raw["overhead_s"] / raw["steps"],
        tokens_per_s=tokens / wall,
        decode_tokens_per_s=tokens / (wall - raw["first_forward_s"]),
        model_tokens_per_s=tokens / model,
        within_block_step_ms=(
            1e3 * raw["block_model_s"] / within_steps if within_steps > 0 else None
        ),
    )
    return row


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / max(1, len(pairs))


def make_engine(model_dir: Path, backend: str, max_len: int, budget: int, kv_bytes: int,
                max_seqs: int):  # fmt: skip
    from vllm import LLM

    extra = {"attention_backend": "focus"} if backend == "focus" else {}
    return LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=max_len,
        max_num_batched_tokens=budget,
        max_num_seqs=max_seqs,
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


def weights_of(model_dir: Path) -> dict:
    """Parameters and bytes of a checkpoint's tensors, the embedding table left out (a step
    reads only its tokens' rows)."""
    from safetensors import safe_open

    params = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if "embed" in key or key.endswith("wte.weight"):
                    continue
                params += _numel(f.get_slice(key).get_shape())
    return {"params": params, "bytes": 4 * params}


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def skipped(method: Method, prompt_len: int, n: int, args) -> bool:
    return method.full_refresh and n * prompt_len > args.full_refresh_max


def bench_model(name: str, args, machine: dict, progress) -> dict:
    from vllm_focus.settings import DiffusionSettings
    from vllm_focus.testing.tiny import write_tiny_checkpoint

    spec = dict(MODELS[name])
    arch = spec.pop("arch")
    lengths = lengths_of(name, args)
    max_len = max(lengths) + args.gen
    top = max(args.concurrency)
    model_dir = write_tiny_checkpoint(
        Path(tempfile.gettempdir()) / f"bench-throughput-{name}-{args.layers}",
        arch,
        num_layers=args.layers,
        max_position_embeddings=max(8192, max_len),
        **spec,
    )
    vocab = json.loads((model_dir / "tiny_shape.json").read_text())["vocab_size"]
    weights = weights_of(model_dir)
    # The largest batch in flight: its prompts and canvases, plus paging slack; a token budget
    # that holds all their first forwards in one step.
    in_flight = max(n * (p + args.gen) for n in args.concurrency for p in lengths)
    kv_bytes = int(1.25 * in_flight * kv_bytes_per_token(spec, args.layers)) + (64 << 20)
    backends = sorted({m.engine for m in args.methods})
    engines = {
        b: make_engine(model_dir, b, max_len, in_flight, kv_bytes, max(top, 2)) for b in backends
    }
    warmup = argparse.Namespace(gen=args.block, block=args.block)
    for backend, llm in engines.items():  # an engine's first steps pay one-off costs
        method = next(m for m in args.methods if m.engine == backend)
        run_one(llm, [prompt_ids(args.block, 0, vocab)] * 2, method, warmup, 2)

    rows = []
    for prompt_len in lengths:
        for n in args.concurrency:
            prompts = [prompt_ids(prompt_len, 1000 * prompt_len + i, vocab) for i in range(n)]
            outputs: dict[str, list | None] = {}
            batch = []
            for method in args.methods:
                if skipped(method, prompt_len, n, args):
                    progress.update(1)
                    continue
                extrapolated = (
                    method.settings["cache"] == "none" and prompt_len > args.vanilla_max_len
                )
                steps = args.gen // args.block if extrapolated else args.steps
                progress.set_postfix_str(f"{name} P={prompt_len} N={n} {method.name}")
                raw = run_one(engines[method.engine], prompts, method, args, steps)
                progress.update(1)
                outputs[method.name] = None if extrapolated else raw["token_ids"]
                row = {
                    "model": name,
                    "prompt_len": prompt_len,
                    "concurrency": n,
                    "method": method.name,
                    **summarize(raw, args, n, extrapolated, method),
                }
                if row["within_block_rows"] is not None:
                    per_request = row["within_block_rows"] / n
                    cost = step_cost(method, spec, args.layers, weights, prompt_len, n, args,
                                     per_request)  # fmt: skip
                    floor = max(
                        cost["bytes"] / (machine["copy_gbps"] * 1e9),
                        cost["flops"] / (machine["matmul_gflops"] * 1e9),
                    )
                    row.update(
                        step_bytes=cost["bytes"],
                        step_flops=cost["flops"],
                        floor_ms=1e3 * floor,
                        floor_bound=(
                            "memory"
                            if cost["bytes"] / machine["copy_gbps"]
                            >= cost["flops"] / machine["matmul_gflops"]
                            else "compute"
                        ),
                        over_floor=row["within_block_step_ms"] / (1e3 * floor),
                    )
                batch.append(row)
            for row in batch:
                mine = outputs[row["method"]]
                for ref in REFERENCES:
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
        "weights": weights,
        "rows": rows,
        "focus": asdict(DiffusionSettings().focus_plan()),
    }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


MEANS = (
    "total_s",
    "total_model_s",
    "first_forward_s",
    "refresh_s",
    "within_block_s",
    "tokens_per_s",
    "decode_tokens_per_s",
    "model_tokens_per_s",
    "overhead_per_step_ms",
    "peak_over_idle_mb",
)
OPTIONAL_MEANS = ("within_block_step_ms", "floor_ms", "over_floor", "within_block_rows")


def table(rows: list[dict]) -> list[dict]:
    """Per model, prompt length, concurrency and method: means over runs, the speedups over
    vanilla and `dual`, and over the dense method with the same refresh policy (`x same`):
    end to end, decode-only and per within-block step."""
    keys = sorted({(r["model"], r["prompt_len"], r["concurrency"]) for r in rows})
    known = {m.name: m for m in METHODS}
    out = []
    for model, prompt_len, n in keys:
        group = [
            r
            for r in rows
            if (r["model"], r["prompt_len"], r["concurrency"]) == (model, prompt_len, n)
        ]
        by_method: dict[str, dict] = {}
        for method in dict.fromkeys(r["method"] for r in group):
            mine = [r for r in group if r["method"] == method]
            entry = {"model": model, "prompt_len": prompt_len, "concurrency": n}
            entry["method"] = method
            entry["extrapolated"] = any(r["extrapolated"] for r in mine)
            for key in MEANS:
                entry[key] = _mean([r[key] for r in mine])
            for key in OPTIONAL_MEANS:
                values = [r[key] for r in mine if r.get(key) is not None]
                entry[key] = _mean(values) if values else None
            entry["floor_bound"] = mine[0].get("floor_bound")
            for ref in REFERENCES:
                agree = [r[f"agree_{ref}"] for r in mine if r[f"agree_{ref}"] is not None]
                entry[f"agree_{ref}"] = _mean(agree) if agree else None
            by_method[method] = entry
        for entry in by_method.values():
            baseline = known[entry["method"]].baseline if entry["method"] in known else None
            for ref, label in (("vanilla", "vanilla"), ("dual", "dual"), (baseline, "same")):
                base = by_method.get(ref) if ref else None
                if base is None:
                    continue
                entry[f"speedup_vs_{label}"] = entry["tokens_per_s"] / base["tokens_per_s"]
                entry[f"decode_speedup_vs_{label}"] = (
                    entry["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                )
                if entry["within_block_step_ms"] and base["within_block_step_ms"]:
                    entry[f"step_speedup_vs_{label}"] = (
                        base["within_block_step_ms"] / entry["within_block_step_ms"]
                    )
            out.append(entry)
    return out


def print_table(entries: list[dict]) -> None:
    header = (
        f"{'model':<10} {'prompt':>6} {'N':>3} {'method':<13} {'tok/s':>8} {'decode':>8} "
        f"{'x same':>7} {'dec x':>6} {'step x':>7} {'step ms':>8} {'floor':>7} {'x fl':>5} "
        f"{'first s':>8} {'refr s':>7} {'block s':>7} {'ovh ms':>6} {'=same':>5}"
    )
    print(header)

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))

    known = {m.name: m for m in METHODS}
    for e in entries:
        mark = "~" if e["extrapolated"] else " "
        baseline = known[e["method"]].baseline if e["method"] in known else None
        same = e.get(f"agree_{baseline}") if baseline else None
        ratios = " ".join(
            fmt(e.get(key), spec) + "x"
            for key, spec in (
                ("speedup_vs_same", "6.2f"),
                ("decode_speedup_vs_same", "5.2f"),
                ("step_speedup_vs_same", "6.2f"),
            )
        )
        print(
            f"{e['model']:<10} {e['prompt_len']:>6} {e['concurrency']:>3} {e['method']:<13}"
            f"{e['tokens_per_s']:>8.2f}{mark}{e['decode_tokens_per_s']:>8.2f} {ratios} "
            f"{fmt(e['within_block_step_ms'], '8.1f')} "
            f"{fmt(e['floor_ms'], '7.1f')} {fmt(e['over_floor'], '5.1f')} "
            f"{e['first_forward_s']:>8.2f} {e['refresh_s']:>7.2f} {e['within_block_s']:>7.2f} "
            f"{e['overhead_per_step_ms']:>6.1f} {fmt(same, '5.2f')}"
        )  # fmt: skip
    print(
        "tok/s: aggregate end to end; decode: with the first forwards taken out; x same / dec x "
        "/ step x: end-to-end, decode-only and within-block-step speedup over the dense method "
        "with the same refresh policy (focus-block: dual; focus-prefill: dual-prefill); step "
        "ms: one batched within-block step's model time; floor: its roofline floor (ms), x fl: "
        "step / floor; first s: the first forwards; =same: share of tokens equal to that "
        "baseline's; ~ extrapolated from one step per block"
    )


def markdown_tables(result: dict) -> str:
    """The README's tables of a sweep's result: one per model, its machine's figures above it."""
    known = {m.name: m for m in METHODS}
    machine = result["machine"]
    lines = []
    for model in dict.fromkeys(e["model"] for e in result["table"]):
        lines += [
            f"**{model}** (copy {machine['copy_gbps']:.1f} GB/s, matmul "
            f"{machine['matmul_gflops']:.0f} GFLOP/s in its run):",
            "",
            "| prompt | N | method | tok/s end to end | decode tok/s | × same-refresh dense "
            "(e2e / decode / step) | within-block step ms | floor ms (bound) | step ÷ floor | "
            "first forwards s | refresh s | within-block s | tokens = baseline |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in (e for e in result["table"] if e["model"] == model):
            baseline = known[e["method"]].baseline if e["method"] in known else None
            ratios = " / ".join(
                f"{e[key]:.2f}×"
                for key in ("speedup_vs_same", "decode_speedup_vs_same", "step_speedup_vs_same")
                if e.get(key) is not None
            )
            same = e.get(f"agree_{baseline}") if baseline else None
            step = e["within_block_step_ms"]
            floor = f"{e['floor_ms']:.1f} ({e['floor_bound']})" if e["floor_ms"] else "–"
            mark = "~" if e["extrapolated"] else ""
            cells = [
                f"{e['prompt_len'] // 1024}K", str(e["concurrency"]), e["method"],
                f"{mark}{e['tokens_per_s']:.2f}", f"{mark}{e['decode_tokens_per_s']:.2f}",
                ratios or "–", f"{step:.1f}" if step else "–", floor,
                f"{e['over_floor']:.1f}" if e["over_floor"] else "–",
                f"{e['first_forward_s']:.1f}", f"{e['refresh_s']:.1f}",
                f"{e['within_block_s']:.1f}", f"{same:.2f}" if same is not None else "–",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["dual", "dual-prefill", "focus-block", "focus-prefill"],
        help=f"of {[m.name for m in METHODS]} (vanilla and prefix: add them by name), or "
        f"`paper` for {PAPER}",
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument(
        "--vanilla-max-len",
        type=int,
        default=1024,
        help="longer prompts run vanilla one step per block and extrapolate",
    )
    parser.add_argument(
        "--full-refresh-max",
        type=int,
        default=8192,
        help="methods that recompute the prompt at every block start run only where "
        "N x prompt <= this (time)",
    )
    parser.add_argument(
        "--max-prompt-len",
        nargs="*",
        default=[],
        metavar="MODEL=N",
        help="per-model cap on the prompt lengths (time budget); none: every model all lengths",
    )
    parser.add_argument("--out", default=str(RESULTS / "throughput.json"))
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument(
        "--render",
        metavar="JSON",
        help="only write the tables (.md) and plots of an earlier run's JSON, run nothing",
    )
    args = parser.parse_args()
    if args.render:
        render(json.loads(Path(args.render).read_text()), Path(args.render), not args.no_plots)
        return
    known = {m.name: m for m in METHODS}
    args.methods = [n for m in args.methods for n in (PAPER if m == "paper" else [m])]
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

    machine = measure_machine()
    print(
        f"machine: copy {machine['copy_gbps']:.1f} GB/s, float32 matmul "
        f"{machine['matmul_gflops']:.0f} GFLOP/s ({machine['torch_threads']} threads)"
    )
    runs = sum(len(lengths_of(name, args)) for name in args.models)
    total = runs * len(args.concurrency) * len(args.methods)
    started = time.time()
    models = []
    with tqdm(total=total, desc="throughput runs") as progress:
        for name in args.models:
            models.append(bench_model(name, args, machine, progress))
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
        if k not in ("out", "no_plots") and not (isinstance(v, dict) and not v)
    )
    result = {
        "command": command,
        "seconds": time.time() - started,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)),
            **machine,
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
    render(result, out, not args.no_plots)


def render(result: dict, out: Path, plots: bool) -> None:
    """The markdown tables (beside the JSON, .md) and, with `plots`, the plots."""
    tables = out.with_suffix(".md")
    tables.write_text(f"`{result['command']}`\n\n" + markdown_tables(result))
    print(f"wrote {tables}")
    if plots:
        from plots import plot_throughput

        for path in plot_throughput(result, out.parent, out.stem):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
