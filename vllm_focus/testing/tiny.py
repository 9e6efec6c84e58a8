"""Write tiny random-weight Dream and LLaDA checkpoints in the published layout.

    vllm-focus-tiny --arch dream --out /tmp/tiny-dream

The layout is what `Dream-org/Dream-v0-Instruct-7B` and `GSAI-ML/LLaDA-8B-Instruct` publish:
config.json (their keys, model_type and architectures), generation_config.json, safetensors
shards with a `model.safetensors.index.json`, and tokenizer files whose special tokens carry
the ids the configs declare. Everything is a deterministic function of the arguments.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vllm_focus.model_executor.models.layout import published_tensor_shapes
from vllm_focus.testing.tokenizer import (
    DREAM_SPECIALS,
    LLADA_SPECIALS,
    SpecialTokens,
    special_token_ids,
    train_tokenizer,
    write_dream_published_tokenizer,
    write_tokenizer_files,
)

# How the tokenizer is laid out: `json` (tokenizer.json, as LLaDA publishes) or `published`
# (Dream-v0-*-7B's: vocab.json + merges.txt, `DreamTokenizer`, auto_map to remote code).
TOKENIZER_LAYOUTS = ("json", "published")

NUM_BPE_TOKENS = 400


@dataclass(frozen=True)
class TinyShape:
    family: str  # "dream" or "llada"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int | None = None  # None: exactly the tokenizer's size
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    logit_scale: float = 4.0


PRESETS: dict[str, TinyShape] = {
    # head_dim 32 everywhere: vLLM's CPU attention supports head sizes from 32 up.
    "dream": TinyShape(
        "dream", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=256
    ),
    # Dream-7B's GQA ratio is 7; a ratio that is not a power of two exercises the same paths.
    "dream-gqa3": TinyShape(
        "dream", hidden_size=192, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=256
    ),
    "llada": TinyShape(
        "llada", hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=256
    ),
    # UltraLLaDA: LLaDA-8B-Base taken to 128K context by an NTK-style rescaling of the RoPE
    # base, so its config carries a far larger `rope_theta` and `max_sequence_length` (and no
    # `rope_scaling`); LLaDA-8B has 500000 and 4096.
    "ultrallada": TinyShape(
        "llada",
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=256,
        max_position_embeddings=131072,
        rope_theta=1.0e8,
    ),
}


def _specials(shape: TinyShape) -> SpecialTokens:
    return DREAM_SPECIALS if shape.family == "dream" else LLADA_SPECIALS


def _dream_config(shape: TinyShape, ids: dict[str, int]) -> dict:
    return {
        "architectures": ["DreamModel"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "mask_token_id": ids["<|mask|>"],
        "max_position_embeddings": shape.max_position_embeddings,
        "max_window_layers": shape.num_layers,
        "model_type": "Dream",
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "pad_token_id": ids["<|endoftext|>"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": shape.vocab_size,
    }


def _llada_config(shape: TinyShape, ids: dict[str, int]) -> dict:
    return {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": shape.hidden_size,
        "embedding_dropout": 0.0,
        "embedding_size": shape.vocab_size,
        "eos_token_id": ids["<|endoftext|>"],
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "init_cutoff_factor": None,
        "init_device": "meta",
        "init_fn": "mitchell",
        "init_std": 0.02,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": ids["<|mdm_mask|>"],
        "max_sequence_length": shape.max_position_embeddings,
        "mlp_hidden_size": shape.intermediate_size,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": shape.num_heads,
        "n_kv_heads": shape.num_kv_heads,
        "n_layers": shape.num_layers,
        "pad_token_id": ids["<|endoftext|>"],
        "precision": "amp_bf16",
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": shape.rope_theta,
        "scale_logits": False,
        "torch_dtype": "float32",
        "use_cache": False,
        "vocab_size": shape.vocab_size,
        "weight_tying": False,
    }


def _generation_config(shape: TinyShape, ids: dict[str, int]) -> dict:
    specials = _specials(shape)
    eos = ids[specials.eos]
    config = {
        "bos_token_id": ids[specials.bos],
        "pad_token_id": ids[specials.pad],
        # The end-of-turn token ends a chat answer just as EOS does.
        "eos_token_id": [eos, ids[specials.end_of_turn]],
        "mask_token_id": ids[specials.mask],
    }
    return config


def _config_object(config: dict):
    from vllm_focus.model_executor.configs.dream import DreamConfig
    from vllm_focus.model_executor.configs.llada import LLaDAConfig

    cls = DreamConfig if config["model_type"] == "Dream" else LLaDAConfig
    return cls(**config)


def _random_tensor(name: str, size: tuple[int, ...], shape: TinyShape, generator):
    """Scaled so that activations keep unit scale and logits are peaked, not uniform."""
    import torch

    noise = torch.randn(size, generator=generator, dtype=torch.float32)
    if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    if "embed_tokens" in name or "wte" in name:
        return noise
    if name in ("lm_head.weight", "model.transformer.ff_out.weight"):
        return noise * (shape.logit_scale / math.sqrt(size[1]))
    return noise / math.sqrt(size[1])


def write_tiny_checkpoint(
    out: str | Path,
    arch: str = "dream",
    seed: int = 0,
    tokenizer_layout: str = "json",
    **overrides,
) -> Path:
    """Write a tiny checkpoint of preset `arch` (see PRESETS) into `out`; returns the path.

    `overrides` replace fields of the preset (e.g. `num_layers=4`, `hidden_size=256`).
    `tokenizer_layout="published"` (Dream only) writes Dream's published tokenizer files, with
    the remote-code modules its tokenizer and config auto_maps name.
    """
    import torch
    from safetensors.torch import save_file

    if arch not in PRESETS:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {sorted(PRESETS)}")
    shape = replace(PRESETS[arch], **overrides)
    if tokenizer_layout not in TOKENIZER_LAYOUTS:
        raise ValueError(
            f"tokenizer_layout must be one of {list(TOKENIZER_LAYOUTS)}, got {tokenizer_layout!r}"
        )
    if tokenizer_layout == "published" and shape.family != "dream":
        raise ValueError("tokenizer_layout 'published' is Dream's layout; LLaDA publishes 'json'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specials = _specials(shape)
    tokenizer = train_tokenizer(NUM_BPE_TOKENS, specials)
    ids = special_token_ids(tokenizer, specials)
    # Random weights predict every id, so ids past the tokenizer (a padded vocabulary, as the
    # published models have) would reach the detokenizer; the default leaves no padding.
    if shape.vocab_size is None:
        shape = replace(shape, vocab_size=tokenizer.get_vocab_size())
    if tokenizer.get_vocab_size() > shape.vocab_size:
        raise ValueError(
            f"vocab_size {shape.vocab_size} is smaller than the tokenizer "
            f"({tokenizer.get_vocab_size()} tokens)"
        )
    if tokenizer_layout == "published":
        write_dream_published_tokenizer(out, tokenizer, specials, shape.max_position_embeddings)
    else:
        write_tokenizer_files(out, tokenizer, specials, shape.max_position_embeddings)
    config = _dream_config(shape, ids) if shape.family == "dream" else _llada_config(shape, ids)
    if tokenizer_layout == "published":
        config["auto_map"] = {
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
        }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(_generation_config(shape, ids), indent=2) + "\n"
    )
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        name: _random_tensor(name, size, shape, generator)
        for name, size in published_tensor_shapes(_config_object(config)).items()
    }
    _save_sharded(out, tensors, num_shards=2, save_file=save_file)
    (out / "tiny_shape.json").write_text(json.dumps({**asdict(shape), "seed": seed}, indent=2))
    return out


def _save_sharded(out: Path, tensors: dict, num_shards: int, save_file) -> None:
    names = list(tensors)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {
            n: tensors[n].contiguous() for n in names[shard * per_shard : (shard + 1) * per_shard]
        }
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(PRESETS), default="dream")
    parser.add_argument("--out", required=True, help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--num-heads", type=int)
    parser.add_argument("--num-kv-heads", type=int)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--max-position-embeddings", type=int)
    parser.add_argument("--vocab-size", type=int)
    parser.add_argument(
        "--tokenizer-layout",
        choices=TOKENIZER_LAYOUTS,
        default="json",
        help="published: Dream-v0-*-7B's vocab.json + merges.txt + DreamTokenizer (Dream only)",
    )
    args = parser.parse_args(argv)
    fixed = ("arch", "out", "seed", "tokenizer_layout")
    overrides = {
        key: value for key, value in vars(args).items() if key not in fixed and value is not None
    }
    path = write_tiny_checkpoint(
        args.out, args.arch, seed=args.seed, tokenizer_layout=args.tokenizer_layout, **overrides
    )
    print(f"wrote tiny {args.arch} checkpoint to {path}")


if __name__ == "__main__":
    main()
