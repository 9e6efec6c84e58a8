"""Scheduler for masked-diffusion requests: admit with the whole canvas, then one denoising
step per engine step for every running request.

A request is admitted when the KV cache can hold its prompt *and* its G-token canvas (the
masks after the current block are part of the sequence, DESIGN §3), so a running request never
needs another block and never has to be preempted. The runner decides which positions each
step computes; the scheduler only accounts one nominal token per running request and the
prompt length for an admission. Committed blocks come back as sampled tokens and go through
vLLM's own stop checks (EOS, stop ids, max_tokens); the canvas cap ends the rest.

It also feeds the diffusion metrics (engine/metrics.py) from each step's runner record and
committed tokens.
"""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from vllm_focus.engine.metrics import DiffusionMetrics
from vllm_focus.engine.settings import resolve_plan, server_settings
from vllm_focus.model_executor.models.layout import family_of
from vllm_focus.settings import SettingsError

logger = init_logger(f"vllm.{__name__}")


class MaskedDiffusionScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.diffusion_settings = server_settings(self.vllm_config)
        self.family = family_of(self.vllm_config.model_config.hf_config)
        self.canvas_length: dict[str, int] = {}
        self.metrics = DiffusionMetrics(
            self.vllm_config.model_config.served_model_name,
            self.vllm_config.parallel_config.data_parallel_rank,
        )

    def add_request(self, request: Request) -> None:
        try:
            plan = resolve_plan(self.diffusion_settings, self.family, request.sampling_params)
        except SettingsError as err:
            # The API process validates requests already (engine/validation.py); a request
            # that still gets here fails alone, through vLLM's per-request error path, and the
            # engine keeps serving the others.
            logger.error("request %s rejected: %s", request.request_id, err)
            super().add_request(request)
            self.grammar_compile_error_reqs.add(request.request_id)
            return
        self.canvas_length[request.request_id] = plan.gen_length
        super().add_request(request)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        num_scheduled = {request.request_id: 1 for request in self.running}
        new_requests = self._admit(num_scheduled)
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

    def _admit(self, num_scheduled: dict[str, int]) -> list[NewRequestData]:
        admitted = []
        budget = self.max_num_scheduled_tokens - sum(num_scheduled.values())
        while self.waiting and len(self.running) < self.max_num_running_reqs:
            request = self.waiting.peek_request()
            if request.request_id not in self.canvas_length:
                break  # rejected in add_request; finished by update_from_output this step
            prompt_len = request.num_prompt_tokens
            if admitted and prompt_len > budget:
                break
            blocks = self.kv_cache_manager.allocate_slots(
                request,
                prompt_len,
                num_lookahead_tokens=self.canvas_length[request.request_id],
            )
            if blocks is None:
                break  # not enough KV cache yet: running requests will free some
            self.waiting.pop_request()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            block_ids = self.kv_cache_manager.get_block_ids(request.request_id)
            admitted.append(NewRequestData.from_request(request, block_ids))
            num_scheduled[request.request_id] = prompt_len
            budget -= prompt_len
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
        canvas = self.canvas_length.get(request.request_id)
        if not stopped and canvas is not None and request.num_output_tokens >= canvas:
            # Every block of the canvas is committed (gen_length capped below max_tokens).
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            stopped = True
        return new_token_ids, stopped

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        self.canvas_length.pop(request.request_id, None)
        self.metrics.on_finished(request.request_id, request.num_output_tokens)
        return super()._free_request(request, delay_free_blocks)
