"""vLLM worker whose model runner runs masked-diffusion steps (see runner.py).

The base is the platform's own worker (CPUWorker on CPU, the GPU Worker elsewhere), so device
setup, model loading and KV-cache allocation are vLLM's; after the runner is built, its class
gets `DiffusionRunnerMixin` in front, which replaces only `execute_model`.
"""

from __future__ import annotations

from vllm.platforms import current_platform

from vllm_focus.engine.runner import DiffusionRunnerMixin

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _PlatformWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _PlatformWorker

_RUNNER_CLASSES: dict[type, type] = {}


def diffusion_runner_class(base: type) -> type:
    if base not in _RUNNER_CLASSES:
        name = f"Diffusion{base.__name__}"
        _RUNNER_CLASSES[base] = type(name, (DiffusionRunnerMixin, base), {})
    return _RUNNER_CLASSES[base]


class DiffusionWorker(_PlatformWorker):
    def init_device(self) -> None:
        super().init_device()
        runner = self.model_runner
        if getattr(self, "use_v2_model_runner", False):
            raise RuntimeError(
                "vllm-focus needs vLLM's V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER"
            )
        runner.__class__ = diffusion_runner_class(type(runner))

    def diffusion_stats(self, reset: bool = False) -> dict:
        """The runner's per-step timings (engine/stats.py); `reset` starts a new tally.
        Called through `LLM.collective_rpc("diffusion_stats")`."""
        from vllm_focus.engine.stats import StepStats

        runner = self.model_runner
        stats = getattr(runner, "diffusion_stats", None) or StepStats()
        if reset:
            runner.diffusion_stats = StepStats()
        return stats.as_dict()
