"""Where the diffusion runner's time goes, step by step (read by benchmarks and metrics).

Every engine step the runner records one `StepRecord`: whether it was a refresh step (some
request computed its whole recomputed range: a block start, or every step of cache `none`) or
a within-block step, the seconds spent in the model (the forward and the logits, up to the
copy of the logits to the host, which waits for the device) and in the whole `execute_model`
call, how many positions it computed, and for each request that ran Focus attention how
many prompt keys its queries attended over all layers. `DiffusionWorker.diffusion_stats()`
returns them to the engine's caller (`LLM.collective_rpc("diffusion_stats")`); what lies outside
`execute_model` (scheduler, inter-process queues, output processing) is the caller's wall time
minus `runner_s`. The same record rides back to the scheduler with the step's output
(`DiffusionRunnerOutput`), which turns it into server metrics (engine/metrics.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# A bounded log: a long-running server keeps the totals, not every step.
MAX_RECORDS = 16384


@dataclass(frozen=True)
class StepRecord:
    refresh: bool
    model_s: float
    runner_s: float
    query_tokens: int
    # Per request under Focus this step: (prompt keys attended, summed over every layer;
    # prompt length x layers). Their ratio is the share of the prompt the step attended.
    focus_keys: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class StepStats:
    steps: int = 0
    refresh_steps: int = 0
    refresh_model_s: float = 0.0
    block_model_s: float = 0.0
    runner_s: float = 0.0
    query_tokens: int = 0
    records: list[StepRecord] = field(default_factory=list)

    def record(self, step: StepRecord) -> None:
        self.steps += 1
        self.refresh_steps += step.refresh
        if step.refresh:
            self.refresh_model_s += step.model_s
        else:
            self.block_model_s += step.model_s
        self.runner_s += step.runner_s
        self.query_tokens += step.query_tokens
        if len(self.records) < MAX_RECORDS:
            # Without the per-request Focus counts: those are the metrics' (engine/metrics.py).
            self.records.append(replace(step, focus_keys={}))

    def as_dict(self) -> dict:
        return asdict(self)
