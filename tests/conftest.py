"""Shared fixtures: tiny checkpoints written once per test session."""

from __future__ import annotations

import os
import tempfile

import pytest

# vLLM caches model-inspection results by module hash; keep the suite's cache to itself.
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-focus-cache-"))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Without a GPU the kernel tests run Triton's interpreter. Triton fixes that mode for its own
# standard library when it is first imported (vLLM imports it early), so it is set here,
# before any test module loads. vLLM's CPU platform does not use Triton either way.
if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints by preset name: dream (GQA 2), dream-gqa3 (GQA 3), llada (MHA)."""
    from vllm_focus.testing.tiny import PRESETS, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(write_tiny_checkpoint(root / arch, arch)) for arch in PRESETS}
