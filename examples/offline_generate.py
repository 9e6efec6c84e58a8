"""Offline generation with vLLM's `LLM` API on a masked diffusion LM.

    python examples/offline_generate.py                      # tiny built-in Dream checkpoint
    python examples/offline_generate.py --model /models/LLaDA-8B-Instruct --dtype bfloat16

Decoding settings go per request in `SamplingParams.extra_args` (or server-wide with
`additional_config={"focus_dllm": {...}}`): block_length, steps, schedule, confidence,
threshold, cache (none / prefix / dual), refresh (block / prefill), gen_length.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: a tiny Dream)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    model = args.model
    if model is None:
        from vllm_focus.testing.tiny import write_tiny_checkpoint

        model = str(write_tiny_checkpoint(Path(tempfile.gettempdir()) / "tiny-dream", "dream"))
    llm = LLM(
        model=model,
        dtype=args.dtype,
        max_model_len=2048,
        kv_cache_memory_bytes=256 << 20,
    )
    conversations = [
        [{"role": "user", "content": "Summarise the report in one sentence."}],
        [{"role": "user", "content": "What is the value of key gamma?"}],
    ]
    for settings in ({"cache": "dual"}, {"cache": "prefix", "threshold": 0.9}):
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, extra_args=settings)
        outputs = llm.chat(conversations, params, use_tqdm=False)
        for conversation, output in zip(conversations, outputs):
            completion = output.outputs[0]
            print(f"[{settings}] {conversation[0]['content']!r}")
            print(
                f"  -> {completion.text!r} ({len(completion.token_ids)} tokens, "
                f"finish_reason={completion.finish_reason})"
            )


if __name__ == "__main__":
    main()
