"""The reference decoder: hand-checked schedules and steps, cache-mode identities, settings."""

from __future__ import annotations

import pytest
import torch

from vllm_focus.policy import (
    dream_step_count,
    focus_step,
    llada_step_counts,
    select,
    step_span,
    step_token_bound,
)
from vllm_focus.reference.decode import RequestDecoder, finish, generate
from vllm_focus.reference.model import KVCache, ReferenceModel
from vllm_focus.settings import DiffusionSettings, SettingsError

MASK = 15


class ScriptedModel:
    """Logits chosen by hand: every row proposes the number of masks left in the canvas, with a
    fixed per-position peak height (the confidence order). The value a position ends up with
    therefore records the step at which it was unmasked."""

    mask_token_id = MASK

    def __init__(self, heights: dict[int, float], shift: int = 0) -> None:
        self.heights, self.logits_shift = heights, shift

    def forward(self, ids, query, cache=None):
        remaining = int((ids == MASK).sum())
        logits = torch.zeros(query.numel(), 16)
        for row, position in enumerate(query.tolist()):
            logits[row, remaining] = self.heights.get(position + self.logits_shift, 0.0)
        return logits, KVCache([], [])

    def empty_cache(self, total: int) -> KVCache:
        return KVCache([], [])


def _plan(family="llada", max_tokens=4, **settings):
    return DiffusionSettings(**settings).plan(family, max_tokens)


def test_llada_even_split_gives_the_remainder_to_the_earliest_steps():
    assert llada_step_counts(32, 10) == [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]
    assert llada_step_counts(8, 10) == [1] * 8 + [0, 0]
    assert llada_step_counts(32, 32) == [1] * 32


def _dream_counts(num_masked: int, steps: int) -> list[int]:
    counts = []
    for step in range(steps):
        count = dream_step_count(num_masked, step, steps)
        counts.append(count)
        num_masked -= count
    return counts


def test_dream_time_grid_counts():
    # By hand: t_i = 1 - i(1 - 1e-3)/8; step i reveals int(n_i (1 - t_{i+1}/t_i)), the last all.
    assert _dream_counts(8, 8) == [0, 1, 1, 1, 1, 1, 1, 2]
    assert _dream_counts(32, 8) == [3, 4, 4, 4, 4, 4, 4, 5]
    assert _dream_counts(5, 1) == [5]


@pytest.mark.parametrize("shift", [0, 1], ids=["llada", "dream-shift"])
def test_none_mode_steps_by_hand(shift):
    # Prompt of 2, G = 4 in blocks of 2, 4 steps: one unmask per step, in confidence order
    # inside the current block only (position 5 is surest but waits for its block).
    model = ScriptedModel({2: 1.0, 3: 3.0, 4: 2.0, 5: 5.0}, shift=shift)
    plan = _plan(max_tokens=4, gen_length=4, block_length=2, steps=4, cache="none")
    assert RequestDecoder(model, [1, 2], plan).run() == [3, 4, 1, 2]


def test_dream_schedule_with_cache_commits_the_first_position_at_block_start():
    model = ScriptedModel({2: 1.0, 3: 3.0, 4: 2.0, 5: 5.0}, shift=1)
    plan = _plan("dream", gen_length=4, block_length=2, steps=4, cache="dual")
    # Block start commits position 2 (4 masks left), then the last step reveals position 3.
    assert RequestDecoder(model, [1, 2], plan).run() == [4, 3, 2, 1]


def test_threshold_unmasks_every_confident_position_and_at_least_one():
    confidence = torch.tensor([0.2, 0.95, 0.5, 0.91])
    assert select(confidence, None, 0.9).tolist() == [1, 3]
    assert select(confidence, None, 0.99).tolist() == [1]
    assert select(torch.tensor([0.3, 0.3]), 1, None).tolist() == [0]  # ties: lower index


