"""The published tensor layouts of Dream and LLaDA checkpoints, and checks against them.

One source of truth for: which tensors a checkpoint must hold and their shapes (used by the
load-time check and by the tiny-checkpoint writer), and how each published name maps onto the
vLLM module tree shared by both models (`model.layers.N.self_attn.qkv_proj`, ...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold what its config.json describes."""


def family_of(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type == "Dream":
        return "dream"
    if model_type == "llada":
        return "llada"
    raise CheckpointError(f"model_type {model_type!r} is neither 'Dream' nor 'llada'")


def published_tensor_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the published layout with its shape, in file order."""
    family = family_of(config)
    h, i = config.hidden_size, config.intermediate_size
    head_dim = h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if family == "dream":
        v = config.vocab_size
        shapes["model.embed_tokens.weight"] = (v, h)
        for n in range(config.num_hidden_layers):
            p = f"model.layers.{n}."
            shapes[p + "input_layernorm.weight"] = (h,)
            for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[p + f"self_attn.{name}.weight"] = (rows, h)
                shapes[p + f"self_attn.{name}.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (h, q)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            shapes[p + "mlp.gate_proj.weight"] = (i, h)
            shapes[p + "mlp.up_proj.weight"] = (i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes["model.norm.weight"] = (h,)
        shapes["lm_head.weight"] = (v, h)
    else:
        e = config.embedding_size
        shapes["model.transformer.wte.weight"] = (e, h)
        for n in range(config.num_hidden_layers):
            p = f"model.transformer.blocks.{n}."
            shapes[p + "attn_norm.weight"] = (h,)
            shapes[p + "q_proj.weight"] = (q, h)
            shapes[p + "k_proj.weight"] = (kv, h)
            shapes[p + "v_proj.weight"] = (kv, h)
            shapes[p + "attn_out.weight"] = (h, q)
            shapes[p + "ff_norm.weight"] = (h,)
            shapes[p + "ff_proj.weight"] = (i, h)
            shapes[p + "up_proj.weight"] = (i, h)
            shapes[p + "ff_out.weight"] = (h, i)
        shapes["model.transformer.ln_f.weight"] = (h,)
        shapes["model.transformer.ff_out.weight"] = (e, h)
    return shapes


# Published name -> (vLLM parameter name, shard id or None). LLaDA's `ff_out` is both the
# per-block down projection and the LM head; the patterns match full paths, so they differ.
_LLADA_RULES = [
    (r"^model\.transformer\.wte\.weight$", "model.embed_tokens.weight", None),
    (r"^model\.transformer\.ln_f\.weight$", "model.norm.weight", None),
    (r"^model\.transformer\.ff_out\.weight$", "lm_head.weight", None),
    (
        r"^model\.transformer\.blocks\.(\d+)\.attn_norm\.weight$",
        r"model.layers.\1.input_layernorm.weight",
        None,
    ),
    (
        r"^model\.transformer\.blocks\.(\d+)\.ff_norm\.weight$",
        r"model.layers.\1.post_attention_layernorm.weight",
        None,
    ),
    (
        r"^model\.transformer\.blocks\.(\d+)\.q_proj\.weight$",
        r"model.layers.\1.self_attn.qkv_proj.weight",
        "q",
    ),
    (
        r"^model\.transformer\.blocks\.(\d+)\.k_proj\.weight$",
        r"model.layers.\1.self_attn.qkv_proj.weight",
        "k",
    ),
    (
        r"^model\.transformer\.blocks\.(\d+)\.v_proj\.weight$",
        r"model.layers.\1.self_attn.qkv_proj.weight",
        "v",
    ),
    (
        r"^model\.transformer\.blocks\.(\d+)\.attn_out\.weight$",
        r"model.layers.\1.self_attn.o_proj.weight",
        None,
    ),
    (
        r"^model\.transformer\.blocks\.(\d+)\.ff_proj\.weight$",
        r"model.layers.\1.mlp.gate_up_proj.weight",
        0,
    ),
    (
        r"^model\.transformer\.blocks\.(\d+)\.up_proj\.weight$",
        r"model.layers.\1.mlp.gate_up_proj.weight",
        1,
    ),
    (
        r"^model\.transformer\.blocks\.(\d+)\.ff_out\.weight$",
        r"model.layers.\1.mlp.down_proj.weight",
        None,
    ),
]

_DREAM_RULES = [
    (r"^(model\.layers\.\d+\.self_attn)\.q_proj\.(weight|bias)$", r"\1.qkv_proj.\2", "q"),
    (r"^(model\.layers\.\d+\.self_attn)\.k_proj\.(weight|bias)$", r"\1.qkv_proj.\2", "k"),
    (r"^(model\.layers\.\d+\.self_attn)\.v_proj\.(weight|bias)$", r"\1.qkv_proj.\2", "v"),
    (r"^(model\.layers\.\d+\.mlp)\.gate_proj\.weight$", r"\1.gate_up_proj.weight", 0),
    (r"^(model\.layers\.\d+\.mlp)\.up_proj\.weight$", r"\1.gate_up_proj.weight", 1),
    (r"^(.*)$", r"\1", None),
]

_RULES = {
    "dream": [(re.compile(p), r, s) for p, r, s in _DREAM_RULES],
    "llada": [(re.compile(p), r, s) for p, r, s in _LLADA_RULES],
}


def to_vllm_name(family: str, name: str) -> tuple[str, str | int | None]:
    """Map a published tensor name to (vLLM parameter name, shard id)."""
    for pattern, replacement, shard in _RULES[family]:
        if pattern.match(name):
            return pattern.sub(replacement, name), shard
    raise CheckpointError(f"tensor {name!r} is not part of the published {family} layout")


def _safetensors_files(model_dir: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index if there is one, else from every file."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).exists()})
        if missing:
            raise CheckpointError(
                f"{model_dir}: shard(s) {missing} listed in model.safetensors.index.json "
                "are missing"
            )
        return dict(weight_map)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files")
    return {name: f.name for f in files for name in _header(f)}


def _header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header (read without loading any data)."""
    with open(path, "rb") as handle:
        size_bytes = handle.read(8)
        if len(size_bytes) != 8:
            raise CheckpointError(f"{path}: truncated safetensors file")
        size = int.from_bytes(size_bytes, "little")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path}: unreadable safetensors header ({err})") from err
    header.pop("__metadata__", None)
    return header


def check_checkpoint(model_dir: str | Path, config: Any) -> None:
    """Raise CheckpointError naming the file/tensor if the checkpoint does not match config."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        # A hub id: nothing local to check (this workplace cannot download anyway).
        return
    expected = published_tensor_shapes(config)
    locations = _safetensors_files(model_dir)
    missing = [name for name in expected if name not in locations]
    if missing:
        raise CheckpointError(
            f"{model_dir}: tensor(s) missing from the checkpoint: {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    headers: dict[str, dict[str, dict]] = {}
    for name, shape in expected.items():
        file = locations[name]
        if file not in headers:
            headers[file] = _header(model_dir / file)
        entry = headers[file].get(name)
        if entry is None:
            raise CheckpointError(f"{model_dir / file}: tensor {name!r} is not in this file")
        if tuple(entry["shape"]) != shape:
            raise CheckpointError(
                f"{model_dir / file}: tensor {name!r} has shape {tuple(entry['shape'])}, "
                f"config.json implies {shape}"
            )
