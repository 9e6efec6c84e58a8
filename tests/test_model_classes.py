"""vLLM model classes vs the plain-torch reference forward, and load-time checkpoint errors.

The vLLM side runs in this process (vllm_focus.testing.harness): vLLM's loader, layers and
CPU attention kernels over a paged KV cache, non-causal.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from vllm_focus.model_executor.models.layout import CheckpointError, check_checkpoint
from vllm_focus.reference.model import ReferenceModel
from vllm_focus.testing.harness import Forward, InProcessModel

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def models(tiny_dirs):
    import vllm_focus

    vllm_focus.register()
    return {arch: (InProcessModel(path), ReferenceModel(path)) for arch, path in tiny_dirs.items()}


@pytest.mark.parametrize("arch", ["dream", "dream-gqa3", "llada"])
@pytest.mark.parametrize("length", [1, 15, 63, 300])
def test_full_forward_matches_reference(models, arch, length):
    engine, reference = models[arch]
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(0, reference.config.vocab_size, (length,), generator=generator)
    got = engine.logits(Forward(ids, torch.arange(length), length))
    want, _ = reference.forward(ids)
    assert got.shape == want.shape == (length, reference.config.vocab_size)
    assert (got - want).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("arch", ["dream-gqa3", "llada"])
def test_window_over_cached_keys_matches_reference(models, arch):
    """Queries in the middle of the sequence attend to cached keys on both sides."""
    engine, reference = models[arch]
    ids = torch.randint(0, reference.config.vocab_size, (130,), generator=torch.Generator())
    engine.logits(Forward(ids, torch.arange(130), 130))  # fills the cache
    window = torch.arange(64, 96)
    got = engine.logits(Forward(ids, window, 130))
    want, _ = reference.forward(ids)
    assert (got - want[window]).abs().max().item() <= TOLERANCE


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _config(path: Path):
    from vllm_focus.model_executor.configs.dream import DreamConfig

    return DreamConfig(**json.loads((path / "config.json").read_text()))


def test_missing_shard_names_the_file(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["dream"], tmp_path / "ckpt")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*missing"):
        check_checkpoint(path, _config(path))


def test_wrong_shape_names_the_file_and_tensor(tiny_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(tiny_dirs["dream"], tmp_path / "ckpt")
    shard = path / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 128)
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError) as info:
        check_checkpoint(path, _config(path))
    text = str(info.value)
    assert "model-00001-of-00002.safetensors" in text
    assert "'model.layers.0.self_attn.k_proj.weight' has shape (3, 128)" in text


def test_missing_tensor_is_named(tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["dream"], tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"]["lm_head.weight"]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        check_checkpoint(path, _config(path))


def test_vllm_load_reports_the_missing_shard(models, tiny_dirs, tmp_path):
    path = _copy(tiny_dirs["llada"], tmp_path / "ckpt")
    (path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors.*missing"):
        InProcessModel(str(path))
