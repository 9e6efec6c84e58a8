"""`LLM.generate` through vLLM's engine equals the reference decoder, token for token.

One engine per model family (float32, tiny checkpoints), in vLLM's default mode: the model is
compiled (torch.compile + inductor on CPU), as `LLM(model=...)` and `vllm serve` run it. Its KV
cache holds 1.5 sequences of `max_model_len` in blocks of 32 tokens, so batches also exercise
admission waiting for freed blocks; its token budget is the smallest allowed
(`max_num_batched_tokens` = `max_model_len`), so refreshes of several requests that reach a
block start together do not fit in one forward and are staggered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_focus.reference.decode import served_outputs
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings

MAX_MODEL_LEN = 512
BLOCK_SIZE = 32  # KV-cache block (vLLM's CPU default is 128): finer admission by KV space
PROMPT_LENGTHS = [1, 7, 50, 130, 300]
MAX_TOKENS = [10, 64, 33, 64, 20]


def _bytes_per_token(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    layers = config.get("num_hidden_layers") or config["n_layers"]
    heads = config.get("num_attention_heads") or config["n_heads"]
    kv_heads = config.get("num_key_value_heads") or config["n_kv_heads"]
    hidden = config.get("hidden_size") or config["d_model"]
    return 2 * layers * kv_heads * (hidden // heads) * 4


def _engine(model_dir: str, **kwargs):
    from vllm import LLM

    kv_tokens = 3 * MAX_MODEL_LEN // 2
    return LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=MAX_MODEL_LEN,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=kv_tokens * _bytes_per_token(model_dir),
        seed=0,
        **kwargs,
    )


@pytest.fixture(scope="module", params=["dream-gqa3", "llada"])
def engine(request, tiny_dirs):
    model_dir = tiny_dirs[request.param]
    llm = _engine(model_dir)
    yield llm, ReferenceModel(model_dir)
    llm.llm_engine.engine_core.shutdown()


def _prompts(reference: ReferenceModel) -> list[list[int]]:
    vocab = reference.config.vocab_size - 8  # keep clear of the special tokens
    return [[(7 * i + 3 * n) % vocab for i in range(n)] for n in PROMPT_LENGTHS]


def _expected(reference, prompts, settings, temperature, seed, max_tokens):
    return served_outputs(
        reference, prompts, DiffusionSettings(**settings), max_tokens, temperature, seed
    )


def _generate(llm, prompts, settings, temperature, seed, max_tokens):
    from vllm import SamplingParams

    params = [
        SamplingParams(temperature=temperature, seed=seed, max_tokens=m, extra_args=settings)
        for m in max_tokens
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


MODES = [
    {"cache": "none"},
    {"cache": "prefix", "refresh": "block"},
    {"cache": "prefix", "refresh": "prefill"},
    {"cache": "dual", "refresh": "block"},
    {"cache": "dual", "refresh": "prefill"},
]


@pytest.mark.parametrize("mode", MODES, ids=lambda m: "-".join(m.values()))
@pytest.mark.parametrize("temperature, seed", [(0.0, None), (0.7, 1234)], ids=["greedy", "seeded"])
def test_generate_matches_reference(engine, mode, temperature, seed):
    llm, reference = engine
    prompts = _prompts(reference)
    settings = {"gen_length": 64, "block_length": 16, **mode}
    got = _generate(llm, prompts, settings, temperature, seed, MAX_TOKENS)
    assert got == _expected(reference, prompts, settings, temperature, seed, MAX_TOKENS)


@pytest.mark.parametrize(
    "extra",
    [
        {"threshold": 0.3},
        {"schedule": "dream"},
        {"schedule": "llada", "confidence": "margin"},
        {"confidence": "random", "steps": 32},
    ],
    ids=["threshold", "dream-schedule", "llada-margin", "random-half-steps"],
)
def test_schedules_and_confidences_match_reference(engine, extra):
    llm, reference = engine
    prompts = _prompts(reference)[:3]
    settings = {"gen_length": 64, "block_length": 16, "cache": "dual", **extra}
    max_tokens = [64, 64, 30]
    got = _generate(llm, prompts, settings, 0.0, 5, max_tokens)
    assert got == _expected(reference, prompts, settings, 0.0, 5, max_tokens)


def _step(core, outputs: dict[str, list[int]], num_outputs: int) -> None:
    """Wait for up to `num_outputs` output events (a block commit or a finish each)."""
    for _ in range(num_outputs):
        if not core.has_unfinished_requests():
            return
        for output in core.step():
            if output.finished:
                outputs[output.request_id] = list(output.outputs[0].token_ids)


def _run(core, outputs: dict[str, list[int]], limit: int = 1000) -> dict[str, list[int]]:
    _step(core, outputs, limit)
    assert not core.has_unfinished_requests(), f"requests still running after {limit} outputs"
    return outputs


def test_requests_joining_and_leaving_mid_flight(engine):
    """Staggered arrivals: each output still equals its solo reference decode."""
    from vllm import SamplingParams

    llm, reference = engine
    prompts = _prompts(reference)
    settings = {"gen_length": 64, "block_length": 16, "cache": "dual"}
    params = [
        SamplingParams(temperature=0.0, max_tokens=m, extra_args=settings) for m in MAX_TOKENS
    ]
    core = llm.llm_engine
    outputs: dict[str, list[int]] = {}
    for index, (prompt, param) in enumerate(zip(prompts, params)):
        core.add_request(f"stagger-{index}", {"prompt_token_ids": prompt}, param)
        _step(core, outputs, index)  # later requests join while earlier ones decode
    _run(core, outputs)
    got = [outputs[f"stagger-{i}"] for i in range(len(prompts))]
    assert got == _expected(reference, prompts, settings, 0.0, None, MAX_TOKENS)


def test_abort_frees_kv_blocks(engine):
    """Two long requests cannot be resident together; the second runs once the first is
    aborted mid-generation (its blocks freed)."""
    from vllm import SamplingParams

    llm, reference = engine
    long_prompt = _prompts(reference)[-1] + _prompts(reference)[3]  # 430 tokens
    settings = {"gen_length": 64, "block_length": 16, "cache": "dual"}
    param = SamplingParams(temperature=0.0, max_tokens=64, extra_args=settings)
    core = llm.llm_engine
    core.add_request("long-a", {"prompt_token_ids": long_prompt}, param)
    outputs: dict[str, list[int]] = {}
    _step(core, outputs, 2)  # two of its four blocks committed
    assert not outputs
    core.add_request("long-b", {"prompt_token_ids": long_prompt}, param)
    core.abort_request(["long-a"])
    _run(core, outputs)
    assert "long-a" not in outputs
    assert outputs["long-b"] == _expected(reference, [long_prompt], settings, 0.0, None, [64])[0]


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"block_length": 0}, "block_length"),
        ({"threshold": 1.5}, "threshold"),
        ({"x": 1}, "x"),
        ({"method": "sparse_dllm"}, "method"),  # a FOCUS-backend method on a dense engine
        ({"method": "sparsed", "cache": "none"}, "method"),
    ],
)
def test_bad_request_settings_raise_before_the_engine(engine, extra, field):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm, reference = engine
    params = SamplingParams(temperature=0.0, max_tokens=16, extra_args=extra)
    with pytest.raises(VLLMValidationError) as info:
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    assert info.value.parameter == field
    # The engine still serves.
    settings = {"gen_length": 16, "block_length": 16}
    good = SamplingParams(temperature=0.0, max_tokens=16, extra_args=settings)
    got = llm.generate([{"prompt_token_ids": [5, 6, 7]}], good, use_tqdm=False)
    assert (
        list(got[0].outputs[0].token_ids)
        == _expected(reference, [[5, 6, 7]], settings, 0.0, None, [16])[0]
    )


def test_step_timings_account_for_every_step(engine):
    """The runner's per-step record (what benchmarks/throughput.py reads through
    `collective_rpc`): one record per denoising step, the refreshes at the block starts (or
    every step without a cache), the positions each step computed."""
    from vllm import SamplingParams

    llm, reference = engine
    prompt = _prompts(reference)[2]  # 50 tokens
    llm.collective_rpc("diffusion_stats", kwargs={"reset": True})
    for cache, refreshes in (("dual", 2), ("none", 16)):
        extra = {"cache": cache, "gen_length": 64, "block_length": 32, "steps": 16}
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, extra_args=extra)
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        (stats,) = llm.collective_rpc("diffusion_stats", kwargs={"reset": True})
        assert stats["steps"] == len(stats["records"]) == 16
        assert stats["refresh_steps"] == refreshes
        assert [r["refresh"] for r in stats["records"]][:9] == (
            [True] * 9 if cache == "none" else [True] + [False] * 7 + [True]
        )
        computed = [r["query_tokens"] for r in stats["records"]]
        if cache == "dual":  # the refresh computes prompt + canvas, a step the block
            assert computed == [114] + [32] * 7 + [114] + [32] * 7
        else:
            assert computed == [114] * 16
        assert all(0 < r["model_s"] <= r["runner_s"] for r in stats["records"])
        assert stats["refresh_model_s"] + stats["block_model_s"] <= stats["runner_s"]


def test_compiled_engine_equals_eager_engine(engine, tiny_dirs):
    """vLLM's default (compiled) mode and `enforce_eager=True` give the same tokens: every
    cache mode and refresh policy, greedy and seeded, on one batch."""
    llm, reference = engine
    prompts = _prompts(reference)
    cases = [(mode, 0.0, None) for mode in MODES] + [(MODES[3], 0.7, 77), (MODES[0], 0.7, 78)]
    runs = []
    for mode, temperature, seed in cases:
        settings = {"gen_length": 64, "block_length": 16, **mode}
        runs.append((settings, temperature, seed))
    compiled = [_generate(llm, prompts, *run, MAX_TOKENS) for run in runs]
    eager_llm = _engine(str(reference.model_dir), enforce_eager=True)
    try:
        eager = [_generate(eager_llm, prompts, *run, MAX_TOKENS) for run in runs]
    finally:
        eager_llm.llm_engine.engine_core.shutdown()
    assert compiled == eager


def test_simultaneous_refreshes_are_staggered_within_the_budget(engine):
    """Two refreshes that together exceed the token budget fall due in one engine step: the
    first runs, the other waits one step and then goes ahead of everything. Every forward stays
    within the budget and both outputs equal their solo reference decodes.

    Deterministic whatever the arrival timing: the second request decodes without a cache
    (every one of its steps is a refresh), so each block start of the first while the second
    runs is such a collision; two refreshes never fit one forward, so neither is admitted
    beside the other's refresh either."""
    from vllm import SamplingParams

    llm, reference = engine
    vocab = reference.config.vocab_size - 8
    prompts = [[(5 * i + n) % vocab for i in range(n)] for n in (200, 230)]
    kinds = [
        {"gen_length": 64, "block_length": 16, "cache": "dual"},
        {"gen_length": 64, "block_length": 16, "cache": "none"},
    ]
    params = [SamplingParams(temperature=0.0, max_tokens=64, extra_args=k) for k in kinds]
    first, second = (len(p) + 64 for p in prompts)  # each refresh
    assert first + second > MAX_MODEL_LEN  # the budget
    llm.collective_rpc("diffusion_stats", kwargs={"reset": True})
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    (stats,) = llm.collective_rpc("diffusion_stats", kwargs={"reset": True})
    computed = [r["query_tokens"] for r in stats["records"]]
    assert max(computed) <= MAX_MODEL_LEN
    # A collision: the second ran the step before (alone or beside a within-block step), the
    # first's refresh ran alone, and the held refresh ran next beside the first's block (16).
    assert any(
        computed[i - 1] in (second, second + 16)
        and computed[i] == first
        and computed[i + 1] == second + 16
        for i in range(1, len(computed) - 1)
    ), computed
    for prompt, kind, output in zip(prompts, kinds, outputs):
        (want,) = served_outputs(reference, [prompt], DiffusionSettings(**kind), [64])
        assert list(output.outputs[0].token_ids) == want
