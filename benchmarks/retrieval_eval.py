"""Exact-match retrieval accuracy of each decoding method through vLLM, by context length.

    python benchmarks/retrieval_eval.py                     # the committed table (~15 min, 2 cores)
    python benchmarks/retrieval_eval.py --lengths 1024 --prompts 50 --out /tmp/r.json

The model is the shipped key-value retrieval checkpoint (`examples/models/kv-retrieval-llada`,
see its model card; `--model` for another directory in the same task's vocabulary). Held-out
prompts come from a fixed seed (`--seed`): a context of filler and `KEY : d d d ;` records of
exactly the given length, then `? KEY :`; the answer is right when the first three generated
tokens are the key's digits. Every method sees the same prompts, with `max_tokens` 4 (three
digits and EOS), block length 4, one token per step:

- `vanilla`: cache `none` (every step a full forward), vLLM's default attention;
- `dual`: Fast-dLLM's dual cache, refresh `block`, vLLM's default attention;
- `focus`: Focus attention (FOCUS backend, default knobs) on `dual`, refresh `block`;
- `focus-prefill`: the same with refresh `prefill`;
- `focus-1block`: an ablation, Focus keeping a single 64-token prompt block and no sinks;
- `sparse-dllm`: Sparse-dLLM (FOCUS backend, `method` `sparse_dllm`, its published defaults);
- `sparsed`: SparseD (FOCUS backend, `method` `sparsed`, cache `none`, its published recipe);
- `paper`: the paper's five methods, vanilla, dual, sparse-dllm, sparsed and focus.

Per method and length: accuracy, the prompts it got wrong (their keys), and tokens/s (the
generated tokens over the wall time of one `generate` call for all prompts). Results: JSON and
a plot (accuracy vs length per method) in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "examples" / "models" / "kv-retrieval-llada"
METHODS = {
    "vanilla": (False, {"cache": "none"}),
    "dual": (False, {"cache": "dual", "refresh": "block"}),
    "focus": (True, {"cache": "dual", "refresh": "block"}),
    "focus-prefill": (True, {"cache": "dual", "refresh": "prefill"}),
    # Sparse-dLLM at its published defaults (README, "Sparse-dLLM").
    "sparse-dllm": (True, {"cache": "dual", "refresh": "block", "method": "sparse_dllm"}),
    # SparseD at its published recipe (README, "SparseD"): no cache.
    "sparsed": (True, {"cache": "none", "method": "sparsed"}),
    # Ablation: a kept-prompt budget of one 64-token block (and no sinks) instead of the
    # default max(10% of the prompt, 256 tokens) + 16 sinks.
    "focus-1block": (
        True,
        {"cache": "dual", "keep_ratio": 0.01, "min_keep_tokens": 64, "num_sinks": 0},
    ),
}
DECODE = {"block_length": 4}
# The paper's Table 1 methods (`--methods paper`).
PAPER = ["vanilla", "dual", "sparse-dllm", "sparsed", "focus"]


def questions(length: int, count: int, seed: int):
    from vllm_focus.testing.retrieval import KVTask

    task = KVTask()
    rng = random.Random(f"{seed}-{length}")
    return task, [task.question_for(rng, length) for _ in range(count)]


def make_engine(model: str, focus: bool, max_len: int):
    from vllm import LLM

    kwargs = {"attention_backend": "focus"} if focus else {}
    return LLM(
        model=model,
        dtype="float32",
        max_model_len=max_len + 64,
        kv_cache_memory_bytes=256 << 20,
        seed=0,
        **kwargs,
    )


def evaluate(llm, task, items, settings: dict) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=4, extra_args={**DECODE, **settings})
    prompts = [{"prompt_token_ids": q.prompt} for q in items]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    right, wrong, tokens = 0, [], 0
    for q, out in zip(items, outputs):
        ids = list(out.outputs[0].token_ids)
        tokens += len(ids)
        if ids[:3] == q.answer:
            right += 1
        else:
            wrong.append({"key": task.words[q.key], "want": q.answer, "got": ids})
    return {
        "accuracy": right / len(items),
        "right": right,
        "prompts": len(items),
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "wrong": wrong[:10],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # Methods at the same accuracy overlap: shrinking markers keep each one visible.
    for size, method in zip((14, 12, 10, 8, 6, 4, 3), METHODS):
        rows = [r for r in result["runs"] if r["method"] == method]
        if rows:
            ax.plot(
                [r["length"] for r in rows],
                [100 * r["accuracy"] for r in rows],
                marker="o",
                markersize=size,
                label=method,
            )
    lengths = sorted({r["length"] for r in result["runs"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 102)
    ax.set_title(f"Key-value retrieval, {result['prompts']} prompts per length")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=[*METHODS, "paper"],
        help=f"`paper`: {PAPER}",
    )
    parser.add_argument(
        "--vanilla-max-len", type=int, default=2048, help="vanilla only up to this length"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "retrieval.json")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the runs already in --out for other (method, length) pairs",
    )
    args = parser.parse_args()
    args.methods = [n for m in args.methods for n in (PAPER if m == "paper" else [m])]
    from tqdm import tqdm

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    max_len = max(args.lengths)
    engines = {}
    for focus in sorted({METHODS[m][0] for m in args.methods}):
        engines[focus] = make_engine(args.model, focus, max_len)
    result = {
        "command": "python benchmarks/retrieval_eval.py",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "prompts": args.prompts,
        "decode": {"max_tokens": 4, **DECODE, "temperature": 0},
        "runs": [],
    }
    kept = []
    if args.merge and args.out.exists():
        pairs = {(m, n) for m in args.methods for n in args.lengths}
        earlier = json.loads(args.out.read_text())
        if earlier["prompts"] != args.prompts or earlier["args"]["seed"] != args.seed:
            raise SystemExit(f"--merge: {args.out} holds another prompt set (count or seed)")
        kept = [r for r in earlier["runs"] if (r["method"], r["length"]) not in pairs]
        result["merged_from"] = earlier.get("merged_from", []) + [earlier["args"]]
    jobs = [
        (length, method)
        for length in args.lengths
        for method in args.methods
        if method != "vanilla" or length <= args.vanilla_max_len
    ]
    result["runs"] = kept
    with tqdm(total=len(jobs), desc="retrieval eval") as progress:
        for length, method in jobs:
            task, items = questions(length, args.prompts, args.seed)
            focus, settings = METHODS[method]
            run = evaluate(engines[focus], task, items, settings)
            result["runs"].append({"method": method, "length": length, **run})
            result["runs"].sort(key=lambda r: (r["length"], list(METHODS).index(r["method"])))
            progress.set_postfix(method=method, length=length, acc=run["accuracy"])
            progress.update(1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    for run in result["runs"]:
        print(
            f"{run['method']:>14} {run['length']:>6}: {100 * run['accuracy']:6.2f}% "
            f"({run['right']}/{run['prompts']}), {run['tokens_per_s']:.1f} tok/s"
        )


if __name__ == "__main__":
    main()
