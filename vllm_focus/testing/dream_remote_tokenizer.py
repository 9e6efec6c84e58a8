"""A slow, pure-Python `DreamTokenizer`: the remote tokenizer module of the published-layout tiny
Dream checkpoint, and the tests' oracle for the ids of Dream's published tokenizer files.

Written here from the rules Dream's own `tokenization_dream.py` states (a byte-level BPE with
Qwen2's pre-tokenization): NFC-normalise; split out added tokens whole; cut the rest with the
pre-tokenization regex; map each piece's UTF-8 bytes to the printable byte alphabet; merge
adjacent symbols, lowest merge rank first, left to right; look the symbols up in vocab.json.
It shares no code with transformers' Rust-backed `Qwen2Tokenizer`, which the plugin serves the
same files with. The tiny-checkpoint builder copies this file into a checkpoint as
`tokenization_dream.py` (so it imports nothing from vllm_focus).
"""

from __future__ import annotations

import json
import os
import unicodedata

import regex
from transformers import AddedToken
from transformers.tokenization_python import PythonBackend

PRETOKENIZE = regex.compile(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def byte_alphabet() -> dict[int, str]:
    """Byte -> one printable character: printable Latin-1 bytes stand for themselves, the other
    bytes (controls, space, DEL, NBSP, soft hyphen) take code points 256, 257, ... in order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _special(token):
    if token is None or isinstance(token, AddedToken):
        return token
    return AddedToken(token, lstrip=False, rstrip=False, special=True, normalized=False)


class DreamTokenizer(PythonBackend):
    vocab_files_names = {"vocab_file": "vocab.json", "merges_file": "merges.txt"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file,
        merges_file,
        errors="replace",
        unk_token="<|endoftext|>",
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        **kwargs,
    ):
        with open(vocab_file, encoding="utf-8") as handle:
            self.encoder: dict[str, int] = json.load(handle)
        self.decoder = {index: symbol for symbol, index in self.encoder.items()}
        self.ranks: dict[tuple[str, str], int] = {}
        with open(merges_file, encoding="utf-8") as handle:
            for number, line in enumerate(handle):
                line = line.strip()
                if not line or (number == 0 and line.startswith("#version")):
                    continue
                first, second = line.split()
                self.ranks.setdefault((first, second), len(self.ranks))
        self.errors = errors
        self.to_symbol = byte_alphabet()
        self.to_byte = {symbol: byte for byte, symbol in self.to_symbol.items()}
        self.merged: dict[str, list[str]] = {}
        super().__init__(
            errors=errors,
            unk_token=_special(unk_token),
            bos_token=_special(bos_token),
            eos_token=_special(eos_token),
            pad_token=_special(pad_token),
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            split_special_tokens=split_special_tokens,
            **kwargs,
        )

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        return {**self.encoder, **self.added_tokens_encoder}

    def prepare_for_tokenization(self, text, is_split_into_words=False, **kwargs):
        return unicodedata.normalize("NFC", text), kwargs

    def merge(self, piece: str) -> list[str]:
        """BPE of one pre-token: merge the best-ranked adjacent pair everywhere, until none is."""
        if piece in self.merged:
            return self.merged[piece]
        symbols = list(piece)
        while len(symbols) > 1:
            pairs = [
                (self.ranks[pair], pair) for pair in zip(symbols, symbols[1:]) if pair in self.ranks
            ]
            if not pairs:
                break
            _, (first, second) = min(pairs)
            joined: list[str] = []
            position = 0
            while position < len(symbols):
                if (
                    position + 1 < len(symbols)
                    and symbols[position] == first
                    and symbols[position + 1] == second
                ):
                    joined.append(first + second)
                    position += 2
                else:
                    joined.append(symbols[position])
                    position += 1
            symbols = joined
        self.merged[piece] = symbols
        return symbols

    def _tokenize(self, text, **kwargs):
        tokens: list[str] = []
        for piece in PRETOKENIZE.findall(text):
            mapped = "".join(self.to_symbol[byte] for byte in piece.encode("utf-8"))
            tokens.extend(self.merge(mapped))
        return tokens

    def _convert_token_to_id(self, token):
        return self.encoder.get(token, self.encoder.get(self.unk_token))

    def _convert_id_to_token(self, index):
        return self.decoder.get(index)

    def convert_tokens_to_string(self, tokens):
        data = bytearray(self.to_byte[symbol] for symbol in "".join(tokens))
        return data.decode("utf-8", errors=self.errors)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_path = os.path.join(save_directory, prefix + "vocab.json")
        merges_path = os.path.join(save_directory, prefix + "merges.txt")
        with open(vocab_path, "w", encoding="utf-8") as handle:
            json.dump(self.encoder, handle, ensure_ascii=False)
        ordered = sorted(self.ranks, key=self.ranks.__getitem__)
        with open(merges_path, "w", encoding="utf-8") as handle:
            handle.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in ordered))
        return vocab_path, merges_path
