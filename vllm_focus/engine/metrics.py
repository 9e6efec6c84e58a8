"""Diffusion metrics on vLLM's Prometheus endpoint (`GET /metrics`).

Two halves in two processes:

- `DiffusionMetrics` lives in the scheduler (the engine-core process). Every engine step it
  takes the runner's `StepRecord` and the committed tokens; when a request ends it observes
  the request's totals in histograms. It keeps counters and histogram buckets only, and writes
  them as one small JSON snapshot (atomically: a temporary file renamed over the last one),
  at most every `WRITE_INTERVAL_S`, whenever a request ends and when the engine goes idle, so
  the snapshot is exact once the engine is idle.
- `DiffusionCollector` is registered with prometheus_client's default registry in the process
  that serves `/metrics` (the API server) and turns the latest snapshots into metric families
  at scrape time.

vLLM's own stats path (SchedulerStats) has no field a plugin may extend: it is decoded into a
fixed schema between the processes. The snapshot directory is per serving process: the engine
core writes under the pid of its parent (the process that started it, the API server of
`vllm serve` or the `LLM` owner), or its own pid when the engine runs in-process; the
collector reads the snapshots under its own pid.

Metrics (label `model_name`; `phase` is `refresh` — a step in which some request computed its
whole recomputed range — or `block`, a within-block step):

- `vllm_focus:engine_steps_total{phase}` and `vllm_focus:model_seconds_total{phase}`: engine
  steps and the seconds spent in the model in them (time in refresh vs within-block steps);
- `vllm_focus:denoising_steps_total`: denoising steps summed over requests;
- `vllm_focus:block_commits_total`, `vllm_focus:committed_tokens_total`: blocks committed and
  their tokens;
- `vllm_focus:focus_steps_total`: request steps that ran Focus attention;
- `vllm_focus:focus_prompt_keys_attended_total` / `vllm_focus:focus_prompt_keys_total`:
  prompt keys those steps attended, summed over layers, and the prompt length x layers; the
  ratio is the share of the prompt attended under Focus;
- per finished request (histograms): `vllm_focus:request_denoising_steps_per_token`
  (steps / output tokens), `vllm_focus:request_block_commits`,
  `vllm_focus:request_focus_prompt_share` (requests with Focus steps only).
"""

from __future__ import annotations

import atexit
import bisect
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

from vllm_focus.engine.stats import StepRecord

