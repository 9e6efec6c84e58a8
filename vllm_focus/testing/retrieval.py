"""Key-value retrieval: the task, and a LLaDA-architecture model that solves it by a written-down
retrieval circuit (weights set by hand, not trained; issue #6's fallback, see the model card).

The task (`KVTask`): a long context of filler sentences with records `KEY : d d d ;` (a key word
and its 3-digit value) spread through it, then one question `? KEY :`; the answer is the key's
three digits and EOS. Every answer digit can only come from the key's record in the context,
so a model that answers attends, from the answer positions, to that one record — the case
Focus's prompt pruning has to get right.

The circuit (`retrieval_tensors`), in the published LLaDA layout (RMSNorm, rotate-half RoPE,
bidirectional attention, SwiGLU MLPs, untied head), 3 layers, d_model 192 = 3 heads x 64:

- the residual stream holds named subspaces: a constant, a BOS flag, a mask flag, the key
  one-hot (30 keys), the digit one-hot, three "key seen 2 / 3 / 4 positions back" copies and
  the retrieved digit;
- layer 0: three positional heads (their q and k come from the constant; RoPE turns them into
  "attend to the position 2 / 3 / 4 back", sharp because RoPE's fast frequencies all agree only
  at that offset) copy the key one-hot found there. In a record `KEY : d1 d2 d3`, digit j then
  carries "KEY was j+1 back"; in the question `? KEY : _ _ _`, answer position j carries the
  same — the lookup key;
- layer 1: nothing (so that with Focus's default `dense_layers=2` the lookup runs in a sparse
  layer);
- layer 2: three lookup heads; head j matches an answer position's "j+1 back" copy against
  every position's, in RoPE's slowest dimensions (which barely rotate over 8K positions, so the
  match is by content alone), and copies the digit it finds. Masked positions (the canvas) are
  pushed out of the match, and a query with nothing to look up attends to BOS, whose value is
  zero;
- every MLP: zero. The head reads the retrieved digit; EOS wins where nothing was retrieved
  (after the three digits).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from vllm_focus.testing.tokenizer import LLADA_SPECIALS

DIGITS = [str(d) for d in range(10)]
PUNCTUATION = [":", ";", "?", "."]
FILLER = (
    "the a of and to in is was it for on with as by at from that this which be are were "
    "river stone window garden morning letter city road market winter summer paper light "
    "quiet old new small large green blue red early late north south east west house boat "
    "bridge forest field cloud rain wind train station table chair music story island "
    "mountain valley harbor lamp clock door kitchen village castle tower meadow lake shore "
    "walked waited opened closed carried watched listened painted wrote read found kept "
    "slowly quickly often never always again today yesterday nearby everywhere together"
).split()
_FIRST = "ba be bi bo da de di do ka ke ki ko la le li lo".split()
_SECOND = "ran sel tim vox".split()
KEYS = [a + b for a in _FIRST for b in _SECOND][:30]  # 30 key words: baran, basel, ...
SPECIALS = LLADA_SPECIALS.names
VALUE_DIGITS = 3


def vocabulary() -> list[str]:
    """Special tokens first (LLaDA's names), then punctuation, digits, filler and keys."""
    return [*SPECIALS, *PUNCTUATION, *DIGITS, *FILLER, *KEYS]


@dataclass(frozen=True)
class Question:
    prompt: list[int]  # BOS, context, `? KEY :`
    answer: list[int]  # the value's digit ids
    key: int


class KVTask:
    """Contexts of records and filler, and questions about their keys (ids of `vocabulary()`)."""

    def __init__(self) -> None:
        self.words = vocabulary()
        v = {w: i for i, w in enumerate(self.words)}
        self.bos, self.eos, self.mask = v["<|startoftext|>"], v["<|endoftext|>"], v["<|mdm_mask|>"]
        self.colon, self.semi, self.question, self.dot = (v[p] for p in PUNCTUATION)
        self.digits = [v[d] for d in DIGITS]
        self.filler = [v[w] for w in FILLER]
        self.keys = [v[k] for k in KEYS]

    def context(self, rng: random.Random, length: int, records: int):
        """[BOS] + filler sentences with `records` records spread through, `length` tokens;
        returns (ids, {key id: value ids})."""
        keys = rng.sample(self.keys, records)
        values = {k: [rng.choice(self.digits) for _ in range(VALUE_DIGITS)] for k in keys}
        filler_total = length - 1 - records * (VALUE_DIGITS + 3)
        if filler_total < 0:
            raise ValueError(f"{records} records do not fit in {length} tokens")
        cuts = sorted(rng.randint(0, filler_total) for _ in range(records))
        gaps = [b - a for a, b in zip([0, *cuts], [*cuts, filler_total])]
        ids = [self.bos]
        for index, gap in enumerate(gaps):
            ids += self._sentences(rng, gap)
            if index < records:
                key = keys[index]
                ids += [key, self.colon, *values[key], self.semi]
        return ids, values

    def _sentences(self, rng: random.Random, count: int) -> list[int]:
        out: list[int] = []
        while len(out) < count:
            size = rng.randint(4, 12)
            out += [rng.choice(self.filler) for _ in range(size - 1)] + [self.dot]
        return out[:count]

    def records_for(self, rng: random.Random, length: int) -> int:
        """About one record per 40 tokens, at least 2, at most one per key."""
        return max(2, min(len(self.keys), rng.randint(length // 64, length // 32 + 2)))

    def question_for(self, rng: random.Random, length: int) -> Question:
        """A prompt of exactly `length` tokens: context + `? KEY :`."""
        ids, values = self.context(rng, length - 3, self.records_for(rng, length))
        key = rng.choice(list(values))
        return Question(ids + [self.question, key, self.colon], values[key], key)

    def training_example(self, rng: random.Random, length: int, questions: int):
        """A training sequence: a context, then up to `questions` questions about its keys,
        each answered (`? KEY : d d d ;`, the last ending in EOS instead of `;`). Returns
        (ids, positions of every answer token: the maskable ones)."""
        ids, values = self.context(rng, length, self.records_for(rng, length))
        asked = rng.sample(list(values), min(questions, len(values)))
        answer: list[int] = []
        for n, key in enumerate(asked):
            ids += [self.question, key, self.colon]
            answer += range(len(ids), len(ids) + VALUE_DIGITS + (n == len(asked) - 1))
            ids += values[key] + [self.eos if n == len(asked) - 1 else self.semi]
        return ids, answer

    def text(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


# ---------------------------------------------------------------------------- the circuit

D_MODEL, HEADS, HEAD_DIM, LAYERS = 192, 3, 64, 3
HALF = HEAD_DIM // 2
MLP_HIDDEN = 64
ROPE_THETA = 1e12
CONST_SCALE = 4.0  # size of the constant in every embedding (keeps the RMS nearly fixed)
# Residual stream subspaces.
CONST, BOS_FLAG, MASK_FLAG = 0, 1, 2
KEY_AT = 3  # + key index (30)
DIGIT_AT = 33  # + digit (10)
BACK_AT = {2: 43, 3: 73, 4: 103}  # "key seen n positions back", + key index (30 each)
RETRIEVED_AT = 133  # + digit (10)
# Lookup heads compare keys in RoPE pairs 16..31 (angle <= 1e-6 per position: none over 16K);
# pair 16 holds the BOS sink (dim 16) and the mask penalty (dim 48).
SLOW_DIMS = [*range(17, 32), *range(49, 64)]
SINK_DIM, MASK_DIM = 16, 48
POSITIONAL_PAIRS = 8  # RoPE pairs 0..7 carry the positional heads
# Target attention scores (after the 1/sqrt(head_dim) scale).
POSITION_SCORE = 40.0  # per pair, at the wanted offset; the next best is >= 0.57 x 40 lower
MATCH_SCORE = 40.0  # a lookup match; BOS sits at half of it, a masked key 40 below
DIGIT_LOGIT, EOS_LOGIT = 20.0, 10.0


def _norm_scale(ones: float) -> float:
    """What RMSNorm multiplies the residual by when it holds the constant and `ones` unit
    entries (the layers write ~unit entries; this is the design point, not exact)."""
    return math.sqrt(D_MODEL) / math.sqrt(CONST_SCALE**2 + ones)


def retrieval_tensors() -> dict:
    """The circuit's weights under LLaDA's published tensor names."""
    import torch

    task = KVTask()
    vocab = len(task.words)
    t = {"model.transformer.wte.weight": torch.zeros(vocab, D_MODEL)}
    embed = t["model.transformer.wte.weight"]
    embed[:, CONST] = CONST_SCALE
    embed[task.bos, BOS_FLAG] = 1.0
    embed[task.mask, MASK_FLAG] = 1.0
    for index, key in enumerate(task.keys):
        embed[key, KEY_AT + index] = 1.0
    for digit, token in enumerate(task.digits):
        embed[token, DIGIT_AT + digit] = 1.0
    scale = math.sqrt(HEAD_DIM)
    for n in range(LAYERS):
        prefix = f"model.transformer.blocks.{n}."
        for name in ("q_proj", "k_proj", "v_proj", "attn_out"):
            t[prefix + name + ".weight"] = torch.zeros(D_MODEL, D_MODEL)
        t[prefix + "attn_norm.weight"] = torch.ones(D_MODEL)
        t[prefix + "ff_norm.weight"] = torch.ones(D_MODEL)
        t[prefix + "ff_proj.weight"] = torch.zeros(MLP_HIDDEN, D_MODEL)
        t[prefix + "up_proj.weight"] = torch.zeros(MLP_HIDDEN, D_MODEL)
        t[prefix + "ff_out.weight"] = torch.zeros(D_MODEL, MLP_HIDDEN)

    # Layer 0: head h attends `back` = h + 2 positions back and copies the key found there.
    block = "model.transformer.blocks.0."
    s = _norm_scale(1.0)
    const = s * CONST_SCALE  # the constant after the norm
    amplitude = math.sqrt(POSITION_SCORE * scale) / const
    thetas = ROPE_THETA ** (-torch.arange(HALF, dtype=torch.float64) * 2 / HEAD_DIM)
    for head, back in enumerate((2, 3, 4)):
        base = head * HEAD_DIM
        for pair in range(POSITIONAL_PAIRS):
            # q at angle -back*theta before RoPE: q(m).k(n) peaks where m - n = back.
            angle = -back * float(thetas[pair])
            t[block + "q_proj.weight"][base + pair, CONST] = amplitude * math.cos(angle)
            t[block + "q_proj.weight"][base + pair + HALF, CONST] = amplitude * math.sin(angle)
            t[block + "k_proj.weight"][base + pair, CONST] = amplitude
        for index in range(len(task.keys)):
            t[block + "v_proj.weight"][base + index, KEY_AT + index] = 1.0 / s
            t[block + "attn_out.weight"][BACK_AT[back] + index, base + index] = 1.0

    # Layer 2: head j matches the "key j+1 back" copies and copies the digit found.
    block = "model.transformer.blocks.2."
    s = _norm_scale(4.0)  # constant + own one-hot + the three copies, roughly
    s_bos = _norm_scale(1.0)
    match = math.sqrt(MATCH_SCORE * scale) / s
    sink_q = math.sqrt(MATCH_SCORE / 2 * scale / (s * CONST_SCALE * s_bos))
    mask_q = math.sqrt(MATCH_SCORE * scale / (s * CONST_SCALE * s_bos))
    for head, back in enumerate((2, 3, 4)):
        base = head * HEAD_DIM
        for index, dim in enumerate(SLOW_DIMS):
            t[block + "q_proj.weight"][base + dim, BACK_AT[back] + index] = match
            t[block + "k_proj.weight"][base + dim, BACK_AT[back] + index] = match
        t[block + "q_proj.weight"][base + SINK_DIM, CONST] = sink_q
        t[block + "k_proj.weight"][base + SINK_DIM, BOS_FLAG] = sink_q
        t[block + "q_proj.weight"][base + MASK_DIM, CONST] = mask_q
        t[block + "k_proj.weight"][base + MASK_DIM, MASK_FLAG] = -mask_q
        for digit in range(10):
            t[block + "v_proj.weight"][base + digit, DIGIT_AT + digit] = 1.0 / s
            t[block + "attn_out.weight"][RETRIEVED_AT + digit, base + digit] = 1.0

    t["model.transformer.ln_f.weight"] = torch.ones(D_MODEL)
    head = torch.zeros(vocab, D_MODEL)
    s = _norm_scale(5.0)
    for digit, token in enumerate(task.digits):
        head[token, RETRIEVED_AT + digit] = DIGIT_LOGIT / s
    head[task.eos, CONST] = EOS_LOGIT / (s * CONST_SCALE)
    t["model.transformer.ff_out.weight"] = head
    return t


def write_retrieval_checkpoint(out: str | Path) -> Path:
    """Write the retrieval circuit in LLaDA's published layout."""
    shape = dict(hidden=D_MODEL, layers=LAYERS, heads=HEADS, mlp_hidden=MLP_HIDDEN)
    return write_task_checkpoint(out, retrieval_tensors(), rope_theta=ROPE_THETA, **shape)


def write_task_checkpoint(
    out: str | Path,
    tensors: dict,
    *,
    hidden: int,
    layers: int,
    heads: int,
    mlp_hidden: int,
    rope_theta: float,
    max_len: int = 16384,
) -> Path:
    """A LLaDA checkpoint for this task's vocabulary: config.json with LLaDA's keys, the
    tensors in two safetensors shards + index, a word-level tokenizer with LLaDA's special
    tokens (the text is the words separated by spaces)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from vllm_focus.testing.tiny import TinyShape, _generation_config, _llada_config, _save_sharded
    from vllm_focus.testing.tokenizer import write_tokenizer_files

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    words = vocabulary()
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="."))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(list(SPECIALS))
    write_tokenizer_files(out, tokenizer, LLADA_SPECIALS, max_len)
    ids = {name: words.index(name) for name in SPECIALS}
    shape = TinyShape(
        "llada",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        intermediate_size=mlp_hidden,
        vocab_size=len(words),
        max_position_embeddings=max_len,
        rope_theta=rope_theta,
    )
    (out / "config.json").write_text(json.dumps(_llada_config(shape, ids), indent=2) + "\n")
    generation = _generation_config(shape, ids)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _save_sharded(out, tensors, num_shards=2, save_file=save_file)
    return out
