"""Validation shared by the Dream and LLaDA config classes.

A bad value is reported with the config key it came from and what is allowed, so that a user
who edits a config.json learns which line to fix.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config.json value that the model cannot run with."""


def require_positive_int(model_type: str, key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{model_type} config: `{key}` must be a positive integer, got {value!r}")


def require_divides(model_type: str, key: str, value: int, other_key: str, other: int) -> None:
    if other % value != 0:
        raise ConfigError(
            f"{model_type} config: `{key}` ({value}) must divide `{other_key}` ({other})"
        )


def require_token_id(model_type: str, key: str, value: object, vocab_size: int) -> None:
    if value is None:
        raise ConfigError(
            f"{model_type} config: `{key}` is missing; a diffusion model needs it "
            f"(an integer in [0, {vocab_size}))"
        )
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise ConfigError(
            f"{model_type} config: `{key}` must be a token id in [0, {vocab_size}) "
            f"(the vocabulary), got {value!r}"
        )


def require_optional_token_id(model_type: str, key: str, value: object, vocab_size: int) -> None:
    # eos_token_id may be a list in generation configs; the model config holds one id or none.
    if value is None:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for item in values:
        require_token_id(model_type, key, item, vocab_size)


def require_positive_float(model_type: str, key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{model_type} config: `{key}` must be a positive number, got {value!r}")


def validate_rope_scaling(model_type: str, rope_scaling: object) -> None:
    """Accept the rope scalings that both vLLM and the reference decoder implement."""
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict):
        raise ConfigError(
            f"{model_type} config: `rope_scaling` must be null or an object, got {rope_scaling!r}"
        )
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    allowed = {"default", "linear"}
    if kind not in allowed:
        raise ConfigError(
            f"{model_type} config: `rope_scaling.rope_type` must be one of {sorted(allowed)}, "
            f"got {kind!r} (an NTK-style base rescaling is expressed through `rope_theta`)"
        )
    if kind == "linear":
        require_positive_float(model_type, "rope_scaling.factor", rope_scaling.get("factor"))


def require_architectures(model_type: str, architectures: object, allowed: str) -> None:
    if architectures is None:
        return
    if not isinstance(architectures, (list, tuple)) or list(architectures) != [allowed]:
        raise ConfigError(
            f"{model_type} config: `architectures` must be [{allowed!r}] (the architecture "
            f"vllm-focus serves for model_type {model_type!r}), got {architectures!r}"
        )


def validate_transformer(
    config: Any,
    *,
    positive_ints: tuple[str, ...],
    hidden: str,
    heads: str,
    kv_heads: str,
    rope_scaling: object,
) -> None:
    """Checks both families share; key names are the config's own (OLMo-style for LLaDA)."""
    name = config.model_type
    for key in positive_ints:
        require_positive_int(name, key, getattr(config, key))
    require_divides(name, heads, getattr(config, heads), hidden, getattr(config, hidden))
    require_divides(name, kv_heads, getattr(config, kv_heads), heads, getattr(config, heads))
    head_dim = getattr(config, hidden) // getattr(config, heads)
    if head_dim % 2:
        raise ConfigError(
            f"{name} config: {hidden} / {heads} = {head_dim} must be even "
            "(rotary embeddings rotate pairs of dimensions)"
        )
    require_positive_float(name, "rms_norm_eps", config.rms_norm_eps)
    require_positive_float(name, "rope_theta", config.rope_theta)
    validate_rope_scaling(name, rope_scaling)
    require_token_id(name, "mask_token_id", config.mask_token_id, config.vocab_size)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        require_optional_token_id(name, key, getattr(config, key), config.vocab_size)
