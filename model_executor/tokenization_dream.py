"""Dream's published tokenizer, served by transformers' own Qwen2 tokenizer.

Dream-v0-*-7B checkpoints ship `vocab.json` + `merges.txt` and a `tokenizer_config.json` whose
`tokenizer_class` is `DreamTokenizer`, with an `auto_map` to their own `tokenization_dream.py`
and no `tokenizer.json`. That class is Qwen2's byte-level BPE under another name: the same
pre-tokenization regex, NFC normalisation, byte-to-unicode alphabet and merge ranks, added
tokens kept whole, no BOS added. Transformers' `Qwen2Tokenizer` implements exactly that, on the
Rust `tokenizers` backend.

`register()` makes transformers resolve the name `DreamTokenizer` to the class below. A class
found by name outside the `transformers.` package counts as explicit local code, so
`AutoTokenizer` (and vLLM, which calls it) uses it instead of the checkpoint's remote module,
with or without `trust_remote_code`; the checkpoint's file never runs. It is registered by name
only: `AutoTokenizer.register` would also map the Dream config class to it, and transformers
then no longer counts the class as explicit and, when remote code is trusted, runs the remote
module instead.
"""

from __future__ import annotations

from transformers import Qwen2Tokenizer


class DreamTokenizer(Qwen2Tokenizer):
    """`Qwen2Tokenizer` under the name Dream's tokenizer_config.json asks for."""


def register() -> None:
    from transformers.models.auto import tokenization_auto

    tokenization_auto.REGISTERED_TOKENIZER_CLASSES[DreamTokenizer.__name__] = DreamTokenizer
