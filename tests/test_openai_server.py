"""`vllm serve <tiny dream dir> --attention-backend focus`, driven by the openai client.

One server for the module, no flags beyond sizing, the backend and server-wide diffusion
defaults (Focus knobs that make its short prompts sparse: one dense layer of two, one kept
prompt block of 4 tokens, 2 sinks). Checks tokens against the reference decoder, streaming by
committed blocks, chat through the checkpoint's template, usage and finish reasons, and
HTTP 400s that name the field while a concurrent good request completes unharmed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vllm_focus.reference.decode import finish, generate
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings

SERVER_DEFAULTS = {
    "gen_length": 64,
    "block_length": 16,
    "min_prompt_len": 8,
    "dense_layers": 1,
    "prompt_block_size": 4,
    "min_keep_tokens": 4,
    "num_sinks": 2,
}
MAX_MODEL_LEN = 512


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_dirs):
    model_dir = tiny_dirs["dream"]
    port = _free_port()
    vllm_cli = Path(sys.executable).parent / "vllm"
    command = [
        str(vllm_cli),
        "serve",
        model_dir,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--kv-cache-memory-bytes",
        str(8 << 20),
        "--attention-backend",
        "focus",
        "--additional-config",
        json.dumps({"focus_dllm": SERVER_DEFAULTS}),
    ]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    # Run outside the repository so its top-level folders can never shadow packages.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd="/")
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, process, log.name)
        yield base, model_dir
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        os.unlink(log.name)


def _wait_healthy(base: str, process, log_path: str, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError("vllm serve exited:\n" + Path(log_path).read_text()[-5000:])
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError("vllm serve did not become healthy:\n" + Path(log_path).read_text()[-5000:])


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    base, _ = server
    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(server):
    _, model_dir = server
    return ReferenceModel(model_dir)


def _expected(reference, prompt_ids, max_tokens, **overrides):
    model, eos = reference, reference.eos_token_ids
    settings = DiffusionSettings(**{**SERVER_DEFAULTS, **overrides})
    plan = settings.plan("dream", max_tokens, focus=True)
    return finish(generate(model, [prompt_ids], plan)[0], eos, max_tokens)


PROMPT = "The quick brown fox jumps over the lazy dog while the cat sleeps."


def test_completion_matches_reference(client, server, reference):
    _, model_dir = server
    response = client.completions.create(
        model=model_dir,
        prompt=PROMPT,
        max_tokens=40,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    prompt_ids, token_ids = choice.prompt_token_ids, choice.token_ids
    want, reason = _expected(reference, prompt_ids, 40)
    assert token_ids == want
    assert choice.finish_reason == reason
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(token_ids)


def test_per_request_settings_through_vllm_xargs(client, server, reference):
    _, model_dir = server
    xargs = {"cache": "prefix", "block_length": 8, "threshold": 0.5, "window": 2, "num_sinks": 0}
    response = client.completions.create(
        model=model_dir,
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        extra_body={"return_token_ids": True, "vllm_xargs": xargs},
    )
    choice = response.choices[0]
    assert choice.token_ids == _expected(reference, choice.prompt_token_ids, 24, **xargs)[0]


def test_streaming_delivers_committed_blocks(client, server):
    _, model_dir = server
    kwargs = dict(
        model=model_dir,
        prompt=PROMPT,
        max_tokens=64,
        temperature=0,
        extra_body={"vllm_xargs": {"block_length": 16}},
    )
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.text
    deltas = [c for c in chunks if c.choices and c.choices[0].text]
    # 64 tokens in blocks of 16 arrive as up to 4 pieces (fewer if EOS ends the output).
    assert 1 <= len(deltas) <= 4
    if whole.finish_reason == "length":
        assert len(deltas) == 4


def test_chat_uses_the_template_and_reports_usage(client, server, reference):
    _, model_dir = server
    response = client.chat.completions.create(
        model=model_dir,
        messages=[{"role": "user", "content": "Hello, how are you today?"}],
        max_tokens=32,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = response.choices[0]
    prompt_ids = response.prompt_token_ids
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello, how are you today?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt_ids == tokenizer.encode(rendered, add_special_tokens=False)
    want, reason = _expected(reference, prompt_ids, 32)
    assert choice.token_ids == want
    assert choice.finish_reason == reason
    assert response.usage.completion_tokens == len(want)


def test_bad_requests_get_400_while_a_good_one_completes(client, server):
    import openai

    _, model_dir = server
    good = dict(model=model_dir, prompt=PROMPT, max_tokens=64, temperature=0)
    alone = client.completions.create(**good).choices[0].text
    result: dict[str, str] = {}

    def run_good() -> None:
        result["text"] = client.completions.create(**good).choices[0].text

    thread = threading.Thread(target=run_good)
    thread.start()
    bad_cases = [
        ({"vllm_xargs": {"block_length": 0}}, "block_length"),
        ({"vllm_xargs": {"threshold": 2}}, "threshold"),
        ({"vllm_xargs": {"confidence": "loudest"}}, "confidence"),
        ({"vllm_xargs": {"blocksize": 8}}, "blocksize"),
        ({"vllm_xargs": {"steps": 7}}, "steps"),
        ({"vllm_xargs": {"keep_ratio": 0}}, "keep_ratio"),
        ({"vllm_xargs": {"dense_layers": 0}}, "dense_layers"),
    ]
    for extra_body, field in bad_cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(**good, extra_body=extra_body)
        assert field in str(info.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_dir, prompt="word " * 600, max_tokens=8)
    thread.join(timeout=120)
    assert result["text"] == alone
