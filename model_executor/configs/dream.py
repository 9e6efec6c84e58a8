"""Hugging Face config class for Dream (model_type "Dream", architecture "DreamModel").

Dream-7B has the shape of Qwen2.5-7B; the published config.json keys are those of Qwen2 plus
`mask_token_id`. Defaults are Dream-v0-Instruct-7B's values, except `mask_token_id`, which
must be given.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from vllm_focus.model_executor.configs.common import (
    ConfigError,
    require_architectures,
    validate_transformer,
)


class DreamConfig(PretrainedConfig):
    model_type = "Dream"
    keys_to_ignore_at_inference = ["past_key_values"]
    # A config without `mask_token_id` is invalid, so there is no all-defaults instance.
    has_no_defaults_at_init = True

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int = 4,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1000000.0,
        rope_scaling: dict[str, Any] | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        mask_token_id: int | None = None,
        bos_token_id: int | None = 151643,
        eos_token_id: int | None = 151643,
        pad_token_id: int | None = 151643,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.rope_theta = rope_theta
        self.rope_parameters = dict(rope_scaling) if rope_scaling else None
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.validate_dream(rope_scaling)
        require_architectures(self.model_type, kwargs.get("architectures"), "DreamModel")
        super().__init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_dream(self, rope_scaling: object) -> None:
        validate_transformer(
            self,
            positive_ints=(
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
            ),
            hidden="hidden_size",
            heads="num_attention_heads",
            kv_heads="num_key_value_heads",
            rope_scaling=rope_scaling,
        )
        if self.hidden_act != "silu":
            raise ConfigError(
                f"{self.model_type} config: `hidden_act` must be 'silu', got {self.hidden_act!r}"
            )
        if self.use_sliding_window:
            raise ConfigError(
                f"{self.model_type} config: `use_sliding_window` must be false (Dream is dense)"
            )