def test_threshold_decoding_by_hand():
    # Peak 12 on 16 tokens gives p ~ 0.9999; peak 1 gives e/(e + 14) ~ 0.16 (mask excluded).
    model = ScriptedModel({2: 12.0, 3: 1.0, 4: 12.0, 5: 12.0})
    plan = _plan(max_tokens=4, gen_length=4, block_length=4, threshold=0.9, cache="none")
    # Step 1 (4 masks left) takes 2, 4, 5; step 2 (1 left) takes 3.
    assert RequestDecoder(model, [1, 2], plan).run() == [4, 1, 4, 4]


@pytest.fixture(scope="module")
def references(tiny_dirs):
    return {arch: ReferenceModel(tiny_dirs[arch]) for arch in ("dream", "llada")}


PROMPTS = [[5], list(range(3, 40)), list(range(100, 10, -1)) * 2]


@pytest.mark.parametrize("arch", ["dream", "llada"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_modes_with_one_step_per_block_equal_none(references, arch, cache):
    """With one step per block every step is a block-start refresh: no approximation left."""
    model = references[arch]
    settings = dict(gen_length=64, block_length=8, steps=8, schedule="llada")
    want = generate(model, PROMPTS, _plan(arch, 64, cache="none", **settings))
    got = generate(model, PROMPTS, _plan(arch, 64, cache=cache, **settings))
    assert got == want


@pytest.mark.parametrize("arch", ["dream", "llada"])
def test_dual_cache_is_an_approximation_that_changes_tokens(references, arch):
    """Guard against a cache mode that silently recomputes everything."""
    model = references[arch]
    settings = dict(gen_length=64, block_length=32, schedule="llada")
    want = generate(model, PROMPTS, _plan(arch, 64, cache="none", **settings))
    got = generate(model, PROMPTS, _plan(arch, 64, cache="dual", **settings))
    assert got != want


def test_sampling_is_a_function_of_the_seed(references):
    model, plan = references["llada"], _plan("llada", 32, gen_length=32, cache="dual")
    first = generate(model, PROMPTS, plan, temperature=1.0, seeds=7)
    assert generate(model, PROMPTS, plan, temperature=1.0, seeds=7) == first
    assert generate(model, PROMPTS, plan, temperature=1.0, seeds=8) != first
    greedy = generate(model, PROMPTS, plan)
    assert greedy != first


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(block_length=0), "`block_length` must be an integer in [1, 4096], got 0"),
        (dict(steps=7), "`steps` (7) must be a multiple of the number of blocks (8"),
        (dict(confidence="top"), "`confidence` must be one of"),
        (dict(threshold=1.5), "`threshold` must be a number in (0, 1]"),
        (dict(threshold=0.0), "`threshold` must be a number in (0, 1]"),
        (dict(threshold=0.9, confidence="entropy"), "`confidence` must be one of"),
        (dict(cache="full"), "`cache` must be one of ['none', 'prefix', 'dual']"),
        (dict(refresh="never"), "`refresh` must be one of ['block', 'prefill']"),
        (dict(schedule="cosine"), "`schedule` must be one of ['llada', 'dream']"),
        (dict(window=-1), "`window` must be an integer in [0, 4096], got -1"),
        (dict(dense_layers=0), "`dense_layers` must be an integer >= 1, got 0"),
        (dict(num_sinks=1.5), "`num_sinks` must be an integer >= 0, got 1.5"),
        (dict(prompt_block_size=0), "`prompt_block_size` must be an integer in [1, 4096]"),
        (dict(keep_ratio=0), "`keep_ratio` must be a number in (0, 1], got 0"),
        (dict(keep_ratio=True), "`keep_ratio` must be a number in (0, 1], got True"),
        (dict(min_keep_tokens=-5), "`min_keep_tokens` must be an integer >= 0, got -5"),
        (dict(min_prompt_len="long"), "`min_prompt_len` must be an integer >= 0, got 'long'"),
        (
            dict(method="quest"),
            "`method` must be one of ['focus', 'sparse_dllm', 'sparsed'], got 'quest'",
        ),
        (dict(method="sparsed"), "`cache` must be 'none' with it, got 'dual'"),
        (dict(sparsed_skip=-0.1), "`sparsed_skip` (the share of all steps SparseD runs dense"),
        (dict(sparsed_select=1.0), "`sparsed_select` (the share of key blocks SparseD keeps"),
        (dict(sparsed_select=True), "`sparsed_select` (the share of key blocks SparseD keeps"),
        (dict(sparsed_block_size=0), "`sparsed_block_size` must be an integer in [1, 4096]"),
        (
            dict(method="sparse_dllm", cache="prefix"),
            "`cache` must be 'dual' with it, got 'prefix'",
        ),
        (dict(method="sparse_dllm", refresh="prefill"), "`refresh` must be 'block' with it"),
        (dict(sparse_dllm_kernel=2), "`sparse_dllm_kernel` (the width of Sparse-dLLM's max-pool"),
        (dict(sparse_dllm_kernel=0), "`sparse_dllm_kernel` must be an integer in [1, 4095]"),
        (dict(sparse_dllm_keep_ratio=0), "`sparse_dllm_keep_ratio` must be a number in (0, 1]"),
        # plan() without the FOCUS backend
        (dict(method="sparse_dllm"), "`method` 'sparse_dllm' runs in the FOCUS attention backend"),
        (
            dict(method="sparsed", cache="none"),
            "`method` 'sparsed' runs in the FOCUS attention backend",
        ),
    ],
)
def test_settings_errors_name_the_field(settings, message):
    with pytest.raises(SettingsError) as info:
        DiffusionSettings(**settings).plan("llada", 256)
    assert message in str(info.value)


