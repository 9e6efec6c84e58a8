"""Per-request denoising state inside the engine: one engine step = one denoising step.

Each step is two calls: `query()` names the positions the forward must compute (the engine
batches them across requests and writes their K/V into the request's paged cache slots), and
`consume()` takes the logits rows it asked for (`logit_sources()`), unmasks positions and
returns the finished block's tokens when a block completes. Semantics: docs/design.md §3, the
same as the reference decoder (vllm_focus.reference.decode), which the tests hold this to.
"""

from __future__ import annotations

import torch

from vllm_focus.attention import sparsed
from vllm_focus.attention.sparse_dllm import ATTEND, SELECT
from vllm_focus.policy import (
    FocusStep,
    focus_step,
    propose,
    recomputed_end,
    select,
    step_count,
    step_span,
)
from vllm_focus.settings import DecodePlan


class RequestState:
    def __init__(
        self,
        prompt: list[int],
        plan: DecodePlan,
        mask_token_id: int,
        logits_shift: int,
        temperature: float,
        seed: int,
    ) -> None:
        self.plan, self.mask, self.shift = plan, mask_token_id, logits_shift
        self.temperature, self.seed = temperature, seed
        self.prompt_len = len(prompt)
        self.x = torch.tensor(prompt + [mask_token_id] * plan.gen_length)
        self.block = 0  # current block
        self.block_step = 0  # steps taken in the current block
        self.step = 0  # steps taken in the request (the RNG counter)
        self.first_row: torch.Tensor | None = None  # Dream: logits of the block's 1st position
        focus = plan.focus
        self.focus = focus if focus and focus.applies(self.prompt_len, plan.cache) else None
        # Past-confidence indicator (Focus): per block offset, the last confidence computed.
        self.indicator = torch.full((plan.block_length,), float("-inf"), dtype=torch.float64)
        self.focus_step: FocusStep | None = None  # this step's F, candidates and query
        self.prompt_version = 0  # bumped by the runner at each step that writes prompt K/V
        # Sparse-dLLM: per layer index, the key positions kept at the block's second step
        # (on the device; written by the FOCUS backend's layers, read by later steps).
        self.kept_keys: dict[int, torch.Tensor] = {}
        # ... and on the CPU path their K/V, copied once into a private cache per layer.
        self.kept_compact: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # SparseD: per layer index, the block pattern fixed at the pattern step, kept for
        # the rest of the request (on the device, written and read by the FOCUS backend).
        self.sparsed_masks: dict[int, torch.Tensor] = {}

    @property
    def total_len(self) -> int:
        return self.x.numel()

    @property
    def done(self) -> bool:
        return self.block >= self.plan.num_blocks

    def block_range(self) -> tuple[int, int]:
        """The current block's positions [start, end)."""
        start = self.prompt_len + self.block * self.plan.block_length
        return start, start + self.plan.block_length

    def _masked(self) -> torch.Tensor:
        start, end = self.block_range()
        return torch.nonzero(self.x[start:end] == self.mask).flatten() + start

    @property
    def is_refresh(self) -> bool:
        return self.block_step == 0

    @property
    def is_full(self) -> bool:
        """This step computes every position (a refresh, or Sparse-dLLM's second step)."""
        return self.plan.full_step(self.block_step)

    def sparse_dllm_mode(self) -> str | None:
        """Sparse-dLLM's part in this step: 'select' (the block's second step: every layer
        keeps its top keys outside the block), 'attend' (later steps: the block's queries
        attend the kept keys and the block), None (a first step, or another method)."""
        if self.plan.sparse_dllm is None or self.block_step == 0:
            return None
        return SELECT if self.block_step == 1 else ATTEND

    def sparsed_mode(self) -> str | None:
        """SparseD's part in this step: 'select' (the pattern step: dense, and every layer
        fixes its pattern), 'attend' (every later step), None (earlier, dense, steps, or
        another method)."""
        rule = self.plan.sparsed
        if rule is None:
            return None
        pattern = rule.pattern_step(self.plan.total_steps)
        if self.step < pattern:
            return None
        return sparsed.SELECT if self.step == pattern else sparsed.ATTEND

    def query(self) -> torch.Tensor:
        """Positions this step computes (ascending)."""
        plan, total = self.plan, self.total_len
        start, end = self.block_range()
        self.focus_step = None
        if self.focus is not None and not self.is_refresh:
            masked = self._masked()
            self.focus_step = focus_step(
                self.indicator,
                masked,
                start,
                step_count(plan, masked.numel(), self.block_step),
                plan.threshold,
                self.focus.window,
                total,
                self.shift,
                tail_from=end if plan.cache == "prefix" else None,
            )
            return self.focus_step.query
        span = step_span(plan, self.prompt_len, self.block, self.is_full)
        return torch.arange(span.start, span.stop)

    def fresh(self, query: torch.Tensor) -> torch.Tensor:
        """Bool per query position: its fresh K/V go to the cache (and into this step's
        attention). A Focus step leaves the K/V of positions outside the range its cache
        mode recomputes to the cache."""
        if self.focus_step is None:
            return torch.ones(query.numel(), dtype=torch.bool)
        start, _ = self.block_range()
        return (query >= start) & (query < recomputed_end(self.plan, start, self.total_len))

    def _candidates(self) -> torch.Tensor:
        return self._masked() if self.focus_step is None else self.focus_step.candidates

    def logit_sources(self, query: torch.Tensor) -> torch.Tensor:
        """Positions (within `query`) whose logits this step reads."""
        start, _ = self.block_range()
        sources = self._candidates() - self.shift
        if self.is_refresh and self.shift:
            sources = torch.unique(torch.cat([sources, torch.tensor([start - 1])]))
        return sources[torch.isin(sources, query)]

    def consume(self, sources: torch.Tensor, logits: torch.Tensor) -> list[int]:
        """Apply one step given the logits rows of `sources`; return a finished block's tokens."""
        row_of = {int(p): r for r, p in enumerate(sources)}
        start, end = self.block_range()
        if self.is_refresh and self.shift:
            self.first_row = logits[row_of[start - 1]]

        def logits_of(positions: torch.Tensor) -> torch.Tensor:
            rows = [row_of.get(int(p) - self.shift) for p in positions]
            return torch.stack([self.first_row if r is None else logits[r] for r in rows])

        plan = self.plan
        if self.is_refresh and plan.cache != "none" and plan.schedule == "dream":
            if self.focus is not None:  # the indicator needs every masked position's score
                masked = self._masked()
                self.indicator[masked - start] = self._propose(masked, logits_of, start).confidence
            self._commit_first(start, logits_of)
        else:
            self._unmask(start, logits_of)
        self.step += 1
        self.block_step += 1
        self.focus_step = None
        if self._masked().numel() and (plan.threshold or self.block_step < plan.steps_per_block):
            return []
        tokens = self.x[start:end].tolist()
        self.block += 1
        self.block_step = 0
        self.indicator.fill_(float("-inf"))
        self.kept_keys.clear()
        self.kept_compact.clear()
        return tokens

    def _propose(self, positions: torch.Tensor, logits_of, start: int):
        return propose(
            logits_of(positions),
            positions - start,
            self.plan,
            self.mask,
            self.temperature,
            self.seed,
            self.step,
        )

    def _unmask(self, start: int, logits_of) -> None:
        """Unmask this step's share among the candidates (the block's masked positions, or
        those in a Focus step's active set), by their fresh confidences."""
        count = step_count(self.plan, self._masked().numel(), self.block_step)
        candidates = self._candidates()
        choice = self._propose(candidates, logits_of, start)
        self.indicator[candidates - start] = choice.confidence
        chosen = select(choice.confidence, count, self.plan.threshold)
        self.x[candidates[chosen]] = choice.tokens[chosen]

    def _commit_first(self, start: int, logits_of) -> None:
        """Fast-dLLM's Dream decoder: the block start commits the block's first position."""
        first = torch.tensor([start])
        self.x[start] = self._propose(first, logits_of, start).tokens[0]
        if self.plan.steps_per_block == 1 and not self.plan.threshold:
            rest = self._masked()
            if rest.numel():
                self.x[rest] = self._propose(rest, logits_of, start).tokens
