"""The short soak (benchmarks/soak.py): a few hundred mixed requests at concurrency 32 against
one `vllm serve` whose KV cache is smaller than the load needs, with clients that drop streams
or give up mid-block. Nothing may fail, get lost, change its answer or stay allocated."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _soak_module():
    path = Path(__file__).parent.parent / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_short_soak_loses_nothing_and_frees_every_block():
    report = _soak_module().run(requests=300, concurrency=32, num_specs=24, seed=1)
    assert report.errors == 0, report.error_samples
    assert report.lost == 0
    assert report.mismatches == 0, report.error_samples
    assert report.completed + report.cut_on_purpose == report.requests
    assert report.cut_on_purpose > 0
    # The load outgrew the KV cache: requests queued for it.
    assert report.peak_waiting > 0
    # Idle again: nothing running or waiting, no KV block allocated.
    assert report.idle_running == 0 and report.idle_waiting == 0
    assert report.idle_kv_cache_usage == 0
    assert report.diffusion_metrics["vllm_focus:block_commits_total"] > 0
