"""Request validation in the API process, so bad input is an HTTP 400, not an engine error.

vLLM has no per-model request-validation hook, so `install()` wraps
`InputProcessor.process_inputs` (it runs in the process that accepts requests, for `LLM(...)`
and for `vllm serve`): after vLLM's own checks, requests for our architectures get their
diffusion settings resolved, their canvas checked against `max_model_len`, sampling options
the diffusion decoder does not apply refused (rather than silently ignored) and mask tokens in
the prompt refused. Errors are `VLLMValidationError`s naming the field and what is allowed,
which the OpenAI server turns into 400 responses.
"""

from __future__ import annotations

import functools

from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.input_processor import InputProcessor

from vllm_focus import MODEL_CLASSES
from vllm_focus.attention.backend import focus_requested
from vllm_focus.engine.settings import resolve_plan, server_settings
from vllm_focus.model_executor.models.layout import family_of
from vllm_focus.settings import SettingsError

# Sampling options of vLLM's token-by-token sampler that masked diffusion decoding does not
# apply (docs/design.md §3 decodes with temperature and seed only), with the value that means "off".
# Accepting them would silently change what the client asked for, so they are refused.
_NEUTRAL_SAMPLING = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "min_tokens": 0,
    "logit_bias": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "watermarking": None,
    "thinking_token_budget": None,
}
# From the model's generation_config.json, vLLM takes these as request defaults.
_GENERATION_CONFIG_KEYS = ("repetition_penalty", "top_p", "top_k", "min_p")


def check_sampling(sampling_params) -> None:
    """Refuse what vLLM's sampler offers and the diffusion decoder does not do."""
    for name, neutral in _NEUTRAL_SAMPLING.items():
        value = getattr(sampling_params, name, neutral)
        if value is None or value is False or value == neutral or value in ([], {}):
            continue
        if name == "top_k" and value == -1:  # vLLM's other spelling of "off"
            continue
        hint = ""
        if name in _GENERATION_CONFIG_KEYS:
            hint = (
                " (if the value comes from the checkpoint's generation_config.json, start the "
                "server with --generation-config vllm)"
            )
        raise VLLMValidationError(
            f"`{name}` is not supported by masked diffusion decoding, which samples with "
            f"`temperature` and `seed` only; allowed: {neutral!r} or unset, got {value!r}{hint}",
            parameter=name,
            value=value,
        )
    if sampling_params.logprobs is not None:
        raise VLLMValidationError(
            "`logprobs` is not supported by masked diffusion decoding (tokens are unmasked at "
            "different steps, from different distributions); allowed: null",
            parameter="logprobs",
            value=sampling_params.logprobs,
        )
    if sampling_params.prompt_logprobs is not None:
        raise VLLMValidationError(
            "`prompt_logprobs` is not supported by masked diffusion decoding; allowed: null",
            parameter="prompt_logprobs",
            value=sampling_params.prompt_logprobs,
        )
    if sampling_params.structured_outputs is not None:
        raise VLLMValidationError(
            "structured outputs (`structured_outputs`, `response_format` json_object / "
            "json_schema, guided decoding, required or named tool calls) are not supported by "
            "masked diffusion decoding: a grammar constrains tokens left to right, while a "
            "block unmasks in any order; allowed: plain text",
            parameter="structured_outputs",
        )


def check_prompt(prompt_token_ids, mask_token_id: int) -> None:
    """The mask token marks positions to generate; inside a prompt it is refused."""
    if mask_token_id in prompt_token_ids:
        index = prompt_token_ids.index(mask_token_id)
        raise VLLMValidationError(
            f"the prompt holds the mask token (id {mask_token_id}) at position {index}; the "
            "model reserves it for the positions it generates, so a prompt may not contain it",
            parameter="prompt",
            value=mask_token_id,
        )


def check_request(vllm_config, sampling_params, prompt_token_ids) -> None:
    """Raise VLLMValidationError if the request cannot be decoded as asked."""
    model_config = vllm_config.model_config
    check_sampling(sampling_params)
    if prompt_token_ids is None:
        raise VLLMValidationError(
            "prompt embeddings are not supported by masked diffusion decoding (every step "
            "re-embeds the canvas from token ids); allowed: a text or token-id prompt",
            parameter="prompt_embeds",
        )
    check_prompt(prompt_token_ids, model_config.hf_config.mask_token_id)
    prompt_len = len(prompt_token_ids)
    try:
        plan = resolve_plan(
            server_settings(vllm_config),
            family_of(model_config.hf_config),
            sampling_params,
            focus=focus_requested(vllm_config),
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
        if self.model_config.architecture in MODEL_CLASSES and request.sampling_params:
            check_request(self.vllm_config, request.sampling_params, request.prompt_token_ids)
        return request

    process_inputs._vllm_focus = True
    InputProcessor.process_inputs = process_inputs
