"""UltraLLaDA at long context: a tiny LLaDA checkpoint with UltraLLaDA-style values
(`rope_theta` 1e8, `max_sequence_length` 131072, no `rope_scaling`), served past 16K.

The model class equals the reference forward at positions beyond 16K, and
`LLM(..., max_model_len=32K+)` on CPU serves a 32K-token prompt, dense (dual cache) and with
Focus in one engine, with the reference's tokens. One engine for the module.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_focus.reference.decode import served_outputs
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings

PROMPT_LEN = 32 * 1024
MAX_TOKENS = 8
MAX_MODEL_LEN = PROMPT_LEN + 64
DECODING = {"gen_length": 8, "block_length": 8, "steps": 4}
# Focus on the 2-layer model: layer 0 dense (it picks the sinks), layer 1 sparse, over prompt
# blocks of 64 tokens, 5% of them kept.
FOCUS = {
    **DECODING,
    "min_prompt_len": 1024,
    "dense_layers": 1,
    "prompt_block_size": 64,
    "keep_ratio": 0.05,
    "num_sinks": 8,
}
DENSE = {**DECODING, "min_prompt_len": 10 * PROMPT_LEN}  # below min_prompt_len: dense dual


def test_the_config_in_force_is_ultrallada_s_and_the_log_says_so(tiny_dirs, capfd, caplog):
    from vllm.engine.arg_utils import EngineArgs

    import vllm_focus

    config = json.loads((Path(tiny_dirs["ultrallada"]) / "config.json").read_text())
    assert config["rope_theta"] == 1.0e8
    assert config["max_sequence_length"] == 131072
    assert config.get("rope_scaling") is None
    vllm_focus.register()
    args = EngineArgs(model=tiny_dirs["ultrallada"], dtype="float32", max_model_len=MAX_MODEL_LEN)
    vllm_config = args.create_engine_config()
    assert vllm_config.model_config.hf_config.rope_theta == 1.0e8
    assert vllm_config.model_config.max_model_len == MAX_MODEL_LEN
    # Without --max-model-len vLLM takes the config's whole length.
    whole = EngineArgs(model=tiny_dirs["ultrallada"], dtype="float32").create_engine_config()
    assert whole.model_config.max_model_len == 131072
    # vLLM's handler writes to the stream it found at import; after other modules have run in
    # the same process the records reach pytest through logging instead. Read both.
    out, err = capfd.readouterr()
    lines = (out + err + "\n" + caplog.text).splitlines()
    line = next(x for x in lines if "vllm-focus: serving" in x)
    assert f"RoPE base 1e+08, maximum length {MAX_MODEL_LEN} (the config allows 131072)" in line


def _prompt(reference: ReferenceModel, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    vocab = reference.config.vocab_size - 8  # keep clear of the special tokens
    return torch.randint(0, vocab, (length,), generator=generator).tolist()


def test_forward_beyond_16k_matches_reference(tiny_dirs):
    import vllm_focus
    from vllm_focus.testing.harness import Forward, InProcessModel

    vllm_focus.register()
    length = 20_000
    reference = ReferenceModel(tiny_dirs["ultrallada"])
    engine = InProcessModel(tiny_dirs["ultrallada"], max_model_len=length)
    ids = torch.tensor(_prompt(reference, length, seed=3))
    got = engine.logits(Forward(ids, torch.arange(length), length))
    want, _ = reference.forward(ids)
    far = torch.arange(16_384, length)
    assert (got[far] - want[far]).abs().max().item() <= 1e-4
    assert (got - want).abs().max().item() <= 1e-4
    # The base matters there: LLaDA-8B's 500000 gives other logits at those positions.
    reference.inv_freq = 1.0 / (5.0e5 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    other, _ = reference.forward(ids)
    assert (other[far] - want[far]).abs().max().item() > 1e-2


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    from vllm import LLM

    model_dir = tiny_dirs["ultrallada"]
    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        # Both requests' K/V at once: 2 layers x (K, V) x 4 heads x 32 dims x 4 bytes a token.
        kv_cache_memory_bytes=2 * MAX_MODEL_LEN * 2 * 2 * 4 * 32 * 4 + (16 << 20),
        attention_backend="focus",
        seed=0,
    )
    yield llm, ReferenceModel(model_dir)
    llm.llm_engine.engine_core.shutdown()


def test_32k_prompt_dense_and_focus_match_reference(engine):
    from vllm import SamplingParams

    llm, reference = engine
    prompts = [_prompt(reference, PROMPT_LEN, seed=1), _prompt(reference, PROMPT_LEN, seed=2)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=DENSE),
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=FOCUS),
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outputs]
    dense = served_outputs(reference, prompts[:1], DiffusionSettings(**DENSE), [MAX_TOKENS])
    focus = served_outputs(
        reference, prompts[1:], DiffusionSettings(**FOCUS), [MAX_TOKENS], focus=True
    )
    assert got == dense + focus
