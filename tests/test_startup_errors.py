"""Bad server configuration stops `vllm serve` at startup, with a message naming the problem,
before it accepts any request (it never reports "Application startup complete").

Each case is a real `vllm serve` process: an invalid `--additional-config` value, a checkpoint
with a broken config.json or a missing shard, and `--attention-backend focus` on an
architecture the plugin does not serve. (In-process checks of more setting values live in
test_configs.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_focus.testing import server as serving

COMMON = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "512")
COMMON += ("--kv-cache-memory-bytes", str(8 << 20))


def _llama_checkpoint(tiny_dir: str, out: Path) -> Path:
    """A config-only causal LM (an architecture vLLM serves itself), with the tiny tokenizer."""
    out.mkdir()
    for name in Path(tiny_dir).glob("tokenizer*"):
        shutil.copy(name, out / name.name)
    vocab = json.loads((Path(tiny_dir) / "config.json").read_text())["vocab_size"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def _broken_copy(tiny_dir: str, out: Path, how: str) -> Path:
    shutil.copytree(tiny_dir, out)
    if how == "missing shard":
        (out / "model-00002-of-00002.safetensors").unlink()
    elif how == "mask id outside the vocabulary":
        config = json.loads((out / "config.json").read_text())
        config["mask_token_id"] = config["vocab_size"] + 5
        (out / "config.json").write_text(json.dumps(config))
    return out


CASES = {
    "block_length out of range": (
        "dream",
        ["--attention-backend", "focus"],
        {"focus_dllm": {"block_length": 0}},
        ["additional_config['focus_dllm']", "`block_length` must be an integer in [1, 4096]"],
    ),
    "mask id outside the vocabulary": ("dream", [], None, ["mask_token_id"]),
    "missing shard": ("llada", [], None, ["model-00002-of-00002.safetensors"]),
    "focus on an unsupported architecture": (
        "llama",
        ["--attention-backend", "focus"],
        None,
        ["--attention-backend focus serves masked diffusion models only", "LlamaForCausalLM"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_configuration_stops_the_server_at_startup(case, tiny_dirs, tmp_path):
    arch, args, additional, messages = CASES[case]
    if arch == "llama":
        model_dir = _llama_checkpoint(tiny_dirs["dream"], tmp_path / "llama")
    else:
        model_dir = _broken_copy(tiny_dirs[arch], tmp_path / "model", case)
    server = serving.start(
        str(model_dir), *COMMON, *args, log_path=str(tmp_path / "serve.log"), additional=additional
    )
    status = serving.wait_exit(server, timeout=300)
    log = server.log()
    assert status != 0
    assert "Application startup complete" not in log
    for message in messages:
        assert message in log, log[-3000:]
