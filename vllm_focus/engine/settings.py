"""Server-wide defaults (`--additional-config '{"focus_dllm": {...}}'`) and per-request
overrides (`SamplingParams.extra_args`, OpenAI `vllm_xargs`) resolved into a DecodePlan."""

from __future__ import annotations

from typing import Any

from vllm_focus.settings import DecodePlan, DiffusionSettings, SettingsError

CONFIG_KEY = "focus_dllm"


def server_settings(vllm_config: Any) -> DiffusionSettings:
    """The server's defaults; raises SettingsError naming the bad field."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    values = extra.get(CONFIG_KEY, {}) if isinstance(extra, dict) else {}
    if not isinstance(values, dict):
        raise SettingsError(f"additional_config[{CONFIG_KEY!r}] must be an object, got {values!r}")
    try:
        return DiffusionSettings().updated(values)
    except SettingsError as err:
        raise SettingsError(f"additional_config[{CONFIG_KEY!r}]: {err}") from None


def request_overrides(sampling_params: Any) -> dict[str, Any]:
    return dict(getattr(sampling_params, "extra_args", None) or {})


def resolve_plan(
    defaults: DiffusionSettings, family: str, sampling_params: Any, focus: bool = False
) -> DecodePlan:
    """The plan of one request; raises SettingsError naming the bad field.

    `focus`: the server runs the FOCUS attention backend."""
    settings = defaults.updated(request_overrides(sampling_params))
    max_tokens = sampling_params.max_tokens
    if max_tokens is None:
        max_tokens = settings.gen_length
    return settings.plan(family, max_tokens, focus=focus)
