"""Demo: the built-in retrieval model answers questions from a long prompt, dense and with Focus;
then tiny Dream and LLaDA checkpoints through every cache mode, checked against the reference.

    bash scripts/demo.sh            # or: .venv/bin/python examples/demo.py --retrieval-tokens 4096

Part 1 serves `examples/models/kv-retrieval-llada` (a LLaDA-architecture model whose weights
implement a key-value retrieval circuit; see its model card) with vLLM's `LLM`, once with the
default attention (Fast-dLLM dual cache) and once with `attention_backend="focus"`, asks
`--questions` questions about records hidden in a `--retrieval-tokens` long context, and prints
each answer, whether it is right, and the time each engine took.

Part 2 (skip with `--retrieval-only`): for each model family it starts vLLM's `LLM` engine on
a tiny random-weight checkpoint (4 layers; no trust_remote_code: the plugin registers the
configs and models), sends one long chat prompt with each KV-cache mode, then starts a second
engine with
`attention_backend="focus"` and sends it again with Focus on the dual cache. It prints the
time, tokens/s and whether the engine's tokens equal the plain-PyTorch reference decoder's
(docs/design.md §3) — they must, token for token.

Those weights are random, so the text is noise; the point is the plumbing, the exactness and
the cost of each mode.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

FILLER = (
    "The river flows to the sea, and the sea returns the rain to the mountains. "
    "Numbers 0 1 2 3 4 5 6 7 8 9 appear in the ledger of key alpha and key beta. "
)
MODES = {
    "dense": [("none", "block"), ("prefix", "block"), ("dual", "block"), ("dual", "prefill")],
    "focus": [("dual", "block"), ("dual", "prefill")],
}


def long_prompt(tokenizer, num_tokens: int) -> list[int]:
    messages = [{"role": "user", "content": FILLER * (num_tokens // 20) + "What is key beta?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)[-num_tokens:]


RETRIEVAL_MODEL = Path(__file__).resolve().parent / "models" / "kv-retrieval-llada"


def run_retrieval(args) -> None:
    import random

    from vllm import LLM, SamplingParams

    from vllm_focus.testing.retrieval import KVTask

    task = KVTask()
    rng = random.Random(args.seed)
    length = args.retrieval_tokens
    items = [task.question_for(rng, length) for _ in range(args.questions)]
    print(f"\n=== retrieval model ({RETRIEVAL_MODEL}), prompts of {length} tokens ===")
    print("  a prompt ends: ..." + task.text(items[0].prompt[-24:]))
    params = SamplingParams(temperature=0.0, max_tokens=4, extra_args={"block_length": 4})
    answers = {}
    for attention in ("dense", "focus"):
        llm = LLM(
            model=str(RETRIEVAL_MODEL),
            dtype="float32",
            max_model_len=length + 64,
            kv_cache_memory_bytes=128 << 20,
            **({"attention_backend": "focus"} if attention == "focus" else {}),
        )
        for q in items:
            start = time.perf_counter()
            output = llm.generate([task.text(q.prompt)], params, use_tqdm=False)[0]
            answers[attention, q.key] = (output.outputs[0].text, time.perf_counter() - start)
        llm.llm_engine.engine_core.shutdown()
    right = {"dense": 0, "focus": 0}
    for q in items:
        want = task.text(q.answer)
        line = f"  ? {task.words[q.key]:<7} want {want}"
        for attention in ("dense", "focus"):
            text, seconds = answers[attention, q.key]
            ok = text.strip() == want
            right[attention] += ok
            line += f" | {attention}: {text.strip()!r} {'right' if ok else 'WRONG'} {seconds:.2f}s"
        print(line)
    for attention, count in right.items():
        print(f"  {attention}: {count}/{len(items)} right")


def run_family(arch: str, args) -> None:
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_focus.reference.decode import served_outputs
    from vllm_focus.reference.model import ReferenceModel
    from vllm_focus.settings import DiffusionSettings
    from vllm_focus.testing.tiny import write_tiny_checkpoint

    path = str(write_tiny_checkpoint(Path(args.workdir) / arch, arch, num_layers=4))
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = long_prompt(tokenizer, args.prompt_tokens)
    print(f"\n=== tiny {arch} ({path}), prompt of {len(prompt)} tokens ===")
    reference = ReferenceModel(path)
    rows = []
    for attention, modes in MODES.items():
        llm = LLM(
            model=path,
            dtype="float32",
            max_model_len=args.prompt_tokens + 2 * args.max_tokens,
            kv_cache_memory_bytes=128 << 20,
            seed=0,
            **({"attention_backend": "focus"} if attention == "focus" else {}),
        )
        for cache, refresh in tqdm(modes, desc=f"{arch}: {attention}"):
            settings = {"cache": cache, "refresh": refresh, "gen_length": args.max_tokens}
            params = SamplingParams(
                temperature=0.0, max_tokens=args.max_tokens, extra_args=settings
            )
            start = time.perf_counter()
            output = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
            seconds = time.perf_counter() - start
            tokens = list(output.outputs[0].token_ids)
            want = served_outputs(
                reference,
                [prompt],
                DiffusionSettings(**settings),
                [args.max_tokens],
                focus=attention == "focus",
            )[0]
            text = output.outputs[0].text
            rows.append((attention, cache, refresh, seconds, tokens, tokens == want, text))
        llm.llm_engine.engine_core.shutdown()
    for attention, cache, refresh, seconds, tokens, exact, text in rows:
        print(
            f"  {attention:<5} cache={cache:<6} refresh={refresh:<7} {seconds:6.2f}s "
            f"{len(tokens) / seconds:7.1f} tok/s  equals reference: {'yes' if exact else 'NO'}"
            f"  text: {text[:40]!r}"
        )
    if not all(row[5] for row in rows):
        raise SystemExit("the engine disagreed with the reference decoder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrieval-tokens", type=int, default=2048)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrieval-only", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vllm-focus-demo"))
    args = parser.parse_args()
    run_retrieval(args)
    if args.retrieval_only:
        return
    for arch in ("dream", "llada"):
        run_family(arch, args)


if __name__ == "__main__":
    main()
