"""Scheduler for masked-diffusion requests: admit with the whole canvas, then one denoising
step per engine step for every running request, within the token budget.

A request is admitted when the KV cache can hold its prompt *and* its G-token canvas (the
masks after the current block are part of the sequence, docs/design.md §3), so a running
request never needs another block and never has to be preempted.

Each step is charged what it computes (`policy.step_token_bound`): a block-start refresh the
prompt and canvas (or, refresh `prefill`, the span from the finished block on), a within-block
step its block (`dual`) or block and suffix (`prefix`), a Focus step the bound of its active
set. A bidirectional refresh cannot be chunked by position, so the budget
(`max_num_batched_tokens`, at least `max_model_len`) holds any one request's refresh; no
forward is ever larger than the budget. When several requests reach a block start together,
within-block steps go first and the refreshes that no longer fit wait for a later engine step,
the longest-waiting first; a refresh held back once goes ahead of everything the next step.

Committed blocks come back as sampled tokens and go through vLLM's own stop checks (EOS, stop
ids, max_tokens); the canvas cap ends the rest. It also feeds the diffusion metrics
(engine/metrics.py) from each step's runner record and committed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from vllm_focus.attention.backend import focus_requested
from vllm_focus.engine.metrics import DiffusionMetrics
from vllm_focus.engine.settings import resolve_plan, server_settings
from vllm_focus.model_executor.models.layout import family_of
from vllm_focus.policy import step_token_bound
from vllm_focus.settings import DecodePlan, SettingsError

logger = init_logger(f"vllm.{__name__}")


@dataclass
class _Progress:
    """Where a request's decoding stands, as far as the scheduler needs to know: the runner
    commits a block in the step that completes it, so a step with committed tokens ends a
    block and the request's next step starts the next one (a refresh)."""

    plan: DecodePlan
    prompt_len: int
    focus: bool  # its within-block steps run Focus
    block: int = 0
    block_step: int = 0  # steps taken in the current block
    held: int = 0  # engine steps its due refresh waited for budget

    @property
    def block_start(self) -> bool:
        return self.block_step == 0

    def cost(self, shift: int) -> int:
        full = self.plan.full_step(self.block_step)
        return step_token_bound(self.plan, self.prompt_len, self.block, full, self.focus, shift)


class MaskedDiffusionScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.diffusion_settings = server_settings(self.vllm_config)
        self.family = family_of(self.vllm_config.model_config.hf_config)
        self.shift = 1 if self.family == "dream" else 0
        self.focus = focus_requested(self.vllm_config)
        self.progress: dict[str, _Progress] = {}
        self.metrics = DiffusionMetrics(
            self.vllm_config.model_config.served_model_name,
            self.vllm_config.parallel_config.data_parallel_rank,
        )

    def add_request(self, request: Request) -> None:
        try:
            plan = resolve_plan(
                self.diffusion_settings, self.family, request.sampling_params, focus=self.focus
            )
            total = request.num_prompt_tokens + plan.gen_length
            if total > self.max_num_scheduled_tokens:
                raise SettingsError(
                    f"the prompt ({request.num_prompt_tokens} tokens) and its canvas "
                    f"({plan.gen_length}) exceed max_num_batched_tokens "
                    f"({self.max_num_scheduled_tokens}), which must hold one refresh"
                )
        except SettingsError as err:
            # The API process validates requests already (engine/validation.py); a request
            # that still gets here fails alone, through vLLM's per-request error path, and the
            # engine keeps serving the others.
            logger.error("request %s rejected: %s", request.request_id, err)
            super().add_request(request)
            errors = self.grammar_compile_error_reqs
            if isinstance(errors, dict):  # vLLM 0.33: request id -> RequestError (to the client)
                from vllm.outputs import RequestError

                errors[request.request_id] = RequestError(code="validation_error", message=str(err))
            else:  # vLLM 0.32: a set of request ids
                errors.add(request.request_id)
            return
        focus = plan.focus is not None and plan.focus.applies(request.num_prompt_tokens, plan.cache)
        self.progress[request.request_id] = _Progress(plan, request.num_prompt_tokens, focus)
        super().add_request(request)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        num_scheduled: dict[str, int] = {}
        budget = self.max_num_scheduled_tokens
        held = False
        for request in self._step_order():
            progress = self.progress[request.request_id]
            cost = progress.cost(self.shift)
            if cost > budget:
                progress.held += 1
                held = True
                continue
            progress.held = 0
            num_scheduled[request.request_id] = cost
            budget -= cost
        # A new request's first forward is a refresh too: none jumps a held one.
        new_requests = [] if held else self._admit(num_scheduled, budget)
        output = SchedulerOutput(
            scheduled_new_reqs=new_requests,
            scheduled_cached_reqs=CachedRequestData.make_empty(),
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            scheduled_spec_decode_tokens={},
            scheduled_encoder_inputs={},
            finished_req_ids=self.finished_req_ids,
            free_encoder_mm_hashes=[],
            preempted_req_ids=set(),
        )
        for req_id, count in num_scheduled.items():
            request = self.requests[req_id]
            request.num_in_flight_tokens += count
            request.num_computed_tokens = request.num_tokens
        self.finished_req_ids = set()
        return output

    def _step_order(self) -> list[Request]:
        """Running requests in the order they claim budget: refreshes held back before, the
        longest-waiting first; then within-block steps; then the other refreshes."""
        running = [r for r in self.running if r.request_id in self.progress]
        progress = self.progress

        def rank(indexed: tuple[int, Request]) -> tuple[int, int, int]:
            index, request = indexed
            state = progress[request.request_id]
            if state.held:
                return (0, -state.held, index)
            return (1 if not state.block_start else 2, 0, index)

        return [request for _, request in sorted(enumerate(running), key=rank)]

    def _admit(self, num_scheduled: dict[str, int], budget: int) -> list[NewRequestData]:
        admitted = []
        while self.waiting and len(self.running) < self.max_num_running_reqs:
            request = self.waiting.peek_request()
            progress = self.progress.get(request.request_id)
            if progress is None:
                break  # rejected in add_request; finished by update_from_output this step
            cost = progress.cost(self.shift)
            if cost > budget:
                break
            blocks = self.kv_cache_manager.allocate_slots(
                request,
                request.num_prompt_tokens,
                num_lookahead_tokens=progress.plan.gen_length,
            )
            if blocks is None:
                break  # not enough KV cache yet: running requests will free some
            self.waiting.pop_request()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            block_ids = self.kv_cache_manager.get_block_ids(request.request_id)
            admitted.append(NewRequestData.from_request(request, block_ids))
            num_scheduled[request.request_id] = cost
            budget -= cost
        return admitted

    def update_from_output(self, scheduler_output, model_runner_output):
        # Only requests still here: vLLM handles aborts while a step runs, so a step's output
        # may name a request that has already been freed (vLLM skips it too).
        live = self.requests
        committed = {
            req_id: len(model_runner_output.sampled_token_ids[index])
            for req_id, index in model_runner_output.req_id_to_index.items()
            if req_id in live
        }
        for req_id, count in committed.items():
            progress = self.progress.get(req_id)
            if progress is not None:
                progress.block_step = 0 if count > 0 else progress.block_step + 1
                if count > 0:
                    progress.block += 1
        step = getattr(model_runner_output, "diffusion_step", None)
        if step is not None or committed:
            self.metrics.on_step(step, committed, live)

        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self.metrics.maybe_write(idle=not self.requests)
        return outputs

    def _update_request_with_output(self, request, new_token_ids, is_stale=False):
        new_token_ids, stopped = super()._update_request_with_output(
            request, new_token_ids, is_stale
        )
        progress = self.progress.get(request.request_id)
        canvas = None if progress is None else progress.plan.gen_length
        if not stopped and canvas is not None and request.num_output_tokens >= canvas:
            # Every block of the canvas is committed (gen_length capped below max_tokens).
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            stopped = True
        return new_token_ids, stopped

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        self.progress.pop(request.request_id, None)
        self.metrics.on_finished(request.request_id, request.num_output_tokens)
        return super()._free_request(request, delay_free_blocks)
