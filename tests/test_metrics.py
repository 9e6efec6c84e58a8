"""The diffusion metrics' two halves without an engine: what the scheduler accumulates and
writes, and what the API process's collector exposes in Prometheus' text format."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_focus.engine.metrics import DiffusionCollector, DiffusionMetrics
from vllm_focus.engine.stats import StepRecord


def _samples(directory) -> dict:
    registry = CollectorRegistry()
    registry.register(DiffusionCollector(str(directory)))
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = {k: v for k, v in sample.labels.items() if k not in ("model_name", "engine")}
            key = sample.name + "".join(f"[{k}={v}]" for k, v in sorted(labels.items()))
            samples[key] = sample.value
    return samples


def test_steps_commits_and_focus_share_reach_the_collector(tmp_path):
    metrics = DiffusionMetrics("m", directory=str(tmp_path))
    live = {"a", "b"}
    # Request a: a refresh step, then two within-block Focus steps, the second commits 4.
    metrics.on_step(StepRecord(True, 0.5, 0.6, 10), {"a": 0}, live)
    metrics.on_step(StepRecord(False, 0.1, 0.2, 3, {"a": (30, 100)}), {"a": 0, "b": 0}, live)
    metrics.on_step(StepRecord(False, 0.1, 0.2, 3, {"a": (20, 100)}), {"a": 4, "b": 0}, live)
    # A step's output may name a request aborted meanwhile ("gone"): not counted.
    metrics.on_step(StepRecord(False, 0.1, 0.2, 3, {"gone": (1, 1)}), {}, live)
    metrics.on_finished("a", output_tokens=2)
    samples = _samples(tmp_path)
    assert samples["vllm_focus:engine_steps_total[phase=refresh]"] == 1
    assert samples["vllm_focus:engine_steps_total[phase=block]"] == 3
    assert samples["vllm_focus:model_seconds_total[phase=refresh]"] == pytest.approx(0.5)
    assert samples["vllm_focus:model_seconds_total[phase=block]"] == pytest.approx(0.3)
    assert samples["vllm_focus:denoising_steps_total"] == 5  # a: 3, b: 2
    assert samples["vllm_focus:block_commits_total"] == 1
    assert samples["vllm_focus:committed_tokens_total"] == 4
    assert samples["vllm_focus:focus_steps_total"] == 2
    assert samples["vllm_focus:focus_prompt_keys_attended_total"] == 50
    assert samples["vllm_focus:focus_prompt_keys_total"] == 200
    # Request a's histograms: 3 steps / 2 tokens, 1 commit, share 50 / 200.
    assert samples["vllm_focus:request_denoising_steps_per_token_sum"] == 1.5
    assert samples["vllm_focus:request_denoising_steps_per_token_bucket[le=1.0]"] == 0
    assert samples["vllm_focus:request_denoising_steps_per_token_bucket[le=2.0]"] == 1
    assert samples["vllm_focus:request_denoising_steps_per_token_bucket[le=+Inf]"] == 1
    assert samples["vllm_focus:request_block_commits_sum"] == 1
    assert samples["vllm_focus:request_focus_prompt_share_sum"] == 0.25
    assert samples["vllm_focus:request_focus_prompt_share_bucket[le=0.2]"] == 0
    assert samples["vllm_focus:request_focus_prompt_share_bucket[le=0.3]"] == 1
    # b is still running: in the totals, not yet in a histogram.
    assert samples["vllm_focus:request_block_commits_count"] == 1


def test_no_snapshot_yet_means_no_samples(tmp_path):
    assert _samples(tmp_path / "absent") == {}


def test_snapshot_is_written_when_the_engine_goes_idle(tmp_path):
    metrics = DiffusionMetrics("m", directory=str(tmp_path))
    metrics.write()  # the last write was just now: the interval has not passed
    metrics.on_step(StepRecord(True, 0.5, 0.6, 10), {"a": 0}, {"a"})
    metrics.maybe_write()
    assert _samples(tmp_path)["vllm_focus:denoising_steps_total"] == 0
    metrics.maybe_write(idle=True)
    assert _samples(tmp_path)["vllm_focus:denoising_steps_total"] == 1