def test_unknown_setting_is_rejected():
    with pytest.raises(SettingsError, match=r"unknown diffusion setting\(s\) \['blocklength'\]"):
        DiffusionSettings().updated({"blocklength": 16})


def test_plan_caps_and_rounds_the_canvas():
    plan = DiffusionSettings(gen_length=100).plan("dream", 10)
    assert (plan.gen_length, plan.num_blocks, plan.steps_per_block) == (32, 1, 32)
    assert (plan.schedule, plan.confidence) == ("dream", "entropy")
    plan = DiffusionSettings(gen_length=100).plan("llada", 1000)
    assert (plan.gen_length, plan.num_blocks, plan.confidence) == (128, 4, "low_confidence")
    assert DiffusionSettings(threshold=0.9).plan("dream", 64).confidence == "maskgit_plus"


def test_finish_cuts_at_the_first_eos():
    assert finish([4, 5, 2, 6, 2], {2}, 10) == ([4, 5, 2], "stop")
    assert finish([4, 5, 6, 7], {2}, 3) == ([4, 5, 6], "length")


def test_kept_blocks_follow_keep_ratio_and_min_keep_tokens():
    focus = DiffusionSettings(prompt_block_size=64, keep_ratio=0.1, min_keep_tokens=256)
    plan = focus.focus_plan()
    assert plan.kept_blocks(32768) == 52  # ceil(3276.8) tokens -> 52 blocks of 64
    assert plan.kept_blocks(2000) == 4  # min_keep_tokens wins: 256 tokens
    assert plan.kept_blocks(100) == 2  # never more than the prompt has
    assert DiffusionSettings(keep_ratio=1.0).focus_plan().kept_blocks(1000) == 16
    assert not plan.applies(1023, "dual") and plan.applies(1024, "prefix")
    assert not plan.applies(5000, "none")


