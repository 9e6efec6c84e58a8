"""Decoding policy: unmask schedules, token proposals, confidences, selection.

Small pure functions shared by the reference decoder and the engine, so both take the same
decisions from the same logits. Tested against the published generators
(tests/test_published_generators.py) through the reference decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_focus.settings import DREAM_EPS, DecodePlan

_GOLDEN = 0x9E3779B97F4A7C15
_MIX = 0xBF58476D1CE4E5B9


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The RNG of one decoding step of one request: a pure function of (seed, step, stream)."""
    value = (seed * _GOLDEN + step * _MIX + stream * 0x94D049BB133111EB) % (2**63)
    return torch.Generator().manual_seed(value)


def llada_step_counts(num_masked: int, steps: int) -> list[int]:
    """LLaDA's even split of a block's masks over its steps, remainder to the earliest."""
    base, remainder = divmod(num_masked, steps)
    return [base + (1 if i < remainder else 0) for i in range(steps)]


def step_count(plan: DecodePlan, num_masked: int, block_step: int) -> int | None:
    """Tokens step `block_step` of a block unmasks, `num_masked` masks being left; None when
    a threshold decides instead."""
    if plan.threshold is not None:
        return None
    if plan.schedule == "llada":
        return llada_step_counts(plan.block_length, plan.steps_per_block)[block_step]
    return dream_step_count(num_masked, block_step, plan.steps_per_block)


def recomputed_end(plan: DecodePlan, start: int, total: int) -> int:
    """End of what a within-block step of a cached mode recomputes, from the block's `start`:
    the block for `dual`, the block and every later position for `prefix`."""
    return start + plan.block_length if plan.cache == "dual" else total


def step_span(plan: DecodePlan, prompt_len: int, block: int, block_start: bool) -> range:
    """Positions a step outside Focus computes (docs/design.md §3, cache modes).

    Without a cache every step computes the whole canvas. A block's first step refreshes
    everything (refresh `block`, and the first block under `prefill`) or, under `prefill`,
    the finished block, the current one and every later position. Later steps compute the
    block (`dual`) or the block and what follows (`prefix`).
    """
    total = prompt_len + plan.gen_length
    start = prompt_len + block * plan.block_length
    if plan.cache == "none":
        return range(total)
    if block_start:
        first = 0 if (plan.refresh == "block" or block == 0) else start - plan.block_length
        return range(first, total)
    return range(start, recomputed_end(plan, start, total))


def step_token_bound(
    plan: DecodePlan, prompt_len: int, block: int, block_start: bool, focus: bool, shift: int
) -> int:
    """The most positions one step of a request can compute: what the scheduler charges.

    Exact outside Focus. A Focus step's active set depends on the last step's confidences;
    it lies within the block widened by the window (and, for the shift, one to the left),
    plus everything after the block under `prefix` (see `focus_step`).
    """
    span = step_span(plan, prompt_len, block, block_start)
    if block_start or not focus:
        return len(span)
    total = prompt_len + plan.gen_length
    window = plan.focus.window
    low = max(0, span.start - max(window, shift))
    high = total if plan.cache == "prefix" else min(total, span.stop + window)
    return high - low


def dream_step_count(num_masked: int, step: int, steps: int) -> int:
    """Dream's time-grid count: int(n·(1 − s/t)) with t, s on linspace(1, eps, steps + 1).

    Computed in float32 torch arithmetic, as Dream does: the truncation is sensitive to it.
    The last step reveals everything left.
    """
    if step >= steps - 1:
        return num_masked
    grid = torch.linspace(1, DREAM_EPS, steps + 1)
    t, s = grid[step], grid[step + 1]
    return int(torch.tensor(num_masked, dtype=torch.float32) * (1 - s / t))


@dataclass
class Choice:
    tokens: torch.Tensor  # [n] proposed token per row
    confidence: torch.Tensor  # [n] float64 score, higher = surer


