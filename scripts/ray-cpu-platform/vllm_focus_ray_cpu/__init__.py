"""vLLM's CPU platform with a Ray device key (a test-side shim; see pyproject.toml).

vLLM 0.32's Ray executor places one worker per unit of the platform's `ray_device_key` and
asks Ray for the accelerator ids of that resource; the CPU platform has no key, so the executor
refuses it ("current platform cpu does not support ray"). This platform is the CPU platform
with the key "GPU": Ray's only accelerator resource that a node can declare by count without
the device (`ray start --num-gpus N`), read here as N worker slots. Everything else (the CPU
worker, attention, gloo communication) is vLLM's CPU platform unchanged.
"""

from __future__ import annotations

import os

ENV = "VLLM_FOCUS_RAY_CPU_PLATFORM"


def activate() -> str | None:
    """vLLM platform-plugin hook: the platform's qualname where ENV=1, else None (inert)."""
    if os.environ.get(ENV) != "1":
        return None
    return "vllm_focus_ray_cpu.platform.RayCpuPlatform"