WRITE_INTERVAL_S = 0.5
PREFIX = "vllm_focus:"
PHASES = ("refresh", "block")
COUNTERS = {
    "denoising_steps": "Denoising steps, summed over requests.",
    "block_commits": "Generation blocks committed.",
    "committed_tokens": "Tokens in committed blocks.",
    "focus_steps": "Request steps that ran Focus attention.",
    "focus_prompt_keys_attended": "Prompt keys attended by Focus steps, summed over layers.",
    "focus_prompt_keys": "Prompt length x layers of Focus steps (the dense equivalent).",
}
HISTOGRAMS = {
    "request_denoising_steps_per_token": (
        "Denoising steps per output token of a finished request.",
        (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
    ),
    "request_block_commits": (
        "Blocks committed by a finished request.",
        (1, 2, 4, 8, 16, 32, 64, 128, 256),
    ),
    "request_focus_prompt_share": (
        "Share of its prompt a finished request attended in its Focus steps (all layers).",
        (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
    ),
}


def snapshot_dir(owner_pid: int) -> str:
    return os.path.join(tempfile.gettempdir(), "vllm-focus-metrics", str(owner_pid))


def _owner_pid() -> int:
    parent = multiprocessing.parent_process()
    return os.getpid() if parent is None else parent.pid


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, the last one +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value
        self.total += value


@dataclass
class _Request:
    steps: int = 0
    blocks: int = 0
    focus_attended: int = 0
    focus_slots: int = 0


class DiffusionMetrics:
    """The engine side: accumulates per step and per request, writes snapshots."""

    def __init__(self, model_name: str, engine_index: int = 0, directory: str | None = None):
        self.model_name = model_name
        self.engine_index = engine_index
        self.steps = dict.fromkeys(PHASES, 0)
        self.model_s = dict.fromkeys(PHASES, 0.0)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.histograms = {name: _Histogram(b) for name, (_, b) in HISTOGRAMS.items()}
        self.requests: dict[str, _Request] = {}
        directory = directory or snapshot_dir(_owner_pid())
        self.path = os.path.join(directory, f"engine-{engine_index}.json")
        self._written = 0.0
        self._dirty = False

    def on_step(self, step: StepRecord | None, committed: dict[str, int], live) -> None:
        """One engine step: the runner's record (None for an empty step) and, per request that
        took part and is still `live` (not aborted meanwhile), how many tokens it committed
        (0: none this step)."""
        if step is not None:
            phase = "refresh" if step.refresh else "block"
            self.steps[phase] += 1
            self.model_s[phase] += step.model_s
            for req_id, (attended, slots) in step.focus_keys.items():
                if req_id not in live:
                    continue
                request = self.requests.setdefault(req_id, _Request())
                request.focus_attended += attended
                request.focus_slots += slots
                self.counters["focus_steps"] += 1
                self.counters["focus_prompt_keys_attended"] += attended
                self.counters["focus_prompt_keys"] += slots
        for req_id, tokens in committed.items():
            request = self.requests.setdefault(req_id, _Request())
            request.steps += 1
            self.counters["denoising_steps"] += 1
            if tokens:
                request.blocks += 1
                self.counters["block_commits"] += 1
                self.counters["committed_tokens"] += tokens
        self._dirty = True

    def on_finished(self, req_id: str, output_tokens: int) -> None:
        """A request left the engine (finished, stopped or aborted: vLLM ends a request whose
        text met a stop string by aborting it, so aborted requests are observed too)."""
        request = self.requests.pop(req_id, None)
        if request is None:
            return
        if output_tokens:
            self.histograms["request_denoising_steps_per_token"].observe(
                request.steps / output_tokens
            )
        self.histograms["request_block_commits"].observe(request.blocks)
        if request.focus_slots:
            self.histograms["request_focus_prompt_share"].observe(
                request.focus_attended / request.focus_slots
            )
        self._dirty = True
        self.write()

    def maybe_write(self, idle: bool = False) -> None:
        """Write if anything changed and the last write is old, or the engine goes idle."""
        if self._dirty and (idle or time.monotonic() - self._written >= WRITE_INTERVAL_S):
            self.write()

    def snapshot(self) -> dict:
        return {
            "model_name": self.model_name,
            "engine": self.engine_index,
            "steps": self.steps,
            "model_s": self.model_s,
            "counters": self.counters,
            "histograms": {
                name: {"bounds": list(h.bounds), "counts": h.counts, "sum": h.total}
                for name, h in self.histograms.items()
            },
        }

    def write(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        temporary = f"{self.path}.{os.getpid()}.tmp"
        with open(temporary, "w") as handle:
            json.dump(self.snapshot(), handle)
        os.replace(temporary, self.path)
        self._written = time.monotonic()
        self._dirty = False


class DiffusionCollector:
    """The API side: a prometheus_client collector over this process's engine snapshots."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or snapshot_dir(os.getpid())

    def snapshots(self) -> list[dict]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        result = []
        for name in names:
            if name.endswith(".json"):
                try:
                    with open(os.path.join(self.directory, name)) as handle:
                        result.append(json.load(handle))
                except (OSError, ValueError):
                    continue  # replaced while being read: the next scrape sees it
        return result

    def describe(self):
        return []  # families depend on the snapshots; do not collect at registration

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        snapshots = self.snapshots()
        labels = ["model_name", "engine"]
        steps = CounterMetricFamily(
            PREFIX + "engine_steps", "Engine steps, by phase.", labels=[*labels, "phase"]
        )
        seconds = CounterMetricFamily(
            PREFIX + "model_seconds",
            "Seconds in the model (forward and logits), by phase of the step.",
            labels=[*labels, "phase"],
        )
        counters = {
            name: CounterMetricFamily(PREFIX + name, doc, labels=labels)
            for name, doc in COUNTERS.items()
        }
        histograms = {
            name: HistogramMetricFamily(PREFIX + name, doc, labels=labels)
            for name, (doc, _) in HISTOGRAMS.items()
        }
        for snap in snapshots:
            values = [str(snap["model_name"]), str(snap["engine"])]
            for phase in PHASES:
                steps.add_metric([*values, phase], snap["steps"][phase])
                seconds.add_metric([*values, phase], snap["model_s"][phase])
            for name, family in counters.items():
                family.add_metric(values, snap["counters"][name])
            for name, family in histograms.items():
                data = snap["histograms"][name]
                cumulative, buckets = 0, []
                for bound, count in zip([*data["bounds"], math.inf], data["counts"]):
                    cumulative += count
                    buckets.append(("+Inf" if bound == math.inf else str(bound), cumulative))
                family.add_metric(values, buckets, data["sum"])
        yield steps
        yield seconds
        yield from counters.values()
        yield from histograms.values()


_collector: DiffusionCollector | None = None


def install_collector() -> None:
    """Register the collector once in this process's default Prometheus registry."""
    global _collector
    if _collector is not None:
        return
    from prometheus_client import REGISTRY

    _collector = DiffusionCollector()
    REGISTRY.register(_collector)
    atexit.register(shutil.rmtree, _collector.directory, ignore_errors=True)
