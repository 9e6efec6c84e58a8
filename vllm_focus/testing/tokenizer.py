"""A small byte-level BPE tokenizer for the tiny checkpoints, trained here from a fixed corpus.

It is deterministic (same corpus, same trainer settings), declares the special tokens of the
model family it stands in for, and ships that family's chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# Qwen-style template (Dream-v0-Instruct): a default system turn, `<|im_start|>role\n...<|im_end|>`.
DREAM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# LLaMA-3-style headers (LLaDA-8B-Instruct): BOS once, then one header block per turn.
LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Diffusion language models denoise a canvas of masked tokens, block by block.",
    "A key value record maps a name to a number: key alpha is 17, key beta is 42.",
    "What is the value of key gamma? The value of key gamma is 93.",
    "Long documents hide the answer somewhere in the middle of many filler sentences.",
    "Attention sinks are tokens that receive a large share of attention in every layer.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Once upon a time there was a small model that learned to retrieve facts.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 100 256 1024 4096 32768.",
    "Questions, answers; punctuation! (parentheses) [brackets] {braces} - dashes.",
    "Hello, how are you today? I am fine, thank you. Please summarise the report.",
    "The river flows to the sea, and the sea returns the rain to the mountains.",
]


@dataclass(frozen=True)
class SpecialTokens:
    """Special tokens of one family, in the order their ids follow the BPE vocabulary."""

    names: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    mask: str
    end_of_turn: str
    chat_template: str


DREAM_SPECIALS = SpecialTokens(
    names=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"),
    bos="<|endoftext|>",
    eos="<|endoftext|>",
    pad="<|endoftext|>",
    mask="<|mask|>",
    end_of_turn="<|im_end|>",
    chat_template=DREAM_CHAT_TEMPLATE,
)

LLADA_SPECIALS = SpecialTokens(
    names=(
        "<|startoftext|>",
        "<|endoftext|>",
        "<|mdm_mask|>",
        "<|eot_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
    ),
    bos="<|startoftext|>",
    eos="<|endoftext|>",
    pad="<|endoftext|>",
    mask="<|mdm_mask|>",
    end_of_turn="<|eot_id|>",
    chat_template=LLADA_CHAT_TEMPLATE,
)


def train_tokenizer(num_bpe_tokens: int, specials: SpecialTokens):
    """Train the byte-level BPE; special tokens take the ids right after the BPE vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_bpe_tokens,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tokenizer.add_special_tokens(list(specials.names))
    return tokenizer


def special_token_ids(tokenizer, specials: SpecialTokens) -> dict[str, int]:
    ids = {name: tokenizer.token_to_id(name) for name in specials.names}
    missing = [name for name, idx in ids.items() if idx is None]
    if missing:
        raise RuntimeError(f"tokenizer lost its special tokens {missing}")
    return ids


def _added_tokens(tokenizer, specials: SpecialTokens) -> dict:
    return {
        str(tokenizer.token_to_id(name)): {
            "content": name,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for name in specials.names
    }


def write_tokenizer_files(out: Path, tokenizer, specials: SpecialTokens, max_len: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": _added_tokens(tokenizer, specials),
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "pad_token": specials.pad,
        "mask_token": specials.mask,
        "additional_special_tokens": [specials.end_of_turn],
        "chat_template": specials.chat_template,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_special_tokens_map(out, specials)


def _write_special_tokens_map(out: Path, specials: SpecialTokens) -> None:
    special_map = {
        "bos_token": specials.bos,
        "eos_token": specials.eos,
        "pad_token": specials.pad,
        "mask_token": specials.mask,
        "additional_special_tokens": [specials.end_of_turn],
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


# The modules a published Dream checkpoint's auto_map names, and the files here they come from.
DREAM_REMOTE_MODULES = {
    "tokenization_dream.py": "dream_remote_tokenizer.py",
    "configuration_dream.py": "dream_remote_config.py",
}


def write_dream_published_tokenizer(
    out: Path, tokenizer, specials: SpecialTokens, max_len: int
) -> None:
    """Dream-v0-*-7B's tokenizer layout: vocab.json + merges.txt, no tokenizer.json, a
    tokenizer_config.json naming `DreamTokenizer` with an auto_map to `tokenization_dream.py`
    (the keys Dream publishes), and that remote module (a slow BPE written here)."""
    tokenizer.model.save(str(out))
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens(tokenizer, specials),
        # As Dream's (Qwen's) list: every added token that is not one of the named four.
        "additional_special_tokens": [
            name
            for name in specials.names
            if name not in (specials.bos, specials.eos, specials.pad, specials.mask)
        ],
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": specials.bos,
        "chat_template": specials.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": specials.eos,
        "errors": "replace",
        "mask_token": specials.mask,
        "model_max_length": max_len,
        "pad_token": specials.pad,
        "split_special_tokens": False,
        "tokenizer_class": "DreamTokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_special_tokens_map(out, specials)
    here = Path(__file__).parent
    for name, source in DREAM_REMOTE_MODULES.items():
        (out / name).write_text((here / source).read_text())
