"""Demo: tiny built-in Dream and LLaDA checkpoints, a long prompt, every cache mode.

    bash scripts/demo.sh            # or: .venv/bin/python examples/demo.py --prompt-tokens 2048

What it shows today, honestly:
1. vLLM loads each checkpoint through the plugin (no trust_remote_code) and its model class
   computes the same logits as the plain-torch reference on the long prompt.
2. Generation runs through the *reference decoder* (plain PyTorch, DESIGN §3), once per cache
   mode, with the time each took. The denoising loop inside vLLM's engine (`LLM(...)` and
   `vllm serve`) is the next issue; until then this is the decoder the engine will be held to.

The checkpoints have random weights, so the text is noise; the point is the plumbing, the
agreement between vLLM and the reference, and the cost of each cache mode.
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


def long_prompt(tokenizer, num_tokens: int) -> list[int]:
    messages = [{"role": "user", "content": FILLER * (num_tokens // 20) + "What is key beta?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)[-num_tokens:]


def check_vllm_logits(path: str, prompt: list[int]) -> float:
    import torch

    from vllm_focus.reference.model import ReferenceModel
    from vllm_focus.testing.harness import Forward, InProcessModel

    engine = InProcessModel(path, max_model_len=len(prompt) + 64)
    ids = torch.tensor(prompt)
    got = engine.logits(Forward(ids, torch.arange(len(prompt)), len(prompt)))
    want, _ = ReferenceModel(path).forward(ids)
    return (got - want).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "vllm-focus-demo"))
    args = parser.parse_args()

    from tqdm import tqdm
    from transformers import AutoTokenizer

    import vllm_focus
    from vllm_focus.reference.decode import finish, generate
    from vllm_focus.reference.model import ReferenceModel
    from vllm_focus.settings import DiffusionSettings
    from vllm_focus.testing.tiny import write_tiny_checkpoint

    vllm_focus.register()
    modes = [("none", "block"), ("prefix", "block"), ("dual", "block"), ("dual", "prefill")]
    for arch in ("dream", "llada"):
        path = str(write_tiny_checkpoint(Path(args.workdir) / arch, arch))
        tokenizer = AutoTokenizer.from_pretrained(path)
        prompt = long_prompt(tokenizer, args.prompt_tokens)
        print(f"\n=== tiny {arch} ({path}), prompt of {len(prompt)} tokens ===")
        error = check_vllm_logits(path, prompt)
        print(f"vLLM model class vs reference forward: max |logit difference| = {error:.2e}")
        model = ReferenceModel(path)
        eos = set(tokenizer.convert_tokens_to_ids([tokenizer.eos_token]))
        results = {}
        for cache, refresh in tqdm(modes, desc=f"{arch}: cache modes"):
            settings = DiffusionSettings(cache=cache, refresh=refresh, gen_length=args.max_tokens)
            plan = settings.plan(model.config.family, args.max_tokens)
            start = time.perf_counter()
            tokens = generate(model, [prompt], plan)[0]
            seconds = time.perf_counter() - start
            results[(cache, refresh)] = (finish(tokens, eos, args.max_tokens)[0], seconds)
        baseline = results[("none", "block")]
        for (cache, refresh), (tokens, seconds) in results.items():
            same = sum(a == b for a, b in zip(tokens, baseline[0])) / max(len(baseline[0]), 1)
            text = tokenizer.decode(tokens[:24]).replace("\n", " ")
            print(f"  cache={cache:<6} refresh={refresh:<7} {seconds:6.2f}s "
                  f"({baseline[1] / seconds:4.1f}x vs none)  same tokens as none: {same:4.0%}  "
                  f"text: {text!r}")  # fmt: skip


if __name__ == "__main__":
    main()
