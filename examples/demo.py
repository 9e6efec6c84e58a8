"""Demo: the built-in retrieval model answers questions from a long prompt, dense and with Focus;
then tiny Dream and LLaDA checkpoints through every cache mode, checked against the reference.

    bash scripts/demo.sh            # or: .venv/bin/python examples/demo.py --retrieval-tokens 4096

Part 1 serves `examples/models/kv-retrieval-llada` (a LLaDA-architecture model whose weights
implement a key-value retrieval circuit; see its model card) with vLLM's `LLM`, once with the
default attention (Fast-dLLM dual cache) and once with `attention_backend="focus"`, asks
`--questions` questions (all in flight at once) about records hidden in a `--retrieval-tokens`
long context, and prints each answer, whether it is right, and the time each engine took.

Part 2, Focus where it pays (skip with `--skip-speed`): `--speed-requests` requests of
`--speed-tokens` random tokens in flight on a 12-layer random-weight LLaDA-like checkpoint,
256 tokens each, dense `dual` and Focus with refresh `prefill`: the time of each and the
ratio (the weights are random, so this part checks speed, not answers).

Part 3 (skip with `--retrieval-only`): for each model family it starts vLLM's `LLM` engine on
a tiny random-weight checkpoint (4 layers; no trust_remote_code: the plugin registers the
configs and models), sends one long chat prompt with each KV-cache mode, then starts a second
engine with `attention_backend="focus"` and sends it again with Focus on the dual cache. It
prints the time, tokens/s and whether the engine's tokens equal the plain-PyTorch reference
decoder's (docs/design.md §3) — they must, token for token.

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
    print(f"\n=== retrieval model ({RETRIEVAL_MODEL}), {len(items)} questions in flight, "
          f"prompts of {length} tokens ===")  # fmt: skip
    print("  a prompt ends: ..." + task.text(items[0].prompt[-24:]))
    params = SamplingParams(temperature=0.0, max_tokens=4, extra_args={"block_length": 4})
    answers, seconds = {}, {}
    for attention in ("dense", "focus"):
        llm = LLM(
            model=str(RETRIEVAL_MODEL),
            dtype="float32",
            max_model_len=length + 64,
            max_num_batched_tokens=len(items) * (length + 64),
            kv_cache_memory_bytes=(len(items) * (length + 64) * 3 * 2 * 192 * 4 * 5) // 4
            + (32 << 20),
            **({"attention_backend": "focus"} if attention == "focus" else {}),
        )
        llm.generate([task.text(items[0].prompt[-64:])], params, use_tqdm=False)  # one-off costs
        start = time.perf_counter()
        outputs = llm.generate([task.text(q.prompt) for q in items], params, use_tqdm=False)
        seconds[attention] = time.perf_counter() - start
        for q, output in zip(items, outputs):
            answers[attention, q.key] = output.outputs[0].text
        llm.llm_engine.engine_core.shutdown()
    right = {"dense": 0, "focus": 0}
    for q in items:
        want = task.text(q.answer)
        line = f"  ? {task.words[q.key]:<7} want {want}"
        for attention in ("dense", "focus"):
            text = answers[attention, q.key]
            ok = text.strip() == want
            right[attention] += ok
            line += f" | {attention}: {text.strip()!r} {'right' if ok else 'WRONG'}"
        print(line)
    for attention, count in right.items():
        print(f"  {attention}: {count}/{len(items)} right, {seconds[attention]:.2f}s for all")
    print(
        "  (a 4-token answer is one forward over the whole prompt and 3 short steps: the same "
        "work for both, so Focus cannot win here; it pays where decoding is long, below)"
    )


def run_speed(args) -> None:
    """Where Focus pays on a CPU: several long requests in flight, a long generation, a model
    deep enough that its 2 dense layers are a small share (random weights: a speed check,
    not an answer check; the tokens are compared with dense's)."""
    from vllm import LLM, SamplingParams

    from vllm_focus.testing.tiny import write_tiny_checkpoint

    shape = dict(num_heads=4, num_kv_heads=4, hidden_size=256, intermediate_size=768)
    path = write_tiny_checkpoint(Path(args.workdir) / "llada-12", "llada", num_layers=12, **shape)
    n, length, gen = args.speed_requests, args.speed_tokens, 256
    import json

    import torch

    vocab = json.loads((path / "tiny_shape.json").read_text())["vocab_size"]
    generator = torch.Generator().manual_seed(args.seed)
    # Ordinary tokens only (the tiny tokenizers' specials sit at the end of the vocabulary).
    prompts = [
        torch.randint(10, vocab - 16, (length,), generator=generator).tolist() for _ in range(n)
    ]
    print(f"\n=== Focus where it pays: 12-layer LLaDA-like model, {n} requests of {length} "
          f"tokens in flight, {gen} tokens each (block 32, one per step) ===")  # fmt: skip
    settings = {"cache": "dual", "refresh": "prefill", "gen_length": gen, "steps": gen}
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True, extra_args=settings)
    results = {}
    for attention in ("dense", "focus"):
        llm = LLM(
            model=str(path),
            dtype="float32",
            max_model_len=length + gen,
            max_num_batched_tokens=n * (length + gen),
            kv_cache_memory_bytes=int(1.3 * n * (length + gen) * 12 * 256 * 2 * 4),
            seed=0,
            **({"attention_backend": "focus"} if attention == "focus" else {}),
        )
        llm.generate([prompts[0][:64]], params, use_tqdm=False)  # one-off start-up costs
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        results[attention] = (
            time.perf_counter() - start,
            [o.outputs[0].token_ids for o in outputs],
        )
        llm.llm_engine.engine_core.shutdown()
    for attention, (seconds, _) in results.items():
        print(f"  {attention:<5} (cache dual, refresh prefill): {seconds:6.1f}s, "
              f"{n * gen / seconds:6.1f} tok/s")  # fmt: skip
    same = sum(
        a == b for x, y in zip(results["dense"][1], results["focus"][1]) for a, b in zip(x, y)
    )
    ratio = results["dense"][0] / results["focus"][0]
    print(
        f"  Focus: {ratio:.2f}x dense end to end; {same / (n * gen):.0%} of its tokens equal "
        "dense's (random weights: near-ties flip)"
    )


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
    parser.add_argument("--retrieval-tokens", type=int, default=8192)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--speed-requests", type=int, default=4)
    parser.add_argument("--speed-tokens", type=int, default=4096)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrieval-only", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vllm-focus-demo"))
    args = parser.parse_args()
    run_retrieval(args)
    if args.retrieval_only:
        return
    if not args.skip_speed:
        run_speed(args)
    for arch in ("dream", "llada"):
        run_family(arch, args)


if __name__ == "__main__":
    main()
