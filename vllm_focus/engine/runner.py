"""The denoising step inside vLLM's model runner.

`DiffusionRunnerMixin` is put in front of the platform's V1 runner (GPUModelRunner or
CPUModelRunner): model loading, KV-cache allocation and attention backends stay vLLM's; only
`execute_model` is replaced. One engine step runs one denoising step for every scheduled
request: each request's `RequestState` names the positions to compute, the batch is run as
one ragged, non-causal forward over the paged KV cache (keys span the whole canvas, so a
block's queries see the prompt, earlier blocks and the later masks), and the committed block
tokens, when a block completes, go back to the scheduler as the step's "sampled" tokens.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import torch
from vllm.forward_context import set_forward_context
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

from vllm_focus.attention.backend import FocusBatch, FocusMetadata, focus_requested
from vllm_focus.attention.sparse_dllm import SparseDllmStep
from vllm_focus.attention.sparsed import SparsedStep, generation_block
from vllm_focus.engine.decoder import RequestState
from vllm_focus.engine.settings import resolve_plan, server_settings
from vllm_focus.engine.stats import StepRecord, StepStats


@dataclass
class DiffusionRunnerOutput(ModelRunnerOutput):
    """vLLM's runner output plus this step's record, read by the scheduler's metrics."""

    diffusion_step: StepRecord | None = field(default=None)