def propose(
    logits: torch.Tensor,
    offsets: torch.Tensor,
    plan: DecodePlan,
    mask_token_id: int,
    temperature: float,
    seed: int | None,
    step: int,
) -> Choice:
    """Token and confidence for each row of `logits` [n, V]; `offsets` are block offsets.

    Noise for block offset j comes from row j of a [block_length, V] draw, so it does not
    depend on which rows are computed. The work runs where `logits` are (the engine leaves
    them on its device); only the n tokens and confidences come back to the host.
    """
    device = logits.device
    logits = logits.double().clone()
    logits[:, mask_token_id] = float("-inf")  # the mask token is never a prediction
    if temperature > 0:
        generator = step_generator(_require_seed(seed), step)
        uniform = torch.rand(
            (plan.block_length, logits.shape[1]), generator=generator, dtype=torch.float64
        )
        # Drawn on the host, as the reference decoder draws them, whatever the device.
        gumbel = -torch.log(-torch.log(uniform[offsets])).to(device)
        tokens = (logits / temperature + gumbel).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    # LLaDA scores the untempered distribution; Dream scores the tempered one it samples from.
    scale = temperature if (temperature > 0 and plan.schedule == "dream") else 1.0
    probs = (logits / scale).softmax(-1)
    confidence = _confidence(probs, tokens, offsets, plan, seed, step)
    return Choice(tokens.cpu(), confidence.cpu())


def _confidence(probs, tokens, offsets, plan: DecodePlan, seed, step) -> torch.Tensor:
    kind = plan.confidence
    if kind in ("low_confidence", "maskgit_plus"):
        return probs.gather(-1, tokens[:, None]).squeeze(-1)
    if kind in ("margin", "topk_margin"):
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    if kind == "entropy":
        return (probs * torch.log(probs + 1e-10)).sum(-1)
    generator = step_generator(0 if seed is None else seed, step, stream=1)
    return torch.rand(plan.block_length, generator=generator, dtype=torch.float64)[offsets.cpu()]


def _require_seed(seed: int | None) -> int:
    if seed is None:
        raise ValueError("the reference decoder needs a seed when temperature > 0")
    return seed


def select(confidence: torch.Tensor, count: int | None, threshold: float | None) -> torch.Tensor:
    """Indices (into the candidate rows) to unmask this step.

    Ties go to the lower index. With a threshold: the best row, plus every row whose
    confidence is >= threshold.
    """
    order = top_indices(confidence, confidence.numel())
    if threshold is not None:
        keep = confidence >= threshold
        keep[order[0]] = True
        return torch.nonzero(keep).flatten()
    return order[:count]


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest scores, best first; ties go to the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices[:count]


@dataclass
class FocusStep:
    """The positions of one Focus step of one request (docs/design.md §3, "Focus attention")."""

    focus: torch.Tensor  # F: masked positions predicted to unmask, ascending
    candidates: torch.Tensor  # masked positions of the current block inside A, ascending
    query: torch.Tensor  # positions the forward computes: A, plus the shift's p - 1, ascending


def focus_step(
    indicator: torch.Tensor,
    masked: torch.Tensor,
    start: int,
    count: int | None,
    threshold: float | None,
    window: int,
    total: int,
    shift: int,
    tail_from: int | None = None,
) -> FocusStep:
    """F from the past-confidence indicator, then A = windows around F, clipped to [0, total).

    indicator: [block_length] float64, per block offset the confidence from the last step that
    computed it; masked: the current block's masked positions; count: tokens this step unmasks
    (None with a threshold). F holds max(count, 1) positions (or those >= threshold, at least
    one), so a step that unmasks nothing still computes something. Decoding then picks among
    the candidates with fresh logits; a candidate p's logits come from p - shift, which joins
    the query. `tail_from`: also compute every position from there on (`prefix` cache mode).
    """
    wanted = None if count is None else max(count, 1)
    focus = masked[select(indicator[masked - start], wanted, threshold)].sort().values
    offsets = torch.arange(-window, window + 1)
    active = (focus[:, None] + offsets[None, :]).flatten()
    active = torch.unique(active[(active >= 0) & (active < total)])
    candidates = masked[torch.isin(masked, active)]
    parts = [active, candidates - shift]
    if tail_from is not None:
        parts.append(torch.arange(tail_from, total))
    return FocusStep(focus, candidates, torch.unique(torch.cat(parts)))
