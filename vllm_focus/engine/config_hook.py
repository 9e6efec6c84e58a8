"""Per-architecture config hook (vLLM's MODELS_CONFIG_MAP) for DreamModel and LLaDAModelLM.

Runs in VllmConfig.__post_init__ in the API/driver process, before any engine process
starts, so bad server settings fail at startup with the field named. It switches on what
masked-diffusion serving needs: our scheduler and worker, no prefix caching (a block's K/V
depend on later tokens), no chunked prefill (a chunk could not see later chunks), synchronous
scheduling, and vLLM's V1 model runner (our runner replaces its execute_model).
"""

from __future__ import annotations

import os

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from vllm_focus.engine.settings import CONFIG_KEY, server_settings

logger = init_logger(__name__)

SCHEDULER_CLS = "vllm_focus.engine.scheduler.MaskedDiffusionScheduler"
WORKER_CLS = "vllm_focus.engine.worker.DiffusionWorker"


class MaskedDiffusionConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        settings = server_settings(vllm_config)
        cache = vllm_config.cache_config
        cache.enable_prefix_caching = False
        scheduler = vllm_config.scheduler_config
        scheduler.scheduler_cls = SCHEDULER_CLS
        scheduler.enable_chunked_prefill = False
        scheduler.async_scheduling = False
        max_model_len = vllm_config.model_config.max_model_len
        scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens, max_model_len)
        vllm_config.parallel_config.worker_cls = WORKER_CLS
        # Inherited by every engine and worker process started after this point.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        logger.info("vllm-focus masked diffusion, %s defaults: %s", CONFIG_KEY, settings)
