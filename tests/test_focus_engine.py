"""`LLM(..., attention_backend="focus")` equals the reference decoder's Focus, Sparse-dLLM and
SparseD, token for token.

One engine per model family (float32, tiny checkpoints with 4 layers, so the default 2 dense
layers leave 2 sparse ones), running the FOCUS backend. Batches mix
prompts above and below `min_prompt_len` (Focus and dense requests in one forward), and Focus
Sparse-dLLM and SparseD requests. The sparse
settings keep a few prompt blocks of a few hundred tokens, so the pruning changes the output:
each case first checks that the reference tells pruned and unpruned Focus apart.
"""

from __future__ import annotations

import os

import pytest
import torch

from vllm_focus.reference.decode import served_outputs
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings

PROMPT_LENGTHS = [300, 97, 450, 20]
MAX_TOKENS = [64, 48, 64, 64]
SPARSE = {
    "gen_length": 64,
    "block_length": 16,
    "min_prompt_len": 64,
    "prompt_block_size": 16,
    "min_keep_tokens": 32,
    "keep_ratio": 0.05,
    "num_sinks": 4,
}
UNPRUNED = {"keep_ratio": 1.0, "num_sinks": 100_000}
# Sparse-dLLM keeping a tenth of the keys outside the block (its default is half).
SPARSE_DLLM = {"gen_length": 64, "block_length": 16, "method": "sparse_dllm"}
SPARSE_DLLM_PRUNED = {**SPARSE_DLLM, "sparse_dllm_keep_ratio": 0.1}
# SparseD (no cache): 64 steps, the pattern fixed at step int(64 x 0.2) + 1 = 13; 32-token
# blocks of which a fifth (+1) are kept; and SparseD at its published recipe.
SPARSED = {"gen_length": 64, "block_length": 16, "method": "sparsed", "cache": "none"}
SPARSED_PRUNED = {**SPARSED, "sparsed_select": 0.2, "sparsed_block_size": 32}


@pytest.fixture(scope="module", params=["dream", "llada"])
def engine(request, tmp_path_factory):
    from vllm import LLM

    from vllm_focus.testing.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp(f"focus-{request.param}")
    model_dir = str(write_tiny_checkpoint(root, request.param, num_layers=4))
    # The mutation tests hand the worker a function (`collective_rpc` with a callable), which
    # vLLM only carries with its insecure serialisation switched on; nothing else here uses it.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=1024,
        kv_cache_memory_bytes=16 << 20,
        attention_backend="focus",
        seed=0,
    )
    yield llm, ReferenceModel(model_dir)
    llm.llm_engine.engine_core.shutdown()


