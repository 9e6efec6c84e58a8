"""Request validation in the API process, so bad input is an HTTP 400, not an engine error.

vLLM has no per-model request-validation hook, so `install()` wraps
`InputProcessor.process_inputs` (it runs in the process that accepts requests, for `LLM(...)`
and for `vllm serve`): after vLLM's own checks, requests for our architectures get their
diffusion settings resolved and their canvas checked against `max_model_len`. Errors are
`VLLMValidationError`s naming the field, which the OpenAI server turns into 400 responses.
"""

from __future__ import annotations

import functools

from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.input_processor import InputProcessor

from vllm_focus.engine.settings import resolve_plan, server_settings
from vllm_focus.model_executor.models.layout import family_of
from vllm_focus.settings import SettingsError

_ARCHITECTURES = ("DreamModel", "LLaDAModelLM")


def check_request(vllm_config, sampling_params, prompt_len: int) -> None:
    """Raise VLLMValidationError if the request cannot be decoded as asked."""
    model_config = vllm_config.model_config
    try:
        plan = resolve_plan(
            server_settings(vllm_config), family_of(model_config.hf_config), sampling_params
        )
    except SettingsError as err:
        raise VLLMValidationError(str(err), parameter=err.field) from None
    if prompt_len + plan.gen_length > model_config.max_model_len:
        raise VLLMValidationError(
            f"the prompt ({prompt_len} tokens) plus the generation canvas ({plan.gen_length} "
            f"tokens: max_tokens={sampling_params.max_tokens} capped at gen_length and rounded "
            f"up to a multiple of block_length {plan.block_length}) exceeds the maximum model "
            f"length {model_config.max_model_len}",
            parameter="max_tokens",
            value=sampling_params.max_tokens,
        )


def install() -> None:
    """Wrap InputProcessor.process_inputs once per process (idempotent)."""
    original = InputProcessor.process_inputs
    if getattr(original, "_vllm_focus", False):
        return

    @functools.wraps(original)
    def process_inputs(self, *args, **kwargs):
        request = original(self, *args, **kwargs)
        if self.model_config.architecture in _ARCHITECTURES and request.sampling_params:
            check_request(self.vllm_config, request.sampling_params, len(request.prompt_token_ids))
        return request

    process_inputs._vllm_focus = True
    InputProcessor.process_inputs = process_inputs
