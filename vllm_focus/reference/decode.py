"""The reference decoder: DESIGN §3 semantics written the plain way, one request at a time.

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

from dataclasses import dataclass

import torch

from vllm_focus.reference.model import KVCache, ReferenceModel
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
    depend on which rows are computed.
    """
    logits = logits.double().clone()
    logits[:, mask_token_id] = float("-inf")  # the mask token is never a prediction
    if temperature > 0:
        generator = step_generator(_require_seed(seed), step)
        uniform = torch.rand(
            (plan.block_length, logits.shape[1]), generator=generator, dtype=torch.float64
        )
        gumbel = -torch.log(-torch.log(uniform[offsets]))
        tokens = (logits / temperature + gumbel).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    # LLaDA scores the untempered distribution; Dream scores the tempered one it samples from.
    scale = temperature if (temperature > 0 and plan.schedule == "dream") else 1.0
    probs = (logits / scale).softmax(-1)
    return Choice(tokens, _confidence(probs, tokens, offsets, plan, seed, step))


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
    return torch.rand(plan.block_length, generator=generator, dtype=torch.float64)[offsets]


def _require_seed(seed: int | None) -> int:
    if seed is None:
        raise ValueError("the reference decoder needs a seed when temperature > 0")
    return seed


def select(confidence: torch.Tensor, count: int | None, threshold: float | None) -> torch.Tensor:
    """Indices (into the candidate rows) to unmask this step.

    Ties go to the lower index. With a threshold: the best row, plus every row whose
    confidence is >= threshold.
    """
    order = torch.sort(confidence, descending=True, stable=True).indices
    if threshold is not None:
        keep = confidence >= threshold
        keep[order[0]] = True
        return torch.nonzero(keep).flatten()
    return order[: min(count, confidence.numel())]


class RequestDecoder:
    """Decodes one request: holds its canvas, step counter and (for caches) its K/V store."""

    def __init__(self, model: ReferenceModel, prompt: list[int], plan: DecodePlan,
                 temperature: float = 0.0, seed: int | None = None) -> None:  # fmt: skip
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
        counts = llada_step_counts(plan.block_length, plan.steps_per_block)
        i = 0
        while self._masked(start, end).numel() and (plan.threshold or i < plan.steps_per_block):
            logits_of = self._forward(block, refresh=(i == 0))
            if i == 0 and plan.cache != "none" and plan.schedule == "dream":
                # Fast-dLLM's Dream decoder commits the block's first position at block start.
                self._commit_first(start, logits_of)
                self.step += 1
                i += 1
                continue
            masked = self._masked(start, end)
            choice = propose(logits_of(masked), masked - start, plan, self.mask,
                             self.temperature, self.seed, self.step)  # fmt: skip
            count = None
            if plan.threshold is None:
                if plan.schedule == "llada":
                    count = counts[i]
                else:
                    count = dream_step_count(masked.numel(), i, plan.steps_per_block)
            chosen = select(choice.confidence, count, plan.threshold)
            self.x[masked[chosen]] = choice.tokens[chosen]
            self.step += 1
            i += 1

    def _commit_first(self, start: int, logits_of) -> None:
        first = torch.tensor([start])
        choice = propose(logits_of(first), first - start, self.plan, self.mask,
                         self.temperature, self.seed, self.step)  # fmt: skip
        self.x[start] = choice.tokens[0]
        if self.plan.steps_per_block == 1 and not self.plan.threshold:
            rest = self._masked(start, start + self.plan.block_length)
            if rest.numel():
                choice = propose(logits_of(rest), rest - start, self.plan, self.mask,
                                 self.temperature, self.seed, self.step)  # fmt: skip
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
            query = torch.arange(start, end if plan.cache == "dual" else total)
            cache = self.cache
        logits, fresh = self.model.forward(self.x, query, cache)
        if plan.cache != "none":
            if self.cache is None:
                self.cache = self.model.empty_cache(total)
            written = query if refresh else query[(query >= start) & (query < end)]
            self.cache.write(written, _rows(fresh, query, written))
        row_of = {int(p): r for r, p in enumerate(query)}
        shift = self.model.logits_shift
        if refresh and shift:
            self.first_row = logits[row_of[start - 1]]

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
