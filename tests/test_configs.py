"""Config classes: loading without remote code, the published keys, validation messages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vllm_focus.model_executor.configs.common import ConfigError
from vllm_focus.model_executor.configs.dream import DreamConfig
from vllm_focus.model_executor.configs.llada import LLaDAConfig

# The published config.json of GSAI-ML/LLaDA-8B-Instruct and Dream-org/Dream-v0-Instruct-7B
# (keys and values as MODELS.md lists them; auto_map points at remote code we never run).
LLADA_8B = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}
DREAM_7B = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_dream.DreamConfig",
        "AutoModel": "modeling_dream.DreamModel",
    },
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "Dream",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def _write_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("published", [LLADA_8B, DREAM_7B], ids=["llada-8b", "dream-7b"])
def test_published_configs_load_through_autoconfig_without_remote_code(tmp_path, published):
    from transformers import AutoConfig

    import vllm_focus

    vllm_focus.register_hf_configs()
    config = AutoConfig.from_pretrained(_write_config(tmp_path, published), trust_remote_code=False)
    assert isinstance(config, LLaDAConfig if published is LLADA_8B else DreamConfig)
    for key, value in published.items():
        if key in ("auto_map", "torch_dtype", "transformers_version", "rope_scaling"):
            continue
        assert getattr(config, key) == value, key
    if published is LLADA_8B:
        # vLLM reads the standard names; they alias the OLMo keys.
        assert (config.hidden_size, config.num_attention_heads) == (4096, 32)
        assert (config.num_key_value_heads, config.num_hidden_layers) == (32, 32)
        assert (config.intermediate_size, config.max_position_embeddings) == (12288, 4096)
    assert config.rope_parameters == {"rope_theta": published["rope_theta"], "rope_type": "default"}


@pytest.mark.parametrize("arch, architecture", [("llada", "LLaDAModelLM"), ("dream", "DreamModel")])
def test_tiny_checkpoints_load_in_vllm_without_trust_remote_code(tiny_dirs, arch, architecture):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_focus

    vllm_focus.register()
    config = EngineArgs(model=tiny_dirs[arch], dtype="float32").create_engine_config()
    assert config.model_config.architectures == [architecture]
    # "DreamModel" ends in "Model", which vLLM would otherwise take for a pooling model.
    assert config.model_config.runner_type == "generate"
    assert (
        config.model_config.hf_config.mask_token_id
        == json.loads((Path(tiny_dirs[arch]) / "config.json").read_text())["mask_token_id"]
    )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mask_token_id": 126464}, "`mask_token_id` must be a token id in [0, 126464)"),
        ({"mask_token_id": None}, "`mask_token_id` is missing"),
        ({"n_heads": 30}, "`n_heads` (30) must divide `d_model` (4096)"),
        ({"n_kv_heads": 5}, "`n_kv_heads` (5) must divide `n_heads` (32)"),
        ({"d_model": 0}, "`d_model` must be a positive integer"),
        ({"embedding_size": 100}, "`embedding_size` (100) must be at least `vocab_size`"),
        ({"activation_type": "gelu"}, "`activation_type` = 'gelu' is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "`rope_scaling.rope_type`"),
        ({"architectures": ["LLaDAForFoo"]}, "`architectures` must be ['LLaDAModelLM']"),
    ],
)
def test_llada_validation_names_the_key(change, message):
    config = {k: v for k, v in LLADA_8B.items() if k not in change or change[k] is not None}
    config.update({k: v for k, v in change.items() if v is not None})
    with pytest.raises(ConfigError) as info:
        LLaDAConfig(**config)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mask_token_id": -1}, "`mask_token_id` must be a token id in [0, 152064)"),
        ({"num_attention_heads": 27}, "`num_attention_heads` (27) must divide `hidden_size`"),
        ({"num_key_value_heads": 3}, "`num_key_value_heads` (3) must divide"),
        ({"eos_token_id": 152064}, "`eos_token_id` must be a token id"),
        ({"hidden_act": "gelu"}, "`hidden_act` must be 'silu'"),
        ({"rope_theta": -1.0}, "`rope_theta` must be a positive number"),
    ],
)
def test_dream_validation_names_the_key(change, message):
    with pytest.raises(ConfigError) as info:
        DreamConfig(**{**DREAM_7B, **change})
    assert message in str(info.value)


def test_linear_rope_scaling_is_carried_to_vllm():
    config = LLaDAConfig(**{**LLADA_8B, "rope_scaling": {"type": "linear", "factor": 4.0}})
    assert config.rope_parameters["rope_type"] == "linear"
    assert config.rope_parameters["factor"] == 4.0


def test_bad_config_fails_vllm_startup_with_the_key(tiny_dirs, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_focus

    vllm_focus.register()
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dirs["dream"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception) as info:
        EngineArgs(model=str(bad), dtype="float32").create_engine_config()
    assert "`num_key_value_heads` (3) must divide `num_attention_heads` (4)" in str(info.value)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"cache": "full"}, "`cache` must be one of ['none', 'prefix', 'dual']"),
        ({"block_length": -1}, "`block_length` must be an integer in [1, 4096]"),
        ({"blocklen": 8}, "unknown diffusion setting(s) ['blocklen']"),
        ({"block_length": "8"}, "`block_length` must be an integer in [1, 4096], got '8'"),
        ({"keep_ratio": 2}, "`keep_ratio` must be a number in (0, 1]"),
        ({"method": "sparse_dllm"}, "`method` 'sparse_dllm' runs in the FOCUS attention backend"),
        ({"method": "sparse_dllm", "cache": "prefix"}, "`cache` must be 'dual' with it"),
        ({"method": "sparsed", "cache": "none"}, "`method` 'sparsed' runs in the FOCUS attention"),
        ([8], "must be an object"),
    ],
)
def test_bad_server_settings_fail_at_startup(tiny_dirs, settings, message):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_focus

    vllm_focus.register()
    args = EngineArgs(
        model=tiny_dirs["llada"], dtype="float32", additional_config={"focus_dllm": settings}
    )
    with pytest.raises(Exception) as info:
        args.create_engine_config()
    assert message in str(info.value)
    assert "additional_config['focus_dllm']" in str(info.value)
