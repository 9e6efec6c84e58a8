"""Per-architecture config hook (vLLM's MODELS_CONFIG_MAP) for DreamModel and LLaDAModelLM.

Runs in VllmConfig.__post_init__ in the API/driver process, before any engine process
starts, so bad server settings fail at startup with the field named. It switches on what
masked-diffusion serving needs: our scheduler and worker, no prefix caching (a block's K/V
depend on later tokens), no chunked prefill (a chunk could not see later chunks), synchronous
scheduling, and vLLM's V1 model runner (our runner replaces its execute_model). It logs the
settings in force once, at startup.

`install()` also guards the other direction: `--attention-backend focus` on an architecture
this plugin does not serve is a startup error (the FOCUS backend runs masked diffusion steps
only; on CPU vLLM would otherwise ignore the flag and serve the model densely).
"""

from __future__ import annotations

import functools
import os
from dataclasses import fields

from vllm.config import CompilationMode, CUDAGraphMode, VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_focus import MODEL_CLASSES
from vllm_focus.attention.backend import focus_requested
from vllm_focus.engine import metrics, startup
from vllm_focus.engine.settings import CONFIG_KEY, server_settings
from vllm_focus.settings import FocusPlan, SettingsError

# Under vLLM's logger so that its handler and format (and VLLM_LOGGING_LEVEL) apply.
logger = init_logger(f"vllm.{__name__}")

SCHEDULER_CLS = "vllm_focus.engine.scheduler.MaskedDiffusionScheduler"
WORKER_CLS = "vllm_focus.engine.worker.DiffusionWorker"


class MaskedDiffusionConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        settings = server_settings(vllm_config)
        focus = focus_requested(vllm_config)
        if settings.method != "focus" and not focus:
            raise SettingsError(
                f"additional_config[{CONFIG_KEY!r}]: `method` {settings.method!r} runs in the "
                "FOCUS attention backend: add --attention-backend focus, or drop `method`"
            )
        startup.check_options(vllm_config)
        startup.check_attention(vllm_config, focus)
        cache = vllm_config.cache_config
        cache.enable_prefix_caching = False
        scheduler = vllm_config.scheduler_config
        scheduler.scheduler_cls = SCHEDULER_CLS
        scheduler.enable_chunked_prefill = False
        scheduler.async_scheduling = False
        max_model_len = vllm_config.model_config.max_model_len
        scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens, max_model_len)
        if scheduler.max_num_scheduled_tokens is not None:
            scheduler.max_num_scheduled_tokens = max(
                scheduler.max_num_scheduled_tokens, max_model_len
            )
        # The runner calls the compiled model directly and never replays a CUDA graph, so
        # none is captured (on CPU vLLM captures none anyway).
        vllm_config.compilation_config.cudagraph_mode = CUDAGraphMode.NONE
        vllm_config.parallel_config.worker_cls = WORKER_CLS
        # Inherited by every engine and worker process started after this point.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        # /metrics is served by this (the API) process; the engine core writes the snapshots.
        metrics.install_collector()
        _log_settings(vllm_config, settings, focus)


def _log_settings(vllm_config, settings, focus: bool) -> None:
    """One start-up line: the model, how it runs, and every diffusion setting in force."""
    model_config = vllm_config.model_config
    hf_config = model_config.hf_config
    compilation = vllm_config.compilation_config
    compiled = not model_config.enforce_eager and compilation.mode != CompilationMode.NONE
    focus_knobs = {f.name for f in fields(FocusPlan)}
    values = {f.name: getattr(settings, f.name) for f in fields(settings)}
    logger.info(
        "vllm-focus: serving %s as a masked diffusion model; attention: %s; dtype %s; "
        "RoPE base %s%s, maximum length %d (the config allows %s); "
        "torch.compile %s, CUDA graphs off (the diffusion runner does not replay them); "
        "token budget %d per engine step (max_num_batched_tokens >= max_model_len %d: a "
        "bidirectional refresh computes a whole request in one forward; refreshes that do not "
        "fit together wait a step); %s defaults in force: decoding {%s}; Focus {%s}",
        model_config.architecture,
        "Focus (FOCUS backend)" if focus else "dense",
        str(model_config.dtype).removeprefix("torch."),
        f"{hf_config.rope_theta:g}",
        _rope_scaling(hf_config),
        model_config.max_model_len,
        getattr(hf_config, "max_position_embeddings", "any length"),
        "on (vLLM's default)" if compiled else "off (enforce_eager)",
        vllm_config.scheduler_config.max_num_batched_tokens,
        model_config.max_model_len,
        CONFIG_KEY,
        ", ".join(f"{k}={v}" for k, v in values.items() if k not in focus_knobs),
        ", ".join(f"{k}={v}" for k, v in values.items() if k in focus_knobs),
    )


def _rope_scaling(hf_config) -> str:
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    kind = parameters.get("rope_type", "default")
    if kind == "default":
        return ""
    return f" ({kind} scaling, factor {parameters.get('factor')})"


def install() -> None:
    """Refuse the FOCUS backend for architectures we do not serve, at config time (idempotent)."""
    original = VllmConfig.try_verify_and_update_config
    if getattr(original, "_vllm_focus", False):
        return

    @functools.wraps(original)
    def try_verify_and_update_config(self):
        model_config = self.model_config
        if model_config is not None and focus_requested(self):
            architecture = model_config.architecture
            if architecture not in MODEL_CLASSES:
                raise ValueError(
                    f"--attention-backend focus serves masked diffusion models only "
                    f"({', '.join(MODEL_CLASSES)}); the model at {model_config.model!r} is "
                    f"{architecture}. Drop --attention-backend focus (or pick another backend) "
                    f"to serve it."
                )
        return original(self)

    try_verify_and_update_config._vllm_focus = True
    VllmConfig.try_verify_and_update_config = try_verify_and_update_config
