"""The shipped retrieval model (examples/models/kv-retrieval-llada): it is exactly the circuit
`vllm_focus.testing.retrieval` writes, it answers through the reference decoder and through
vLLM, dense and with Focus (token for token as the reference's Focus), and Focus with too small
a kept-prompt budget loses answers — so Focus is really deciding what the model sees.

The vLLM cases also run in bfloat16, what real checkpoints are served in: `--dtype auto` on a
bfloat16 copy of the checkpoint (FOCUS backend), and `--dtype bfloat16` with vLLM's dense CPU
attention; their answers must be the float32 ones (every question right)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from vllm_focus.reference.decode import served_outputs
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.settings import DiffusionSettings
from vllm_focus.testing.retrieval import KVTask, write_retrieval_checkpoint

SHIPPED = Path(__file__).resolve().parent.parent / "examples" / "models" / "kv-retrieval-llada"
LENGTH = 640
DECODE = {"block_length": 4, "min_prompt_len": 256}


def test_shipped_checkpoint_is_the_written_circuit(tmp_path):
    written = write_retrieval_checkpoint(tmp_path / "model")
    names = sorted(p.name for p in SHIPPED.iterdir() if p.name != "README.md")
    assert names == sorted(p.name for p in written.iterdir())
    for name in names:
        assert (SHIPPED / name).read_bytes() == (written / name).read_bytes(), name


@pytest.fixture(scope="module")
def questions():
    rng = random.Random(7)
    task = KVTask()
    return task, [task.question_for(rng, LENGTH) for _ in range(12)]


def test_reference_decoder_answers(questions):
    task, items = questions
    model = ReferenceModel(SHIPPED)
    for settings, focus in (({**DECODE}, False), ({**DECODE}, True)):
        outputs = served_outputs(
            model,
            [q.prompt for q in items[:4]],
            DiffusionSettings(**settings),
            [4] * 4,
            focus=focus,
        )
        assert [out[:3] for out in outputs] == [q.answer for q in items[:4]]
        assert all(out[3] == task.eos for out in outputs)


def _bfloat16_copy(out: Path) -> Path:
    """The shipped checkpoint with its tensors and `torch_dtype` in bfloat16."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(SHIPPED, out)
    for shard in out.glob("*.safetensors"):
        tensors = {k: v.to(torch.bfloat16) for k, v in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


# name: (dtype argument, bfloat16 checkpoint, FOCUS backend)
ENGINES = {
    "float32-focus": ("float32", False, True),
    "auto-bf16-checkpoint-focus": ("auto", True, True),
    "bfloat16-dense": ("bfloat16", False, False),
}


@pytest.fixture(scope="module", params=list(ENGINES))
def llm(request, tmp_path_factory):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    dtype, bf16_checkpoint, focus = ENGINES[request.param]
    model = SHIPPED
    if bf16_checkpoint:
        model = _bfloat16_copy(tmp_path_factory.mktemp("bf16") / "model")
    engine = LLM(
        model=str(model),
        dtype=dtype,
        max_model_len=LENGTH + 64,
        kv_cache_memory_bytes=64 << 20,
        **({"attention_backend": "focus"} if focus else {}),
    )
    engine.test_case = request.param
    expected = torch.float32 if request.param == "float32-focus" else torch.bfloat16
    assert engine.llm_engine.vllm_config.model_config.dtype == expected
    yield engine
    engine.llm_engine.engine_core.shutdown()


def _answers(llm, items, settings):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=4, extra_args=settings)
    outputs = llm.generate([{"prompt_token_ids": q.prompt} for q in items], params)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_vllm_answers_dense_and_with_focus(llm, questions):
    task, items = questions
    dense = _answers(llm, items, {**DECODE, "min_prompt_len": 100_000})
    focus = _answers(llm, items, DECODE)
    assert [out[:3] for out in dense] == [q.answer for q in items]
    assert [out[:3] for out in focus] == [q.answer for q in items]
    if llm.test_case != "float32-focus":
        return  # the reference decoder runs float32
    reference = served_outputs(
        ReferenceModel(SHIPPED),
        [q.prompt for q in items[:3]],
        DiffusionSettings(**DECODE),
        [4] * 3,
        focus=True,
    )
    assert focus[:3] == reference


def test_focus_with_one_kept_block_loses_answers(llm, questions):
    """Keeping one 64-token prompt block (the BOS block outscores the record's) and no sinks
    hides the record from the lookup layer in the within-block steps."""
    if not ENGINES[llm.test_case][2]:
        pytest.skip("a dense server does not prune")
    _, items = questions
    settings = {**DECODE, "keep_ratio": 0.01, "min_keep_tokens": 64, "num_sinks": 0}
    answers = _answers(llm, items, settings)
    right = sum(out[:3] == q.answer for out, q in zip(answers, items))
    assert right <= len(items) // 2


def test_training_forward_is_the_reference_forward(tmp_path):
    """examples/train_tiny_dllm.py trains its own batched forward; exported, its weights must
    give the reference model's logits (what vLLM and the decoders run)."""
    import importlib.util
    import sys

    from vllm_focus.testing.retrieval import write_task_checkpoint

    path = SHIPPED.parent.parent / "train_tiny_dllm.py"
    spec = importlib.util.spec_from_file_location("train_tiny_dllm", path)
    trainer = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = trainer  # its dataclasses resolve annotations through it
    spec.loader.exec_module(trainer)
    torch.manual_seed(0)
    shape = trainer.Shape(d_model=64, n_layers=2, n_heads=2, mlp_hidden=96)
    task = KVTask()
    model = trainer.LLaDAModel(shape, len(task.words))
    with torch.no_grad():  # peaked attention (the 0.02 init attends almost uniformly)
        for name, weight in zip(model.names, model.weights):
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                weight.add_(0.1 * torch.randn_like(weight))
            else:
                weight.mul_(25)
    out = write_task_checkpoint(
        tmp_path / "trained",
        model.tensors(),
        hidden=shape.d_model,
        layers=shape.n_layers,
        heads=shape.n_heads,
        mlp_hidden=shape.mlp_hidden,
        rope_theta=shape.rope_theta,
        max_len=shape.max_len,
    )
    ids = task.question_for(random.Random(1), 96).prompt + [task.mask] * 4
    with torch.no_grad():
        trained = model(torch.tensor([ids]))[0]
    reference, _ = ReferenceModel(out).forward(torch.tensor(ids))
    assert (trained - reference).abs().max() <= 1e-4 * reference.abs().max()
