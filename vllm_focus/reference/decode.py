"""The reference decoder: docs/design.md §3 semantics written the plain way, one request at a time.

The canvas is prompt + G masks, decoded block by block. Each step picks, for the masked
positions of the current block, a token (argmax, or Gumbel-max with a seeded generator) and a
confidence, then unmasks the positions the schedule asks for. Cache modes only change which
positions a forward computes and where the other keys/values come from:

- `none`: every step computes every position.
- `prefix` / `dual`: the block's first step is a refresh forward (every position, or with
  refresh `prefill` every position from the previous block on) whose K/V are stored; later steps
  compute the block and what follows it (`prefix`) or the block alone (`dual`), reading the
  other K/V from the store. Fresh block K/V are written back.

Dream predicts position p from the hidden state at p - 1. In a cached step the block's first
position has no computed left neighbour; its logits are those of the block's refresh forward
(the hidden state there is cached along with the K/V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_focus.policy import propose, recomputed_end, select, step_count
from vllm_focus.reference.model import (
    FocusForward,
    KVCache,
    ReferenceModel,
    SparsedForward,
    SparseDllmForward,
)
from vllm_focus.settings import DecodePlan, DiffusionSettings


@dataclass
class _FocusPositions:
    focus: torch.Tensor  # F, ascending
    candidates: torch.Tensor  # the block's masked positions inside A, ascending
    query: torch.Tensor  # what the forward computes, ascending


def _focus_positions(
    indicator, masked: list[int], start, count, threshold, window, total, shift, tail_from
) -> _FocusPositions:
    """One Focus step's positions, written out plainly (the engine's own version is
    `policy.focus_step`; this one does not share its code, so the tests compare decisions).

    F: the masked positions with the highest past confidence — `count` of them (at least one),
    or with a threshold every one at or above it plus the best; ties to the lower position.
    A: every position within `window` of one in F, inside the sequence. The forward computes
    A, the position before each candidate (Dream's shift reads p - 1 for p) and, under
    `prefix`, everything from `tail_from` on.
    """
    scored = sorted(masked, key=lambda p: (-float(indicator[p - start]), p))
    if threshold is None:
        focus = scored[: max(count, 1)]
    else:
        focus = [p for p in masked if float(indicator[p - start]) >= threshold]
        if scored[0] not in focus:
            focus.append(scored[0])
    active = set()
    for p in focus:
        for q in range(p - window, p + window + 1):
            if 0 <= q < total:
                active.add(q)
    candidates = [p for p in masked if p in active]
    query = set(active) | {p - shift for p in candidates}
    if tail_from is not None:
        query |= set(range(tail_from, total))

    def as_tensor(values):
        return torch.tensor(sorted(values), dtype=torch.long)

    return _FocusPositions(as_tensor(focus), as_tensor(candidates), as_tensor(query))


def _kept_blocks(focus, prompt_len: int) -> int:
    """Prompt blocks a sparse layer keeps: `keep_ratio` of the prompt but at least
    `min_keep_tokens`, in whole blocks (rounded up), never more than the prompt has."""
    size = focus.prompt_block_size
    blocks = math.ceil(prompt_len / size)
    tokens = max(math.ceil(focus.keep_ratio * prompt_len), focus.min_keep_tokens)
    return min(blocks, math.ceil(tokens / size))


class RequestDecoder:
    """Decodes one request: holds its canvas, step counter and (for caches) its K/V store."""

    def __init__(
        self,
        model: ReferenceModel,
        prompt: list[int],
        plan: DecodePlan,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> None:
        if not prompt:
            raise ValueError("the prompt must hold at least one token")
        self.model, self.plan = model, plan
        self.temperature, self.seed = temperature, seed
        self.prompt_len = len(prompt)
        self.mask = model.mask_token_id
        self.x = torch.tensor(prompt + [self.mask] * plan.gen_length)
        self.cache: KVCache | None = None
        self.step = 0  # decoding steps taken so far (the RNG counter)
        self.first_row: torch.Tensor | None = None  # Dream: logits of the block's 1st position
        self.sparsed_masks: list[torch.Tensor] | None = None  # SparseD: per layer, its pattern

    def run(self) -> list[int]:
        for block in range(self.plan.num_blocks):
            self._decode_block(block)
        return self.x[self.prompt_len :].tolist()

    def _block_range(self, block: int) -> tuple[int, int]:
        start = self.prompt_len + block * self.plan.block_length
        return start, start + self.plan.block_length

    def _masked(self, start: int, end: int) -> torch.Tensor:
        return torch.nonzero(self.x[start:end] == self.mask).flatten() + start

    def _decode_block(self, block: int) -> None:
        plan = self.plan
        start, end = self._block_range(block)
        focus = plan.focus
        # Focus runs on the within-block steps of a cached mode, for long enough prompts.
        if focus is not None and (plan.cache == "none" or self.prompt_len < focus.min_prompt_len):
            focus = None
        # Past-confidence indicator: per block offset, the confidence last computed there.
        indicator = torch.full((plan.block_length,), float("-inf"), dtype=torch.float64)
        kept: list[torch.Tensor] = []  # Sparse-dLLM: per layer, the keys its second step kept
        i = 0
        while self._masked(start, end).numel() and (plan.threshold or i < plan.steps_per_block):
            masked = self._masked(start, end)
            count = step_count(plan, masked.numel(), i)
            candidates = masked
            if plan.sparsed is not None:
                logits_of = self._forward_sparsed()
            elif plan.sparse_dllm is not None and i > 0:
                logits_of = self._forward_sparse_dllm(block, i, kept)
            elif focus is not None and i > 0:
                step = _focus_positions(
                    indicator,
                    masked.tolist(),
                    start,
                    count,
                    plan.threshold,
                    focus.window,
                    self.x.numel(),
                    self.model.logits_shift,
                    tail_from=end if plan.cache == "prefix" else None,
                )
                candidates = step.candidates
                logits_of = self._forward_focus(block, step)
            else:
                logits_of = self._forward(block, refresh=(i == 0))
            choice = propose(
                logits_of(candidates),
                candidates - start,
                plan,
                self.mask,
                self.temperature,
                self.seed,
                self.step,
            )
            indicator[candidates - start] = choice.confidence
            if i == 0 and plan.cache != "none" and plan.schedule == "dream":
                # Fast-dLLM's Dream decoder commits the block's first position at block start.
                self._commit_first(start, logits_of)
            else:
                chosen = select(choice.confidence, count, plan.threshold)
                self.x[candidates[chosen]] = choice.tokens[chosen]
            self.step += 1
            i += 1

    def _commit_first(self, start: int, logits_of) -> None:
        first = torch.tensor([start])
        choice = propose(
            logits_of(first),
            first - start,
            self.plan,
            self.mask,
            self.temperature,
            self.seed,
            self.step,
        )
        self.x[start] = choice.tokens[0]
        if self.plan.steps_per_block == 1 and not self.plan.threshold:
            rest = self._masked(start, start + self.plan.block_length)
            if rest.numel():
                choice = propose(
                    logits_of(rest),
                    rest - start,
                    self.plan,
                    self.mask,
                    self.temperature,
                    self.seed,
                    self.step,
                )
                self.x[rest] = choice.tokens

    def _forward(self, block: int, refresh: bool):
        """Run this step's forward; return a function mapping positions to their logits."""
        plan, total = self.plan, self.x.numel()
        start, end = self._block_range(block)
        if plan.cache == "none":
            query, cache = torch.arange(total), None
        elif refresh:
            first = 0 if (plan.refresh == "block" or block == 0) else start - plan.block_length
            query, cache = torch.arange(first, total), self.cache
        else:
            query = torch.arange(start, recomputed_end(plan, start, total))
            cache = self.cache
        logits, fresh = self.model.forward(self.x, query, cache)
        if plan.cache != "none":
            if self.cache is None:
                self.cache = self.model.empty_cache(total)
            written = query if refresh else query[(query >= start) & (query < end)]
            self.cache.write(written, _rows(fresh, query, written))
        if refresh and self.model.logits_shift:
            self.first_row = logits[int(torch.searchsorted(query, start - 1))]
        return self._logits_of(query, logits)

    def _forward_sparse_dllm(self, block: int, i: int, kept: list[torch.Tensor]):
        """Sparse-dLLM's steps after a block's first: the second is a full forward (its K/V
        all stored) in which every layer finds the keys it keeps, into `kept`; later ones
        compute the block alone, its queries attending those keys and the block."""
        start, end = self._block_range(block)
        rule = self.plan.sparse_dllm
        spec = SparseDllmForward(start, end, rule.keep_ratio, rule.kernel)
        if i == 1:
            query = torch.arange(self.x.numel())
            logits, fresh = self.model.forward(self.x, query, None, sparse_dllm=spec)
            kept[:] = spec.found
            self.cache.write(query, fresh)
        else:
            query = torch.arange(start, end)
            spec.kept = kept
            logits, fresh = self.model.forward(self.x, query, self.cache, sparse_dllm=spec)
            self.cache.write(query, fresh)
        return self._logits_of(query, logits)

    def _forward_sparsed(self):
        """A SparseD step (no cache: the whole sequence). Dense up to the pattern step,
        int(all steps x skip) + 1 counted over the request; that one also fixes every layer's
        pattern; later ones attend through it."""
        plan = self.plan
        select, size = plan.sparsed.for_prompt(self.prompt_len)
        spec = SparsedForward(size, select, plan.gen_length, masks=self.sparsed_masks)
        pattern_step = int(plan.steps_per_block * plan.num_blocks * plan.sparsed.skip) + 1
        query = torch.arange(self.x.numel())
        if self.step < pattern_step:
            logits, _ = self.model.forward(self.x, query)
        else:
            logits, _ = self.model.forward(self.x, query, sparsed=spec)
            if self.step == pattern_step:
                self.sparsed_masks = spec.found
        return self._logits_of(query, logits)

    def _forward_focus(self, block: int, step: _FocusPositions):
        """A Focus step's forward over the active set; the cache keeps the K/V of query
        positions outside the range the cache mode recomputes (the block for `dual`, the
        block and what follows for `prefix`), and takes back only the block's."""
        plan, total, focus = self.plan, self.x.numel(), self.plan.focus
        start, end = self._block_range(block)
        query = step.query
        fresh = (query >= start) & (query < recomputed_end(plan, start, total))
        spec = FocusForward(
            prompt_len=self.prompt_len,
            focus_rows=torch.searchsorted(query, step.focus),
            fresh=fresh,
            dense_layers=focus.dense_layers,
            num_sinks=focus.num_sinks,
            prompt_block_size=focus.prompt_block_size,
            kept_blocks=_kept_blocks(focus, self.prompt_len),
        )
        logits, kv = self.model.forward(self.x, query, self.cache, spec)
        written = query[fresh & (query < end)]
        self.cache.write(written, _rows(kv, query, written))
        return self._logits_of(query, logits)

    def _logits_of(self, query: torch.Tensor, logits: torch.Tensor):
        row_of = {int(p): r for r, p in enumerate(query)}
        shift = self.model.logits_shift

        def logits_of(positions: torch.Tensor) -> torch.Tensor:
            rows = []
            for p in positions.tolist():
                source = p - shift
                if source in row_of:
                    rows.append(logits[row_of[source]])
                else:
                    # Only the block's first position can lack its left neighbour here.
                    rows.append(self.first_row)
            return torch.stack(rows)

        return logits_of


def _rows(fresh: KVCache, query: torch.Tensor, wanted: torch.Tensor) -> KVCache:
    index = torch.searchsorted(query, wanted)
    return KVCache([k[index] for k in fresh.keys], [v[index] for v in fresh.values])


def generate(
    model: ReferenceModel,
    prompts: list[list[int]],
    plans: list[DecodePlan] | DecodePlan,
    temperature: float = 0.0,
    seeds: list[int | None] | int | None = None,
) -> list[list[int]]:
    """The G generated tokens of each prompt (before EOS truncation), decoded independently."""
    plans = plans if isinstance(plans, list) else [plans] * len(prompts)
    seeds = seeds if isinstance(seeds, list) else [seeds] * len(prompts)
    return [
        RequestDecoder(model, prompt, plan, temperature, seed).run()
        for prompt, plan, seed in zip(prompts, plans, seeds)
    ]


def finish(tokens: list[int], eos_ids: set[int], max_tokens: int) -> tuple[list[int], str]:
    """Cut generated tokens as the server does: through the first EOS, else at max_tokens."""
    for index, token in enumerate(tokens[:max_tokens]):
        if token in eos_ids:
            return tokens[: index + 1], "stop"
    return tokens[:max_tokens], "length"


def served_outputs(
    model: ReferenceModel,
    prompts: list[list[int]],
    settings: DiffusionSettings,
    max_tokens: list[int],
    temperature: float = 0.0,
    seed: int | None = None,
    focus: bool = False,
) -> list[list[int]]:
    """The tokens a server returns for each prompt: the decode cut at EOS or max_tokens.

    `focus`: the server runs Focus attention (`--attention-backend focus`).
    """
    plans = [settings.plan(model.config.family, m, focus=focus) for m in max_tokens]
    tokens = generate(model, prompts, plans, temperature=temperature, seeds=seed)
    return [finish(t, model.eos_token_ids, m)[0] for t, m in zip(tokens, max_tokens)]
