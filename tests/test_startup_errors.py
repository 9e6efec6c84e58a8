"""Bad server configuration stops `vllm serve` at startup, with a message naming the problem,
before it accepts any request (it never reports "Application startup complete").

Each case is a real `vllm serve` process: an invalid `--additional-config` value, a checkpoint
with a broken config.json or a missing shard, a head size the dense CPU attention cannot run,
and `--attention-backend focus` on an architecture the plugin does not serve. Engine options
that assume token-by-token decoding are refused by the config hook; those are checked in
process (`EngineArgs.create_engine_config`, what `vllm serve` and `LLM` call first). (More
setting values: test_configs.py.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_focus.testing import server as serving

COMMON = ("--dtype", "float32", "--max-model-len", "512")
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
    elif how == "head size 16 on the dense CPU path":
        # Same tensors, twice the heads (LLaDA's keys): d_model 128 / 8 heads = head size 16.
        config = json.loads((out / "config.json").read_text())
        config["n_heads"] = config["n_kv_heads"] = 8
        (out / "config.json").write_text(json.dumps(config))
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
    "head size 16 on the dense CPU path": (
        "llada",
        [],
        None,
        ["has head size 16", "allowed head sizes: [32, 64", "--attention-backend focus"],
    ),
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


OPTIONS = {
    "pipeline parallel": ({"pipeline_parallel_size": 2}, "--pipeline-parallel-size 2"),
    "data parallel": ({"data_parallel_size": 2}, "--data-parallel-size 2"),
    "speculative decoding": (
        {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}},
        "speculative decoding (--speculative-config)",
    ),
    "LoRA": ({"enable_lora": True}, "LoRA (--enable-lora)"),
    "KV connector": (
        {"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
        "a KV connector (--kv-transfer-config)",
    ),
    "prefix caching": ({"enable_prefix_caching": True}, "--enable-prefix-caching"),
    "async scheduling": ({"async_scheduling": True}, "--async-scheduling"),
    "FOCUS with an fp8 cache": (
        {"attention_backend": "focus", "kv_cache_dtype": "fp8"},
        "--kv-cache-dtype fp8 is not supported by the FOCUS attention backend",
    ),
}


@pytest.mark.parametrize("case", list(OPTIONS))
def test_unsupported_engine_options_are_refused_with_the_flag_named(case, tiny_dirs):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_focus

    vllm_focus.register()
    options, message = OPTIONS[case]
    with pytest.raises(Exception) as info:
        EngineArgs(model=tiny_dirs["llada"], dtype="float32", **options).create_engine_config()
    assert message in str(info.value)
    assert "is not supported" in str(info.value)


TRITON_PATH = {
    "without the interpreter": ({}, {"TRITON_INTERPRET": None}, "set TRITON_INTERPRET=1"),
    "block size": ({"block_size": 24}, {}, "--block-size 24 is not supported"),
}


@pytest.mark.parametrize("case", list(TRITON_PATH))
def test_what_the_triton_path_cannot_run_is_refused_at_startup(case, tiny_dirs, monkeypatch):
    """The FOCUS backend's Triton path (on CUDA, or VLLM_FOCUS_TRITON=1) names what it does
    not support before any request."""
    from vllm.engine.arg_utils import EngineArgs

    import vllm_focus

    vllm_focus.register()
    options, environment, message = TRITON_PATH[case]
    monkeypatch.setenv("VLLM_FOCUS_TRITON", "1")
    for name, value in environment.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
    arguments = {"dtype": "float32", "attention_backend": "focus", **options}
    with pytest.raises(Exception) as info:
        EngineArgs(model=tiny_dirs["llada"], **arguments).create_engine_config()
    assert message in str(info.value)


def test_default_options_and_explicitly_off_prefix_caching_start(tiny_dirs):
    """What the hook turns off itself is fine to turn off by hand; the defaults pass; CUDA
    graphs are off and the budget holds one whole request."""
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    import vllm_focus

    vllm_focus.register()
    for options in ({}, {"enable_prefix_caching": False, "async_scheduling": False}):
        config = EngineArgs(
            model=tiny_dirs["llada"], dtype="float32", max_model_len=6000, **options
        ).create_engine_config()
        assert config.cache_config.enable_prefix_caching is False
        assert config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE
        assert config.scheduler_config.max_num_batched_tokens >= 6000
