"""Hugging Face config class for LLaDA (model_type "llada", architecture "LLaDAModelLM").

LLaDA-8B, LLaDA-1.5 and UltraLLaDA publish OLMo-style keys (`d_model`, `n_layers`, ...). Every
published key is kept under its own name; the standard names vLLM reads (`hidden_size`,
`num_attention_heads`, ...) are aliases through `attribute_map`. Defaults are LLaDA-8B's
values, except `mask_token_id`, which must be given.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from vllm_focus.model_executor.configs.common import (
    ConfigError,
    require_architectures,
    validate_transformer,
)

# OLMo/LLaDA keys the architecture does not depend on, with the published values. They are
# carried so that a saved config round-trips, and ignored otherwise.
_PASSTHROUGH_DEFAULTS: dict[str, Any] = {
    "alibi": False,
    "alibi_bias_max": 8.0,
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_with_affine": True,
    "mlp_ratio": 4,
    "multi_query_attention": None,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rope": True,
    "rope_full_precision": True,
    "scale_logits": False,
    "use_cache": False,
}


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    # A config without `mask_token_id` is invalid, so there is no all-defaults instance.
    has_no_defaults_at_init = True
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "num_hidden_layers": "n_layers",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = 32,
        n_layers: int = 32,
        mlp_hidden_size: int | None = 12288,
        max_sequence_length: int = 4096,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        activation_type: str = "silu",
        block_type: str = "llama",
        layer_norm_type: str = "rms",
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 500000.0,
        rope_scaling: dict[str, Any] | None = None,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        weight_tying: bool = False,
        clip_qkv: float | None = None,
        mask_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = 126081,
        pad_token_id: int | None = 126081,
        **kwargs: Any,
    ) -> None:
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.n_layers = n_layers
        self.mlp_hidden_size = mlp_hidden_size
        self.max_sequence_length = max_sequence_length
        self.vocab_size = vocab_size
        self.embedding_size = vocab_size if embedding_size is None else embedding_size
        self.activation_type = activation_type
        self.block_type = block_type
        self.layer_norm_type = layer_norm_type
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_parameters = dict(rope_scaling) if rope_scaling else None
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.weight_tying = weight_tying
        self.tie_word_embeddings = weight_tying
        self.clip_qkv = clip_qkv
        self.mask_token_id = mask_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        for key, default in _PASSTHROUGH_DEFAULTS.items():
            setattr(self, key, kwargs.pop(key, default))
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        self.validate_llada(rope_scaling)
        require_architectures(self.model_type, kwargs.get("architectures"), "LLaDAModelLM")
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate_llada(self, rope_scaling: object) -> None:
        name = self.model_type
        validate_transformer(
            self,
            positive_ints=(
                "d_model",
                "n_heads",
                "n_kv_heads",
                "n_layers",
                "mlp_hidden_size",
                "max_sequence_length",
                "vocab_size",
                "embedding_size",
            ),
            hidden="d_model",
            heads="n_heads",
            kv_heads="n_kv_heads",
            rope_scaling=rope_scaling,
        )
        if self.embedding_size < self.vocab_size:
            raise ConfigError(
                f"{name} config: `embedding_size` ({self.embedding_size}) must be at least "
                f"`vocab_size` ({self.vocab_size})"
            )
        supported = {
            "activation_type": ("silu",),
            "block_type": ("llama",),
            "layer_norm_type": ("rms",),
            "include_bias": (False,),
            "include_qkv_bias": (False,),
            "weight_tying": (False,),
            "clip_qkv": (None,),
            "alibi": (False,),
            "rope": (True,),
            "attention_layer_norm": (False,),
            "input_emb_norm": (False,),
            "scale_logits": (False,),
        }
        for key, allowed in supported.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"{name} config: `{key}` = {getattr(self, key)!r} is not supported "
                    f"(allowed: {', '.join(repr(a) for a in allowed)}; the published LLaDA "
                    "checkpoints use these)"
                )
