"""The platform class (imported only once the plugin has activated)."""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform


class RayCpuPlatform(CpuPlatform):
    # One Ray "GPU" slot per worker: the node declares them with `ray start --num-gpus N`.
    ray_device_key: str = "GPU"
