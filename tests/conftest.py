"""Shared fixtures: tiny checkpoints written once per test session."""

from __future__ import annotations

import os
import tempfile

import pytest

# vLLM caches model-inspection results by module hash; keep the suite's cache to itself.
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-focus-cache-"))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints by preset name: dream (GQA 2), dream-gqa3 (GQA 3), llada (MHA)."""
    from vllm_focus.testing.tiny import PRESETS, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return {arch: str(write_tiny_checkpoint(root / arch, arch)) for arch in PRESETS}