def test_focus_step_by_hand():
    """Block [10, 18): F from the indicator, windows of 1 clipped to the canvas, Dream's p-1."""
    indicator = torch.tensor([0.0, 0.9, 0.1, 0.8, 0.2, 0.3, 0.7, 0.4], dtype=torch.float64)
    masked = torch.tensor([10, 11, 12, 13, 15, 16, 17])  # 14 already decoded
    step = focus_step(indicator, masked, 10, 2, None, 1, 18, shift=0)
    assert step.focus.tolist() == [11, 13]
    assert step.query.tolist() == [10, 11, 12, 13, 14]
    assert step.candidates.tolist() == [10, 11, 12, 13]
    # Dream: candidates need p - 1 (9 lies before the block); the window clips at 18.
    step = focus_step(indicator, masked, 10, 1, None, 1, 18, shift=1)
    assert step.focus.tolist() == [11]
    assert step.query.tolist() == [9, 10, 11, 12]
    step = focus_step(indicator, masked, 10, None, 0.65, 0, 18, shift=0, tail_from=18)
    assert step.focus.tolist() == [11, 13, 16] and step.query.tolist() == [11, 13, 16]
    # A step that unmasks nothing still computes its best position.
    step = focus_step(indicator, masked, 10, 0, None, 1, 18, shift=0)
    assert step.focus.tolist() == [11]
    step = focus_step(indicator, masked, 10, 1, None, 2, 18, shift=0, tail_from=17)
    assert step.query.tolist() == [9, 10, 11, 12, 13, 17]


def test_step_spans_by_hand():
    """Prompt 10, canvas 3 blocks of 4 (positions 10..21)."""
    for cache, refresh, block, block_start, want in [
        ("none", "block", 1, False, (0, 22)),
        ("dual", "block", 1, True, (0, 22)),
        ("dual", "prefill", 0, True, (0, 22)),
        ("dual", "prefill", 2, True, (14, 22)),  # the finished block onwards
        ("dual", "block", 1, False, (14, 18)),
        ("prefix", "prefill", 1, False, (14, 22)),
    ]:
        plan = _plan(max_tokens=12, block_length=4, cache=cache, refresh=refresh)
        span = step_span(plan, 10, block, block_start)
        assert (span.start, span.stop) == want, (cache, refresh, block, block_start)


@pytest.mark.parametrize("cache", ["dual", "prefix"])
@pytest.mark.parametrize("shift", [0, 1])
def test_focus_queries_stay_within_the_charged_bound(cache, shift):
    """What the scheduler charges a Focus step bounds the query `focus_step` builds, for any
    indicator, window and block (the first and last blocks clip the window), and is reached
    when every position is in F and nothing clips."""
    generator = torch.Generator().manual_seed(3)
    prompt_len = 9
    for window in (0, 1, 3):
        plan = DiffusionSettings(block_length=8, cache=cache, window=window, min_prompt_len=0).plan(
            "dream" if shift else "llada", 24, focus=True
        )
        total = prompt_len + plan.gen_length
        for block in range(plan.num_blocks):
            start = prompt_len + block * plan.block_length
            bound = step_token_bound(plan, prompt_len, block, False, True, shift)
            for count in (1, 3, 8):
                indicator = torch.rand(8, generator=generator, dtype=torch.float64)
                masked = torch.arange(start, start + 8)
                tail = start + 8 if cache == "prefix" else None
                step = focus_step(indicator, masked, start, count, None, window, total, shift, tail)
                assert step.query.numel() <= bound
                if count == 8 and window >= shift and block == 1 and cache == "dual":
                    assert step.query.numel() == bound


def test_sparse_focus_changes_tokens_and_unpruned_whole_block_focus_is_dual(references):
    model = references["dream"]
    base = dict(gen_length=32, block_length=16, min_prompt_len=0, dense_layers=1)
    sparse = dict(base, prompt_block_size=4, min_keep_tokens=4, num_sinks=1)
    whole = dict(base, window=16, keep_ratio=1.0, num_sinks=1000)
    dual = generate(model, PROMPTS, _plan("dream", 32, **base))
    assert generate(model, PROMPTS, DiffusionSettings(**whole).plan("dream", 32, True)) == dual
    assert generate(model, PROMPTS, DiffusionSettings(**sparse).plan("dream", 32, True)) != dual