def _prompts(reference: ReferenceModel) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    vocab = reference.config.vocab_size - 8  # keep clear of the special tokens
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def _generate(llm, prompts, settings, temperature=0.0, seed=None):
    """`settings`: one dict for every prompt, or a list of one per prompt."""
    from vllm import SamplingParams

    per_prompt = settings if isinstance(settings, list) else [settings] * len(prompts)
    params = [
        SamplingParams(temperature=temperature, seed=seed, max_tokens=m, extra_args=each)
        for m, each in zip(MAX_TOKENS, per_prompt)
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _reference(reference, prompts, settings, temperature=0.0, seed=None, focus=True):
    return served_outputs(
        reference,
        prompts,
        DiffusionSettings(**settings),
        MAX_TOKENS,
        temperature,
        seed,
        focus=focus,
    )


CASES = {
    "dual": {},
    "dual-window0": {"window": 0, "dense_layers": 1},
    "prefix-prefill-threshold": {"cache": "prefix", "refresh": "prefill", "threshold": 0.2},
    "llada-schedule-fewer-steps": {"schedule": "llada", "steps": 48, "dense_layers": 3},
}


@pytest.mark.parametrize("case", list(CASES))
def test_focus_matches_reference(engine, case):
    llm, reference = engine
    prompts = _prompts(reference)
    settings = {**SPARSE, **CASES[case]}
    want = _reference(reference, prompts, settings)
    # The case is discriminating: pruning the prompt changes the reference's output.
    assert want != _reference(reference, prompts, {**settings, **UNPRUNED})
    assert _generate(llm, prompts, settings) == want


def test_focus_sampling_matches_reference(engine):
    llm, reference = engine
    prompts = _prompts(reference)
    want = _reference(reference, prompts, SPARSE, temperature=0.8, seed=5)
    assert _generate(llm, prompts, SPARSE, temperature=0.8, seed=5) == want


def test_unpruned_focus_over_the_whole_block_is_dense_dual(engine):
    """keep_ratio 1, sinks covering the prompt and a window spanning the block: Focus
    computes the whole block over every key, which is dense `dual` exactly."""
    llm, reference = engine
    prompts = _prompts(reference)
    settings = {**SPARSE, **UNPRUNED, "window": SPARSE["block_length"]}
    dense = {"gen_length": 64, "block_length": 16, "cache": "dual"}
    assert _generate(llm, prompts, settings) == _reference(reference, prompts, dense, focus=False)


def _worst_first(scores):
    """A broken ranking: the lowest scores first instead of the highest."""
    import torch

    return torch.sort(scores, dim=1, descending=False, stable=True).indices


def _mutate(worker, name: str, restore: bool) -> None:
    """In the worker process: swap one piece of the engine's Focus selection for a broken one
    (or put the original back)."""
    from vllm_focus.attention import selection
    from vllm_focus.engine import decoder

    if name == "kept blocks and sinks":
        module, attribute, broken = selection, "rank", _worst_first
    elif name == "sparse_dllm kept keys":
        from vllm_focus.attention import sparse_dllm

        def broken(scores, k):  # the lowest-scoring keys instead of the highest
            return original(-scores, k)

        module, attribute = sparse_dllm, "top_ranked"
    elif name == "sparsed pattern":
        from vllm_focus.attention import sparsed

        def broken(scores, k):  # the least important key blocks instead of the most
            return original(-scores, k)

        module, attribute = sparsed, "top_ranked"
    else:  # the focus set F: the least confident masked positions

        def broken(indicator, *args, **kwargs):
            return original(-indicator, *args, **kwargs)

        module, attribute = decoder, "focus_step"
    saved = f"_unmutated_{attribute}"
    if restore:
        setattr(module, attribute, getattr(module, saved))
        return
    original = getattr(module, attribute)
    setattr(module, saved, original)
    setattr(module, attribute, broken)


@pytest.mark.parametrize("mutation", ["kept blocks and sinks", "focus set"])
def test_a_broken_selection_is_caught(engine, mutation):
    _check_mutation_is_caught(engine, mutation, SPARSE)


def _check_mutation_is_caught(engine, mutation, settings):
    """The reference decoder states Focus's selection itself, so a wrong decision in the
    engine's selection shows up as different tokens, not only a wrong plumbing."""
    import sys

    import cloudpickle

    # The worker cannot import this test module: send the functions themselves.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    llm, reference = engine
    prompts = _prompts(reference)
    want = _reference(reference, prompts, settings)
    llm.collective_rpc(_mutate, args=(mutation, False))
    try:
        mutated = _generate(llm, prompts, settings)
    finally:
        llm.collective_rpc(_mutate, args=(mutation, True))
    assert mutated != want
    assert _generate(llm, prompts, settings) == want  # and the engine is whole again


# One batch, every method: Sparse-dLLM (pruned hard, and at its defaults), Focus, and the
# 20-token prompt under Focus's settings, below its min_prompt_len (so dense dual).
MIXED = [SPARSE_DLLM_PRUNED, SPARSE, SPARSE_DLLM, SPARSE]


def _reference_each(reference, prompts, per_prompt, temperature=0.0, seed=None):
    return [
        served_outputs(reference, [p], DiffusionSettings(**s), [m], temperature, seed, focus=True)[
            0
        ]
        for p, s, m in zip(prompts, per_prompt, MAX_TOKENS)
    ]


# One batch, four methods: SparseD (pruned hard, and at its recipe), Focus, Sparse-dLLM.
MIXED_SPARSED = [SPARSED_PRUNED, SPARSE, SPARSED, SPARSE_DLLM]
# Per method: its mixed batch, and the first prompt's settings with the method's pruning
# undone (Sparse-dLLM keeping every key outside the block; SparseD's steps all dense), which
# must give other tokens, so the case tells the pruning apart.
MIXED_BATCHES = {
    "sparse_dllm": (MIXED, {**SPARSE_DLLM, "sparse_dllm_keep_ratio": 1.0}),
    "sparsed": (MIXED_SPARSED, {"gen_length": 64, "block_length": 16, "cache": "none"}),
}


@pytest.mark.parametrize("method", list(MIXED_BATCHES))
def test_method_in_a_mixed_batch_matches_reference(engine, method):
    """Sparse-dLLM's or SparseD's requests in the same forwards as other methods' (SparseD's
    dense steps, its pattern step and pattern-following steps), each as the reference states
    its rule; the case is discriminating."""
    llm, reference = engine
    prompts = _prompts(reference)
    batch, undone = MIXED_BATCHES[method]
    want = _reference_each(reference, prompts, batch)
    assert want[:1] != _reference_each(reference, prompts[:1], [undone])
    assert _generate(llm, prompts, batch) == want


@pytest.mark.parametrize("method", list(MIXED_BATCHES))
def test_method_sampling_matches_reference(engine, method):
    llm, reference = engine
    prompts = _prompts(reference)
    batch, _ = MIXED_BATCHES[method]
    want = _reference_each(reference, prompts, batch, temperature=0.8, seed=5)
    assert _generate(llm, prompts, batch, temperature=0.8, seed=5) == want


@pytest.mark.parametrize(
    "mutation, settings",
    [("sparse_dllm kept keys", SPARSE_DLLM_PRUNED), ("sparsed pattern", SPARSED_PRUNED)],
    ids=["sparse_dllm", "sparsed"],
)
def test_a_broken_method_selection_is_caught(engine, mutation, settings):
    _check_mutation_is_caught(engine, mutation, settings)
