"""Dream's published tokenizer layout (vocab.json + merges.txt, `DreamTokenizer`, auto_map to
remote code, no tokenizer.json) served with no flags, and with `--trust-remote-code`.

The oracle for the ids is the checkpoint's own remote module, a slow pure-Python BPE
(vllm_focus/testing/dream_remote_tokenizer.py) that shares no code with the Rust-backed
Qwen2 tokenizer the plugin serves these files with.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vllm_focus.reference.decode import finish, generate
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings
from vllm_focus.testing import server as serving
from vllm_focus.testing.tiny import write_tiny_checkpoint

STRINGS = [
    "Hello world",
    " Hello  world 123\n\n",
    "What is the value of key gamma? The value of key gamma is 93.",
    "naïve café 東京 — e\u0301 (a combining accent, NFC-composed)",
    "😀 emoji and \t tabs \r\n and\u00a0no-break space",
    "don't I'll we've THEY'RE",
    "<|im_start|>user\nhi<|im_end|><|mask|><|mask|>",
    "a<|endoftext|>b<|im_end|>",
    "def add(a, b):\n    return a + b\n",
    "",
    "   ",
]
MESSAGES = [
    [{"role": "user", "content": "Hello, how are you today?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the value of key beta?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "And key alpha?"},
    ],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("dream-published")
    return str(write_tiny_checkpoint(out, "dream", tokenizer_layout="published"))


def _slow_tokenizer(model_dir: str):
    path = Path(model_dir) / "tokenization_dream.py"
    spec = importlib.util.spec_from_file_location("published_tokenization_dream", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DreamTokenizer.from_pretrained(model_dir)


def test_the_layout_is_dreams(model_dir):
    files = {p.name for p in Path(model_dir).iterdir()}
    assert {"vocab.json", "merges.txt", "tokenization_dream.py", "configuration_dream.py"} <= files
    assert "tokenizer.json" not in files
    config = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "DreamTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]}
    assert json.loads((Path(model_dir) / "config.json").read_text())["auto_map"]["AutoConfig"] == (
        "configuration_dream.DreamConfig"
    )


def test_without_the_plugin_transformers_asks_for_remote_code(model_dir):
    """What a user hit before: the layout is refused unless remote code is trusted (run in a
    fresh interpreter, where nothing has registered the plugin's names)."""
    import subprocess
    import sys

    code = (
        "from transformers import AutoTokenizer\n"
        f"AutoTokenizer.from_pretrained({model_dir!r}, trust_remote_code=False)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "trust_remote_code" in result.stderr


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_ids_equal_the_slow_bpe(model_dir, trust_remote_code):
    from transformers import AutoTokenizer

    import vllm_focus
    from vllm_focus.model_executor.tokenization_dream import DreamTokenizer

    vllm_focus.register_hf_configs()
    fast = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    slow = _slow_tokenizer(model_dir)
    # The plugin's class, on transformers' Rust-backed Qwen2 BPE, even when remote code is
    # trusted; the remote module never runs.
    assert type(fast) is DreamTokenizer and fast.is_fast and not slow.is_fast
    assert fast.get_vocab() == slow.get_vocab()
    assert fast.all_special_ids == slow.all_special_ids
    for name in ("eos", "pad", "bos", "mask"):
        assert getattr(fast, f"{name}_token_id") == getattr(slow, f"{name}_token_id"), name
    merged = 0
    for text in STRINGS:
        ids = fast(text)["input_ids"]
        assert ids == slow(text)["input_ids"], text
        assert fast.decode(ids) == slow.decode(ids), text
        assert fast.decode(ids, skip_special_tokens=True) == slow.decode(
            ids, skip_special_tokens=True
        ), text
        merged += sum(1 for i in ids if 256 <= i < fast.vocab_size)
    assert merged > 20  # the merges were exercised, not only single bytes
    for messages in MESSAGES:
        rendered = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered == slow.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert rendered.endswith("<|im_start|>assistant\n")
        assert fast.encode(rendered, add_special_tokens=False) == slow.encode(
            rendered, add_special_tokens=False
        )


def test_engine_config_with_remote_code_trusted_is_the_plugins(model_dir):
    """With --trust-remote-code vLLM still builds its config from the plugin's class (its config
    registry takes precedence over auto_map), so the model classes see the validated config;
    the checkpoint's remote config module does load on its own."""
    from transformers import AutoConfig
    from vllm.engine.arg_utils import EngineArgs

    import vllm_focus
    from vllm_focus.model_executor.configs.dream import DreamConfig

    vllm_focus.register()
    config = EngineArgs(model=model_dir, dtype="float32", trust_remote_code=True)
    hf_config = config.create_engine_config().model_config.hf_config
    assert type(hf_config) is DreamConfig
    spec = importlib.util.spec_from_file_location(
        "published_configuration_dream", Path(model_dir) / "configuration_dream.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    remote = module.DreamConfig.from_pretrained(model_dir)
    ours = AutoConfig.from_pretrained(model_dir)
    for key in ("hidden_size", "num_attention_heads", "num_key_value_heads", "mask_token_id"):
        assert getattr(remote, key) == getattr(ours, key) == getattr(hf_config, key), key


SERVER_DEFAULTS = {"gen_length": 32, "block_length": 16}


@pytest.fixture(scope="module", params=[(), ("--trust-remote-code",)], ids=["no-flags", "trust"])
def server(request, model_dir, tmp_path_factory):
    """`vllm serve DIR` with only sizing flags and float32 (and --trust-remote-code for the
    second). The config's torch_dtype is bfloat16, as Dream's is: served in it, the tokens are
    the float32 reference's only where no near-tie rounds the other way, which depends on the
    CPU's matmul path (a session's machine without oneDNN's float kernels flipped one)."""
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--max-model-len", "256", "--kv-cache-memory-bytes", str(8 << 20), "--dtype", "float32"]
    args += list(request.param)
    process = serving.start(
        model_dir, *args, log_path=str(log_path), additional={"focus_dllm": SERVER_DEFAULTS}
    )
    try:
        serving.wait_healthy(process)
        yield process
    finally:
        process.stop()


def test_chat_request_is_answered_as_the_reference_answers(server, model_dir):
    from openai import OpenAI

    client = OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = MESSAGES[0]
    response = client.chat.completions.create(
        model=model_dir,
        messages=messages,
        max_tokens=32,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    slow = _slow_tokenizer(model_dir)
    rendered = slow.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert response.prompt_token_ids == slow.encode(rendered, add_special_tokens=False)
    reference = ReferenceModel(model_dir)
    plan = DiffusionSettings(**SERVER_DEFAULTS).plan("dream", 32, focus=False)
    want, reason = finish(
        generate(reference, [response.prompt_token_ids], plan)[0], reference.eos_token_ids, 32
    )
    choice = response.choices[0]
    assert choice.token_ids == want
    assert choice.finish_reason == reason
    # Random weights end on incomplete UTF-8; vLLM's incremental detokenizer holds those
    # trailing bytes back, so the text is the slow decode less its trailing U+FFFD.
    assert choice.message.content == slow.decode(want, skip_special_tokens=True).rstrip("\ufffd")
