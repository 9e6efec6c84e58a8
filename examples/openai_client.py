"""Talk to `vllm serve <dLLM checkpoint>` with the official openai client.

    vllm serve /tmp/tiny-dream --dtype float32 --max-model-len 2048 &
    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1

or let the example start a server on a tiny built-in checkpoint itself:

    python examples/openai_client.py --serve

Diffusion settings ride in `extra_body={"vllm_xargs": {...}}`; a bad value is an HTTP 400
that names the field.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def start_server(port: int, arch: str) -> subprocess.Popen:
    from vllm_focus.testing.tiny import write_tiny_checkpoint

    model = str(write_tiny_checkpoint(Path(tempfile.gettempdir()) / f"tiny-{arch}", arch))
    vllm_cli = Path(sys.executable).parent / "vllm"
    command = [
        str(vllm_cli),
        "serve",
        model,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--kv-cache-memory-bytes",
        str(64 << 20),
    ]
    process = subprocess.Popen(command, cwd="/")
    for _ in range(300):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            if process.poll() is not None:
                raise SystemExit("vllm serve exited") from None
            time.sleep(1)
    process.terminate()
    raise SystemExit("vllm serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--serve", action="store_true", help="start a tiny server first")
    parser.add_argument(
        "--arch",
        default="dream",
        choices=["dream", "llada"],
        help="tiny checkpoint to serve with --serve",
    )
    args = parser.parse_args()

    import openai

    server = start_server(8000, args.arch) if args.serve else None
    try:
        client = openai.OpenAI(base_url=args.base_url, api_key="unused")
        model = client.models.list().data[0].id
        completion = client.completions.create(
            model=model, prompt="The river flows to the sea, and", max_tokens=32, temperature=0
        )
        print("completion:", repr(completion.choices[0].text), completion.usage)

        print("streaming (one piece per committed block):")
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Tell me about attention sinks."}],
            max_tokens=64,
            temperature=0,
            stream=True,
            extra_body={"vllm_xargs": {"block_length": 16, "cache": "dual"}},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print("  +", repr(chunk.choices[0].delta.content))

        try:
            client.completions.create(
                model=model,
                prompt="hi",
                max_tokens=8,
                extra_body={"vllm_xargs": {"block_length": 0}},
            )
        except openai.BadRequestError as err:
            print("bad setting rejected:", err.status_code, err.body.get("message", err))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
