"""What diffusion serving cannot run is refused at start-up, with the flag or value named.

Called from the config hook (config_hook.py) in the process that parses the command line, so
`vllm serve` stops before it listens and `LLM(...)` raises before any engine process starts —
rather than passing start-up and failing the first request (an HTTP 500 and a dead engine).

`install()` wraps `EngineArgs.create_engine_config` to remember which options the user set
explicitly: vLLM resolves `enable_prefix_caching` to True for every generative model before the
hook runs, so only the arguments tell an explicit `--enable-prefix-caching` from the default
(which the hook turns off, as a masked diffusion model needs).
"""

from __future__ import annotations

import functools
from typing import Any

_explicit: dict[str, Any] = {}


class StartupError(ValueError):
    """A server option or checkpoint property the selected path cannot run."""


def _refuse(flag: str, why: str, allowed: str) -> None:
    raise StartupError(f"vllm-focus: {flag} is not supported: {why}; {allowed}")


def check_options(vllm_config) -> None:
    """Engine features that assume token-by-token decoding."""
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        _refuse(
            f"--pipeline-parallel-size {parallel.pipeline_parallel_size}",
            "every denoising step feeds its logits back into the next step's canvas, which the "
            "plugin's runner keeps on every rank of one stage",
            "use --tensor-parallel-size to split the model (pipeline size 1 is allowed)",
        )
    if parallel.data_parallel_size > 1:
        _refuse(
            f"--data-parallel-size {parallel.data_parallel_size}",
            "the diffusion scheduler and runner have not been built or tested for vLLM's "
            "data-parallel engine coordination",
            "run one server per replica behind a load balancer (data parallel size 1 is allowed)",
        )
    if vllm_config.speculative_config is not None:
        _refuse(
            "speculative decoding (--speculative-config)",
            "a masked diffusion model already decodes several positions per step, with no "
            "draft-and-verify order",
            "leave --speculative-config unset",
        )
    if vllm_config.lora_config is not None:
        _refuse(
            "LoRA (--enable-lora)",
            "the diffusion runner does not apply adapters",
            "serve a checkpoint with merged weights",
        )
    if vllm_config.kv_transfer_config is not None:
        _refuse(
            "a KV connector (--kv-transfer-config)",
            "a block's K/V change while it is decoded and depend on later positions, so they "
            "cannot be handed to another engine as a finished prefix",
            "leave --kv-transfer-config unset",
        )
    if _explicit.get("enable_prefix_caching"):
        _refuse(
            "--enable-prefix-caching",
            "a bidirectional model's K/V of a prompt block depend on every later position, so "
            "no cached prefix can be reused by another request",
            "drop the flag (the plugin turns prefix caching off for these models)",
        )
    if vllm_config.scheduler_config.async_scheduling:
        _refuse(
            "--async-scheduling",
            "each denoising step decides the next step's positions from its own logits, so a "
            "step cannot be scheduled before the previous one has finished",
            "drop the flag (the plugin schedules synchronously)",
        )


def check_attention(vllm_config, focus: bool) -> None:
    """The checkpoint's head size and the cache dtype against the attention path in use."""
    from vllm.platforms import current_platform

    from vllm_focus.attention.triton_path import triton_path_forced

    model_config = vllm_config.model_config
    if focus:
        kv_cache_dtype = vllm_config.cache_config.cache_dtype
        if kv_cache_dtype != "auto":
            raise StartupError(
                f"vllm-focus: --kv-cache-dtype {kv_cache_dtype} is not supported by the FOCUS "
                "attention backend, which keeps K/V in the model dtype; allowed: auto"
            )
        if current_platform.is_cuda_alike() or triton_path_forced():
            _check_triton_path(vllm_config)
        return
    if not current_platform.is_cpu():
        # On CUDA vLLM validates the backend it selects against the model itself.
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    head_size = _head_size(model_config)
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_size not in sizes:
        raise StartupError(
            f"vllm-focus: the checkpoint at {model_config.model!r} has head size {head_size} "
            f"(hidden_size {model_config.hf_config.hidden_size} / "
            f"{model_config.hf_config.num_attention_heads} heads), which "
            f"vLLM's CPU attention (CPU_ATTN, the dense path on CPU) does not support; allowed "
            f"head sizes: {sizes}. Serve it with --attention-backend focus (any head size) or "
            "on a GPU"
        )
    dtype = model_config.dtype
    if dtype not in CPUAttentionBackend.supported_dtypes:
        raise StartupError(
            f"vllm-focus: dtype {dtype} is not supported by vLLM's CPU attention; allowed: "
            f"{[str(d) for d in CPUAttentionBackend.supported_dtypes]}"
        )


def _head_size(model_config) -> int:
    config = model_config.hf_config
    return config.hidden_size // config.num_attention_heads


def _check_triton_path(vllm_config) -> None:
    """What the FOCUS backend's Triton path (vLLM's unified attention and our tiled kernels)
    supports: the limits of vLLM's Triton attention backend, which runs the same kernel."""
    import os

    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend

    from vllm_focus.attention.triton_path import SWITCH

    model_config = vllm_config.model_config
    head_size = _head_size(model_config)
    if not TritonAttentionBackend.supports_head_size(head_size) or head_size > 256:
        raise StartupError(
            f"vllm-focus: the checkpoint at {model_config.model!r} has head size {head_size}, "
            "which the FOCUS backend's Triton kernels do not support; allowed: 32 to 256"
        )
    dtype = model_config.dtype
    if dtype not in TritonAttentionBackend.supported_dtypes:
        raise StartupError(
            f"vllm-focus: dtype {dtype} is not supported by the FOCUS backend's Triton kernels; "
            f"allowed: {[str(d) for d in TritonAttentionBackend.supported_dtypes]}"
        )
    block_size = vllm_config.cache_config.block_size
    if block_size is not None and block_size % 16:
        raise StartupError(
            f"vllm-focus: --block-size {block_size} is not supported by the FOCUS backend's "
            "Triton kernels; allowed: a multiple of 16"
        )
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike() and os.environ.get("TRITON_INTERPRET") != "1":
        where = current_platform.device_type
        raise StartupError(
            f"vllm-focus: {SWITCH}=1 runs the FOCUS backend's Triton path on {where}, which "
            "has no Triton backend: set TRITON_INTERPRET=1 too (Triton's interpreter, for "
            f"tests), or unset {SWITCH}"
        )


def install() -> None:
    """Record the explicitly given engine arguments the checks need (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_vllm_focus", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        _explicit["enable_prefix_caching"] = self.enable_prefix_caching
        try:
            return original(self, *args, **kwargs)
        finally:
            _explicit.clear()

    create_engine_config._vllm_focus = True
    EngineArgs.create_engine_config = create_engine_config
