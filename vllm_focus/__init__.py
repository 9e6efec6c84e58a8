"""vllm-focus: a vLLM plugin serving diffusion LLMs (Dream, LLaDA) with Focus-dLLM attention.

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every process it
starts (API server, engine core, each worker, model-inspection subprocesses), so it is
idempotent and cheap: it registers names and lazy "module:Class" strings, and imports no model
code, no Triton and nothing that touches CUDA.
"""

from __future__ import annotations

__version__ = "0.1.0"

# vLLM architecture name -> the module that defines the class.
MODEL_CLASSES = {
    "DreamModel": "vllm_focus.model_executor.models.dream:DreamModel",
    "LLaDAModelLM": "vllm_focus.model_executor.models.llada:LLaDAModelLM",
}

_registered = False


def register_hf_configs() -> None:
    """Make transformers and vLLM load `Dream` / `llada` configs and Dream's published tokenizer
    (`DreamTokenizer`, from vocab.json + merges.txt) without remote code."""
    from transformers import AutoConfig

    from vllm_focus.model_executor import tokenization_dream
    from vllm_focus.model_executor.configs.dream import DreamConfig
    from vllm_focus.model_executor.configs.llada import LLaDAConfig

    tokenization_dream.register()

    for config_class in (DreamConfig, LLaDAConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    try:
        from vllm.transformers_utils.config import _CONFIG_REGISTRY
    except ImportError:
        return
    for config_class in (DreamConfig, LLaDAConfig):
        _CONFIG_REGISTRY[config_class.model_type] = config_class


def register() -> None:
    """vLLM general-plugin entry point; safe to call any number of times."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    register_hf_configs()
    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in MODEL_CLASSES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    register_config_hooks()
    register_attention_backend()
    _registered = True


FOCUS_BACKEND = "vllm_focus.attention.backend.FocusAttentionBackend"


def register_attention_backend() -> None:
    """The FOCUS backend in vLLM's CUSTOM slot, plus `FOCUS` as an alias of that member.

    An alias, not a new enum member: the selected member is pickled into engine and worker
    processes by value, and a member added at run time does not exist there yet when the
    config is unpickled; CUSTOM always does.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != FOCUS_BACKEND:
        raise RuntimeError(
            f"vLLM's CUSTOM attention backend slot already holds {custom.get_path()}; "
            "vllm-focus registers its FOCUS backend there"
        )
    register_backend(custom, FOCUS_BACKEND)
    AttentionBackendEnum._member_map_.setdefault("FOCUS", custom)


def register_config_hooks() -> None:
    """Per-architecture hook that turns on masked-diffusion serving for our models."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from vllm_focus.engine import config_hook, startup, validation

    for arch in MODEL_CLASSES:
        MODELS_CONFIG_MAP[arch] = config_hook.MaskedDiffusionConfig
    config_hook.install()
    startup.install()
    validation.install()
