"""LongBench (the paper's 13 tasks) through vLLM, per decoding method: a table like Table 1.

    python benchmarks/longbench.py --longbench /data/LongBench --model /models/LLaDA-8B-Instruct \\
        --methods dual focus --budget 31500 --gen-length 256 --block-length 32
    python benchmarks/longbench.py --longbench DIR --model DIR --tasks qasper trec --limit 20

`--longbench` is a copy of THUDM/LongBench (v1): `data/<task>.jsonl` and the official
`config/dataset2prompt.json` / `config/dataset2maxlen.json` (prompt templates and answer
lengths; this project does not ship them). Each record's prompt is the task's template filled
with its context and question, middle-truncated to `--budget` tokens as LongBench does, and
wrapped in the model's chat template except for few-shot and code tasks (`--no-chat` for base
models). Generation: greedy, `max_tokens` = the task's answer length, capped by
`--gen-length` (the canvas), with `--block-length`. Methods:

- `vanilla` (cache `none`), `dual` (Fast-dLLM dual cache) on vLLM's default attention;
- `focus`, `focus-prefill`: Focus attention (FOCUS backend, default knobs) on the dual cache,
  refresh `block` / `prefill`;
- `sparse-dllm`, `sparsed`: Sparse-dLLM (dual cache) and SparseD (no cache) on the FOCUS
  backend, at their published defaults;
- `paper`: the paper's five, vanilla, dual, sparse-dllm, sparsed and focus.

`--focus-knobs` (JSON) overrides settings of every method on the FOCUS backend.

Prints the per-task scores and the average for each method, and writes JSON
(benchmarks/results/longbench.json by default). Metrics: vllm_focus/longbench.py. This is meant
for real checkpoints on a GPU; CI runs it on synthetic records in the LongBench schema.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from vllm_focus.longbench import TASKS, build_prompt, load_config, load_records, task_score

# The paper's Table 1 methods (`--methods paper`).
PAPER = ["vanilla", "dual", "sparse-dllm", "sparsed", "focus"]
METHODS = {
    "vanilla": (False, {"cache": "none"}),
    "dual": (False, {"cache": "dual", "refresh": "block"}),
    "focus": (True, {"cache": "dual", "refresh": "block"}),
    "focus-prefill": (True, {"cache": "dual", "refresh": "prefill"}),
    # Sparse-dLLM at its published defaults (README, "Sparse-dLLM").
    "sparse-dllm": (True, {"cache": "dual", "refresh": "block", "method": "sparse_dllm"}),
    # SparseD at its published recipe (README, "SparseD"): no cache.
    "sparsed": (True, {"cache": "none", "method": "sparsed"}),
}


def run(args) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    root = Path(args.longbench)
    configs = load_config(root)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tasks = args.tasks or list(TASKS)
    prompts = {}
    for task in tasks:
        records = load_records(root, task, args.limit)
        prompts[task] = [
            (build_prompt(tokenizer, task, r, configs[task], args.budget, not args.no_chat), r)
            for r in records
        ]
    max_len = max(len(ids) for items in prompts.values() for ids, _ in items) + args.gen_length
    knobs = json.loads(args.focus_knobs) if args.focus_knobs else {}
    result = {"args": vars(args), "scores": {}, "average": {}, "seconds": {}}
    engines: dict[bool, object] = {}
    for method in args.methods:
        focus, settings = METHODS[method]
        if focus not in engines:
            extra = {"attention_backend": "focus"} if focus else {}
            engines[focus] = LLM(
                model=args.model,
                dtype=args.dtype,
                max_model_len=max_len,
                tensor_parallel_size=args.tensor_parallel_size,
                enforce_eager=args.enforce_eager,
                **({"kv_cache_memory_bytes": args.kv_cache_bytes} if args.kv_cache_bytes else {}),
                **extra,
            )
        llm = engines[focus]
        decode = {**settings, "block_length": args.block_length, "gen_length": args.gen_length}
        if focus:
            decode |= knobs
        scores, started = {}, time.perf_counter()
        for task in tqdm(tasks, desc=method):
            params = SamplingParams(
                temperature=0,
                max_tokens=min(configs[task].max_new_tokens, args.gen_length),
                extra_args=decode,
            )
            items = prompts[task]
            outputs = llm.generate([{"prompt_token_ids": ids} for ids, _ in items], params)
            scores[task] = task_score(
                task,
                [
                    (out.outputs[0].text, r["answers"], r.get("all_classes"))
                    for out, (_, r) in zip(outputs, items)
                ],
            )
        result["scores"][method] = scores
        result["average"][method] = sum(scores.values()) / len(scores)
        result["seconds"][method] = time.perf_counter() - started
    return result


def table(result: dict) -> str:
    methods = list(result["scores"])
    tasks = list(next(iter(result["scores"].values())))
    lines = ["| task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for task in tasks:
        cells = " | ".join(f"{result['scores'][m][task]:.2f}" for m in methods)
        lines.append(f"| {task} | {cells} |")
    lines.append("| **average** | " + " | ".join(f"{result['average'][m]:.2f}" for m in methods))
    lines[-1] += " |"
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--longbench", required=True, help="LongBench dir: data/ and config/")
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["dual", "focus"],
        choices=[*METHODS, "paper"],
        help=f"`paper`: {PAPER}",
    )
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS))
    parser.add_argument("--limit", type=int, help="records per task (default: all)")
    parser.add_argument("--budget", type=int, default=31500, help="prompt tokens after truncation")
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--focus-knobs", help='JSON, e.g. {"keep_ratio": 0.2}')
    parser.add_argument("--no-chat", action="store_true", help="no chat template (base models)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--kv-cache-bytes", type=int, help="KV cache size (needed on CPU)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "longbench.json"
    )
    args = parser.parse_args(argv)
    args.methods = [n for m in args.methods for n in (PAPER if m == "paper" else [m])]
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    result = run(args)
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
