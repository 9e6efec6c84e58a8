"""The reference decoder against the published generators, at temperature 0.

Each `published_*` function below re-states one published generator in its own structure
(full-row top-k over -inf-padded confidences, window-relative indexing, the block-start commit,
...), written here from reading it (docs/design.md §3 names them):

- LLaDA `generate.py::generate`                       -> published_llada
- Fast-dLLM `llada/generate.py::generate_with_prefix_cache / _dual_cache` (+ threshold)
                                                       -> published_fast_llada
- Dream `generation_utils.py::diffusion_generate` (alg entropy / maskgit_plus / topk_margin)
                                                       -> published_dream
- Fast-dLLM `dream/model/generation_utils_block.py` (dual_cache on/off, threshold)
                                                       -> published_fast_dream

The model side is the same plain forward for both (`ReferenceModel`); what is compared is the
decoding logic. Both sides see the mask token's logit at -inf (the reference's one deliberate
change: trained models never predict it, random tiny ones can).
"""

from __future__ import annotations

import pytest
import torch

from vllm_focus.reference.decode import generate
from vllm_focus.reference.model import KVCache, ReferenceModel
from vllm_focus.settings import DiffusionSettings

EPS = 1e-3


class Adapter:
    """Full and windowed forwards of one sequence, in the published generators' terms."""

    def __init__(self, model: ReferenceModel) -> None:
        self.model, self.mask = model, model.mask_token_id

    def _clean(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[:, self.mask] = float("-inf")
        return logits

    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        logits, kv = self.model.forward(x)
        return self._clean(logits), kv

    def window(self, x: torch.Tensor, start: int, end: int, kv: KVCache) -> torch.Tensor:
        """Logits of x[start:end] attending to fresh window K/V and cached K/V elsewhere."""
        logits, _ = self.model.forward(x, torch.arange(start, end), kv)
        return self._clean(logits)


def _canvas(prompt, gen_length, mask):
    return torch.tensor(list(prompt) + [mask] * gen_length)


def _even_split(num, steps):
    base, rem = divmod(num, steps)
    return [base + (i < rem) for i in range(steps)]


def published_llada(adapter, prompt, steps, gen_length, block_length):
    x, p = _canvas(prompt, gen_length, adapter.mask), len(prompt)
    blocks = gen_length // block_length
    for b in range(blocks):
        end = p + (b + 1) * block_length
        counts = _even_split(
            int((x[end - block_length : end] == adapter.mask).sum()), steps // blocks
        )
        for k in counts:
            mask_index = x == adapter.mask
            logits, _ = adapter.full(x)
            x0 = logits.argmax(-1)
            x0_p = logits.double().softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
            x0_p[end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(
                mask_index, x0_p, torch.tensor(float("-inf"), dtype=x0_p.dtype)
            )
            index = torch.topk(confidence, k).indices
            x[index] = x0[index]
    return x[p:].tolist()


def _transfer(logits, mask_index, x, k, threshold):
    """Fast-dLLM's get_transfer_index at temperature 0, low_confidence."""
    x0 = logits.argmax(-1)
    x0_p = logits.double().softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
    x0 = torch.where(mask_index, x0, x)
    confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf"), dtype=x0_p.dtype))
    if threshold is not None:
        k = int(mask_index.sum())
    values, index = torch.topk(confidence, k)
    transfer = torch.zeros_like(mask_index)
    transfer[index] = True
    if threshold is not None:
        for rank in range(1, k):
            if values[rank] < threshold:
                transfer[index[rank]] = False
    return x0, transfer


def published_fast_llada(adapter, prompt, steps, gen_length, block_length, dual, threshold=None):
    x, p = _canvas(prompt, gen_length, adapter.mask), len(prompt)
    blocks = gen_length // block_length
    for b in range(blocks):
        start, end = p + b * block_length, p + (b + 1) * block_length
        counts = _even_split(block_length, steps // blocks)
        logits, kv = adapter.full(x)
        mask_index = x == adapter.mask
        mask_index[end:] = False
        x0, transfer = _transfer(logits, mask_index, x, counts[0], threshold)
        x[transfer] = x0[transfer]
        i = 1
        while (x[start:end] == adapter.mask).any():
            stop = end if dual else x.numel()
            window = x[start:stop]
            mask_index = window == adapter.mask
            mask_index[block_length:] = False
            logits = adapter.window(x, start, stop, kv)
            k = counts[i] if threshold is None else None
            x0, transfer = _transfer(logits, mask_index, window, k, threshold)
            window[transfer] = x0[transfer]  # a view: writes into x
            i += 1
    return x[p:].tolist()


def _shift(logits):
    return torch.cat([logits[:1], logits[:-1]])


def _dream_scores(logits, alg):
    probs = logits.float().softmax(-1)
    confidence, x0 = probs.max(-1)
    if alg == "topk_margin":
        top = probs.sort(-1, descending=True).values
        confidence = top[:, 0] - top[:, 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    return confidence, x0


def _dream_count(num_masked, grid, i, steps):
    if i < steps - 1:
        return int(torch.tensor(num_masked, dtype=torch.float32) * (1 - grid[i + 1] / grid[i]))
    return num_masked


def published_dream(adapter, prompt, steps, gen_length, alg):
    x, p = _canvas(prompt, gen_length, adapter.mask), len(prompt)
    grid = torch.linspace(1, EPS, steps + 1)
    for i in range(steps):
        mask_index = x == adapter.mask
        logits = _shift(adapter.full(x)[0])
        confidence, x0 = _dream_scores(logits[mask_index], alg)
        n = _dream_count(int(mask_index.sum()), grid, i, steps)
        full_confidence = torch.full(x.shape, float("-inf"))
        full_confidence[mask_index] = confidence
        if n > 0:
            index = torch.topk(full_confidence, n).indices
            proposal = torch.full_like(x, adapter.mask)
            proposal[mask_index] = x0
            x[index] = proposal[index]
    return x[p:].tolist()


def published_fast_dream(adapter, prompt, steps, gen_length, block_length, dual, threshold=None):
    x, p = _canvas(prompt, gen_length, adapter.mask), len(prompt)
    steps_per_block = steps // (gen_length // block_length)
    grid = torch.linspace(1, EPS, steps_per_block + 1)
    for b in range(gen_length // block_length):
        start, end = p + b * block_length, p + (b + 1) * block_length
        logits, kv = adapter.full(x)
        x[start] = _shift(logits)[start].argmax()  # block start commits its first position
        i = 1
        while True:
            stop = end if dual else x.numel()
            window = x[start:stop]
            mask_index = window == adapter.mask
            logits = _shift(adapter.window(x, start, stop, kv))  # shifted inside the window
            if threshold is None:
                if i == steps_per_block:
                    break
                mask_index[block_length:] = False
                alg = "entropy"
            else:
                alg = "maskgit_plus"
            confidence, x0 = _dream_scores(logits[mask_index], alg)
            full_confidence = torch.full(window.shape, float("-inf"))
            full_confidence[mask_index] = confidence
            full_confidence[block_length:] = float("-inf")
            proposal = torch.full_like(window, adapter.mask)
            proposal[mask_index] = x0
            if threshold is None:
                n = _dream_count(int(mask_index.sum()), grid, i, steps_per_block)
                if n > 0:
                    index = torch.topk(full_confidence, n).indices
                    window[index] = proposal[index]
                i += 1
            else:
                k = int((x[start:end] == adapter.mask).sum())
                values, index = torch.topk(full_confidence, k)
                keep = [index[0]] + [index[r] for r in range(1, k) if values[r] >= threshold]
                window[torch.stack(keep)] = proposal[torch.stack(keep)]
            if not (x[start:end] == adapter.mask).any():
                break
    return x[p:].tolist()


PROMPTS = [[7], list(range(40, 3, -1)), [11, 12, 13] * 30]


@pytest.fixture(scope="module")
def llada(tiny_dirs):
    return ReferenceModel(tiny_dirs["llada"])


@pytest.fixture(scope="module")
def dream(tiny_dirs):
    return ReferenceModel(tiny_dirs["dream-gqa3"])


def _ours(model, family, max_tokens, **settings):
    plan = DiffusionSettings(**settings).plan(family, max_tokens)
    return generate(model, PROMPTS, plan)


@pytest.mark.parametrize("steps, block", [(64, 32), (32, 16), (64, 64)])
def test_llada_generate(llada, steps, block):
    adapter = Adapter(llada)
    want = [published_llada(adapter, p, steps, 64, block) for p in PROMPTS]
    got = _ours(llada, "llada", 64, gen_length=64, block_length=block, steps=steps, cache="none")
    assert got == want


@pytest.mark.parametrize("dual", [False, True], ids=["prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.9])
def test_fast_dllm_llada(llada, dual, threshold):
    adapter = Adapter(llada)
    want = [
        published_fast_llada(adapter, p, 64, 64, 16, dual=dual, threshold=threshold)
        for p in PROMPTS
    ]
    cache = "dual" if dual else "prefix"
    got = _ours(
        llada, "llada", 64, gen_length=64, block_length=16, cache=cache, threshold=threshold
    )
    assert got == want


@pytest.mark.parametrize("alg", ["entropy", "maskgit_plus", "topk_margin"])
@pytest.mark.parametrize("steps", [48, 24])
def test_dream_diffusion_generate(dream, alg, steps):
    adapter = Adapter(dream)
    want = [published_dream(adapter, p, steps, 48, alg) for p in PROMPTS]
    got = _ours(
        dream,
        "dream",
        48,
        gen_length=48,
        block_length=48,
        steps=steps,
        cache="none",
        confidence=alg,
    )
    assert got == want


@pytest.mark.parametrize("dual", [False, True], ids=["prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.9])
def test_fast_dllm_dream(dream, dual, threshold):
    adapter = Adapter(dream)
    want = [
        published_fast_dream(adapter, p, 64, 64, 16, dual=dual, threshold=threshold)
        for p in PROMPTS
    ]
    cache = "dual" if dual else "prefix"
    got = _ours(
        dream, "dream", 64, gen_length=64, block_length=16, cache=cache, threshold=threshold
    )
    assert got == want