@dataclass
class _Slots:
    """Where a request's canvas lives in the paged KV cache."""

    block_ids: torch.Tensor  # [num_blocks] int32, physical block per logical block
    block_size: int

    def of(self, positions: torch.Tensor) -> torch.Tensor:
        blocks = self.block_ids[positions // self.block_size].to(torch.int64)
        return blocks * self.block_size + positions % self.block_size


def _sparse_dllm_step(state: RequestState, mode: str | None) -> SparseDllmStep | None:
    """The request's Sparse-dLLM part in this forward, positions as its query holds them (a
    SELECT step's query is every position, an ATTEND step's the block)."""
    if mode is None:
        return None
    rule = state.plan.sparse_dllm
    start, end = state.block_range()
    keep = rule.kept(state.total_len, end - start)
    return SparseDllmStep(mode, start, end, keep, rule.kernel, state.kept_keys, state.kept_compact)


def _sparsed_step(state: RequestState, mode: str | None, family: str) -> SparsedStep | None:
    """The request's SparseD part in this forward (its query: every position)."""
    if mode is None:
        return None
    select, size = state.plan.sparsed.for_prompt(state.prompt_len)
    last = generation_block(state.total_len, state.plan.gen_length, size)
    return SparsedStep(mode, size, select, last, family == "llada", state.sparsed_masks)


class DiffusionRunnerMixin:
    """Replaces `execute_model` of a vLLM V1 model runner with masked-diffusion decoding."""

    def _diffusion_init(self) -> None:
        if getattr(self, "_diffusion_states", None) is not None:
            return
        self._diffusion_states: dict[str, RequestState] = {}
        self._diffusion_slots: dict[str, _Slots] = {}
        self._diffusion_settings = server_settings(self.vllm_config)
        model = self.get_model()
        self._logits_shift = getattr(type(model), "logits_shift", 0)
        self._family = model.family
        self._focus = focus_requested(self.vllm_config)
        self.diffusion_stats = StepStats()

    def _add_diffusion_request(self, new_req) -> None:
        params = new_req.sampling_params
        plan = resolve_plan(self._diffusion_settings, self._family, params, focus=self._focus)
        seed = params.seed
        if seed is None:
            # Same on every tensor-parallel rank: derived from the request id.
            seed = zlib.crc32(new_req.req_id.encode())
        config = self.vllm_config.model_config.hf_config
        self._diffusion_states[new_req.req_id] = RequestState(
            list(new_req.prompt_token_ids),
            plan,
            config.mask_token_id,
            self._logits_shift,
            float(params.temperature),
            seed,
        )
        group = self.kv_cache_config.kv_cache_groups[0]
        self._diffusion_slots[new_req.req_id] = _Slots(
            torch.tensor(new_req.block_ids[0], dtype=torch.int32), group.kv_cache_spec.block_size
        )

    def _update_diffusion_requests(self, scheduler_output) -> None:
        for req_id in scheduler_output.finished_req_ids:
            self._diffusion_states.pop(req_id, None)
            self._diffusion_slots.pop(req_id, None)
        for new_req in scheduler_output.scheduled_new_reqs:
            self._add_diffusion_request(new_req)

    @torch.inference_mode()
    def execute_model(self, scheduler_output, intermediate_tensors=None) -> ModelRunnerOutput:
        started = time.perf_counter()
        self._diffusion_init()
        self._update_diffusion_requests(scheduler_output)
        req_ids = [r for r in scheduler_output.num_scheduled_tokens if r in self._diffusion_states]
        if not req_ids:
            return EMPTY_MODEL_RUNNER_OUTPUT
        states = [self._diffusion_states[r] for r in req_ids]
        refresh = any(state.is_full for state in states)
        queries = [state.query() for state in states]
        model_started = time.perf_counter()
        hidden, focus = self._forward(req_ids, states, queries)
        sources, logits = self._logits(states, queries, hidden)
        model_s = time.perf_counter() - model_started
        sampled = self._consume(states, sources, logits)
        step = StepRecord(
            refresh,
            model_s,
            time.perf_counter() - started,
            sum(q.numel() for q in queries),
            self._focus_keys(req_ids, focus),
        )
        self.diffusion_stats.record(step)
        return DiffusionRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            diffusion_step=step,
        )

    def _focus_keys(self, req_ids, focus: FocusBatch | None) -> dict[str, tuple[int, int]]:
        """Per Focus request: prompt keys attended over all layers, and prompt length x layers
        (its dense layers attend the whole prompt)."""
        if focus is None:
            return {}
        layers = self.vllm_config.model_config.hf_config.num_hidden_layers
        result = {}
        sparse_keys = focus.prompt_keys_attended()
        for r, (plan, prompt_len) in enumerate(zip(focus.plans, focus.prompt_lens)):
            if plan is None:
                continue
            dense = min(plan.dense_layers, layers)
            attended = dense * prompt_len + sparse_keys[r]
            result[req_ids[r]] = (attended, layers * prompt_len)
        return result

    def _forward(self, req_ids, states, queries) -> tuple[torch.Tensor, FocusBatch | None]:
        """One ragged non-causal forward; returns hidden states [sum |query|, hidden] and the
        step's Focus state (None: no request ran Focus)."""
        device = self.device
        positions = torch.cat(queries)
        input_ids = torch.cat([s.x[q] for s, q in zip(states, queries)])
        slots = []
        for req_id, state, query in zip(req_ids, states, queries):
            slot = self._diffusion_slots[req_id].of(query)
            fresh = state.fresh(query)
            slots.append(torch.where(fresh, slot, -1))
            if bool((query[fresh] < state.prompt_len).any()):
                state.prompt_version += 1  # this step rewrites prompt K/V
        slots = torch.cat(slots)
        lengths = torch.tensor([q.numel() for q in queries], dtype=torch.int32)
        query_start_loc = torch.zeros(len(queries) + 1, dtype=torch.int32)
        query_start_loc[1:] = torch.cumsum(lengths, 0)
        seq_lens = torch.tensor([s.total_len for s in states], dtype=torch.int32)
        tables = [self._diffusion_slots[r].block_ids for r in req_ids]
        width = max(t.numel() for t in tables)
        block_table = torch.zeros(len(tables), width, dtype=torch.int32)
        for row, table in enumerate(tables):
            block_table[row, : table.numel()] = table
        num_tokens = positions.numel()
        input_ids, positions = self._stage_inputs(input_ids, positions)
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc.to(device),
            query_start_loc_cpu=query_start_loc,
            seq_lens=seq_lens.to(device),
            num_reqs=len(queries),
            num_actual_tokens=num_tokens,
            max_query_len=int(lengths.max()),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=block_table.to(device),
            slot_mapping=slots.to(device),
            causal=False,
            positions=positions,
            seq_lens_cpu_upper_bound=seq_lens,
        )
        metadata, slot_mappings = {}, {}
        focus = None
        if self._focus:
            focus = self._focus_batch(req_ids, states, queries, device, self._family)
        for group in self._diffusion_attn_groups():
            built = group.get_metadata_builder().build(0, common)
            if isinstance(built, FocusMetadata):
                built.focus = focus
            for name in group.layer_names:
                metadata[name] = built
                slot_mappings[name] = common.slot_mapping
        with set_forward_context(
            metadata, self.vllm_config, num_tokens=num_tokens, slot_mapping=slot_mappings
        ):
            hidden = self.model(input_ids=input_ids, positions=positions)
        return hidden, focus

    def _stage_inputs(self, input_ids, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's ids and positions, copied into vLLM's own persistent input buffers.

        vLLM compiles the model at warm-up on these buffers (int32 ids, int64 positions) and
        drops Dynamo's guards, so the compiled graph assumes their dtypes and device: a tensor
        of another dtype is read as if it had theirs (int64 ids read as int32 give wrong
        tokens, silently).
        """
        count = positions.numel()
        if count > self.max_num_tokens:
            raise RuntimeError(
                f"a forward of {count} tokens exceeds max_num_batched_tokens "
                f"({self.max_num_tokens}); the scheduler must not schedule it"
            )
        ids = self.input_ids.gpu[:count]
        ids.copy_(input_ids, non_blocking=True)
        staged_positions = self.positions[:count]
        staged_positions.copy_(positions, non_blocking=True)
        return ids, staged_positions

    @staticmethod
    def _focus_batch(req_ids, states, queries, device, family: str) -> FocusBatch | None:
        """What the FOCUS backend's layers need about this step's Focus, Sparse-dLLM and
        SparseD requests."""
        modes = [state.sparse_dllm_mode() for state in states]
        patterns = [state.sparsed_mode() for state in states]
        if all(s.focus_step is None for s in states) and not any(modes) and not any(patterns):
            return None
        rows, owners, offset = [torch.empty(0, dtype=torch.int64)], [], 0
        for r, (state, query) in enumerate(zip(states, queries)):
            if state.focus_step is not None:
                local = torch.searchsorted(query, state.focus_step.focus)
                rows.append(local + offset)
                owners.append(torch.full_like(local, r))
            offset += query.numel()
        owners = torch.cat(owners) if owners else torch.empty(0, dtype=torch.int64)
        return FocusBatch(
            plans=[None if s.focus_step is None else s.focus for s in states],
            prompt_lens=[s.prompt_len for s in states],
            focus_rows=torch.cat(rows).to(device),
            focus_req=owners.to(torch.int32).to(device),
            prompt_keys=[(r, s.prompt_version) for r, s in zip(req_ids, states)],
            sparse_dllm=[_sparse_dllm_step(s, mode) for s, mode in zip(states, modes)],
            sparsed=[_sparsed_step(s, mode, family) for s, mode in zip(states, patterns)],
        )

    def _diffusion_attn_groups(self):
        groups = [g for per_kv_group in self.attn_groups for g in per_kv_group]
        for group in groups:
            kernel = group.kernel_block_size
            if kernel is not None and kernel != group.kv_cache_spec.block_size:
                raise NotImplementedError(
                    f"attention backend {group.backend.get_name()} splits KV blocks into "
                    f"kernel blocks of {kernel}; vllm-focus needs them equal to the cache "
                    f"block size ({group.kv_cache_spec.block_size}); set --block-size {kernel}"
                )
        return groups

    def _logits(self, states, queries, hidden) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per request the positions whose logits it reads, and those logits, left on the
        device: decoding reads back only each position's token and confidence
        (`policy.propose`). The model's time ends at the device's synchronisation here."""
        offsets, rows, per_request = 0, [], []
        for state, query in zip(states, queries):
            sources = state.logit_sources(query)
            per_request.append(sources)
            rows.append(torch.searchsorted(query, sources) + offsets)
            offsets += query.numel()
        index = torch.cat(rows).to(hidden.device)
        logits = self.get_model().compute_logits(hidden[index]).float()
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        return per_request, logits

    @staticmethod
    def _consume(states, per_request, logits) -> list[list[int]]:
        """One denoising step per request; returns each one's committed tokens."""
        sampled, start = [], 0
        for state, sources in zip(states, per_request):
            count = sources.numel()
            sampled.append(state.consume(sources, logits[start : start + count]))
            start += count
        return sampled
