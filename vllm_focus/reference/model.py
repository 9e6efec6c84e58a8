"""Plain-PyTorch forward of Dream and LLaDA, read straight from the published safetensors.

The oracle for the vLLM model classes and for every cache mode: no vLLM, no fused kernels,
one sequence at a time, attention written out as softmax(q k^T / sqrt(d)) v over every key
(bidirectional). A forward computes a chosen set of query positions; keys and values of the
other positions come from a caller-held cache (`KVCache`), which is how the approximate
caches of docs/design.md §3 are expressed "the obvious way".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


@dataclass
class ReferenceConfig:
    family: str  # "dream" or "llada"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_linear_factor: float
    mask_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_json(cls, raw: dict) -> ReferenceConfig:
        scaling = raw.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type"))
        factor = float(scaling["factor"]) if kind == "linear" else 1.0
        if raw["model_type"] == "Dream":
            keys = ("hidden_size", "num_hidden_layers", "num_attention_heads")
            hidden, layers, heads = (raw[k] for k in keys)
            kv_heads = raw["num_key_value_heads"]
        else:
            hidden, layers, heads = raw["d_model"], raw["n_layers"], raw["n_heads"]
            kv_heads = raw.get("n_kv_heads") or heads
        family = "dream" if raw["model_type"] == "Dream" else "llada"
        return cls(
            family,
            hidden,
            layers,
            heads,
            kv_heads,
            raw["vocab_size"],
            raw["rms_norm_eps"],
            raw["rope_theta"],
            factor,
            raw["mask_token_id"],
        )


# Published tensor names per layer, keyed by role. LLaDA's `ff_out` inside a block is the
# down projection; `model.transformer.ff_out` (no block) is the LM head.
_DREAM_NAMES = {
    "attn_norm": "model.layers.{n}.input_layernorm.weight",
    "wq": "model.layers.{n}.self_attn.q_proj.weight",
    "bq": "model.layers.{n}.self_attn.q_proj.bias",
    "wk": "model.layers.{n}.self_attn.k_proj.weight",
    "bk": "model.layers.{n}.self_attn.k_proj.bias",
    "wv": "model.layers.{n}.self_attn.v_proj.weight",
    "bv": "model.layers.{n}.self_attn.v_proj.bias",
    "wo": "model.layers.{n}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{n}.post_attention_layernorm.weight",
    "w_gate": "model.layers.{n}.mlp.gate_proj.weight",
    "w_up": "model.layers.{n}.mlp.up_proj.weight",
    "w_down": "model.layers.{n}.mlp.down_proj.weight",
}
_LLADA_NAMES = {
    "attn_norm": "model.transformer.blocks.{n}.attn_norm.weight",
    "wq": "model.transformer.blocks.{n}.q_proj.weight",
    "wk": "model.transformer.blocks.{n}.k_proj.weight",
    "wv": "model.transformer.blocks.{n}.v_proj.weight",
    "wo": "model.transformer.blocks.{n}.attn_out.weight",
    "mlp_norm": "model.transformer.blocks.{n}.ff_norm.weight",
    "w_gate": "model.transformer.blocks.{n}.ff_proj.weight",
    "w_up": "model.transformer.blocks.{n}.up_proj.weight",
    "w_down": "model.transformer.blocks.{n}.ff_out.weight",
}
_TOP_NAMES = {
    "dream": ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"),
    "llada": (
        "model.transformer.wte.weight",
        "model.transformer.ln_f.weight",
        "model.transformer.ff_out.weight",
    ),
}


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    return tensors


class KVCache:
    """Per-layer keys/values (after RoPE) for every position of one sequence."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys  # each [T, num_kv_heads, head_dim]
        self.values = values

    def write(self, positions: torch.Tensor, fresh: KVCache) -> None:
        """Store the K/V that `fresh` holds for `positions` (fresh is indexed like them)."""
        for layer, (k, v) in enumerate(zip(fresh.keys, fresh.values)):
            self.keys[layer][positions] = k
            self.values[layer][positions] = v


@dataclass
class FocusForward:
    """What a Focus step's forward needs beyond the query (docs/design.md §3, "Focus attention")."""

    prompt_len: int
    focus_rows: torch.Tensor  # rows of the query holding F
    fresh: torch.Tensor  # bool per query row: its fresh K/V replace the cache's this step
    dense_layers: int
    num_sinks: int
    prompt_block_size: int
    kept_blocks: int


@dataclass
class SparseDllmForward:
    """Sparse-dLLM's part in a forward (README, "Sparse-dLLM"): with `kept` None, the block's
    second step, a full forward after which every layer's kept keys are in `found`; with
    `kept`, a later step whose block queries attend, per layer, those keys and the block."""

    start: int  # the block is [start, end)
    end: int
    keep_ratio: float
    kernel: int
    kept: list[torch.Tensor] | None = None
    found: list[torch.Tensor] | None = None


@dataclass
class SparsedForward:
    """SparseD's part in a forward over the whole sequence (README, "SparseD"): with `masks`
    None, the pattern step, a dense forward after which every layer's pattern is in `found`
    (bool [heads, blocks, blocks]); with `masks`, a later step where each head and query
    block attends only its kept key blocks."""

    block_size: int
    select: float
    gen_length: int
    masks: list[torch.Tensor] | None = None
    found: list[torch.Tensor] | None = None


class ReferenceModel:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        model_dir = Path(model_dir)
        self.model_dir = model_dir
        raw_config = json.loads((model_dir / "config.json").read_text())
        self.config = ReferenceConfig.from_json(raw_config)
        self.eos_token_ids = _eos_token_ids(model_dir, raw_config)
        tensors = {k: v.to(dtype) for k, v in _read_safetensors(model_dir).items()}
        names = _DREAM_NAMES if self.config.family == "dream" else _LLADA_NAMES
        self.layers = [
            {role: tensors.get(name.format(n=n)) for role, name in names.items()}
            for n in range(self.config.num_layers)
        ]
        embed, norm, head = _TOP_NAMES[self.config.family]
        self.embed, self.final_norm, self.lm_head = tensors[embed], tensors[norm], tensors[head]
        self.dtype = dtype
        d = self.config.head_dim
        exponent = torch.arange(0, d, 2, dtype=torch.float32) / d
        self.inv_freq = 1.0 / (self.config.rope_theta**exponent)

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def logits_shift(self) -> int:
        return 1 if self.config.family == "dream" else 0

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return x32.to(x.dtype) * weight

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE; x is [Q, heads, head_dim]."""
        t = positions.float() / self.config.rope_linear_factor
        freqs = t[:, None] * self.inv_freq[None, :]
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)[:, None, :].to(x.dtype)
        sin = torch.cat([freqs.sin(), freqs.sin()], -1)[:, None, :].to(x.dtype)
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def forward(
        self,
        ids: torch.Tensor,
        query: torch.Tensor | None = None,
        cache: KVCache | None = None,
        focus: FocusForward | None = None,
        sparse_dllm: SparseDllmForward | None = None,
        sparsed: SparsedForward | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits [Q, vocab] of the `query` positions of `ids` [T], and their fresh K/V.

        Keys/values of positions outside `query` are read from `cache` (required unless the
        query covers every position). Every query attends to every key (no mask), unless
        `focus` is given: then only rows marked fresh replace cached K/V, and layers from
        `dense_layers` on attend to the kept prompt blocks, the sinks and the response; or
        `sparse_dllm`, which either finds each layer's kept keys or attends them; or `sparsed`,
        which either fixes each layer's block pattern or attends through it.
        """
        total = ids.shape[0]
        query = torch.arange(total) if query is None else query
        if cache is None and query.numel() != total:
            raise ValueError("a forward over part of the sequence needs a KV cache")
        cfg = self.config
        heads, kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        h = self.embed[ids[query]]
        fresh = KVCache([], [])
        sinks = torch.empty(0, dtype=torch.long)
        for n, layer in enumerate(self.layers):
            x = self._rms_norm(h, layer["attn_norm"])
            q = _linear(x, layer["wq"], layer.get("bq")).view(-1, heads, d)
            k = _linear(x, layer["wk"], layer.get("bk")).view(-1, kv_heads, d)
            v = _linear(x, layer["wv"], layer.get("bv")).view(-1, kv_heads, d)
            q, k = self._rope(q, query), self._rope(k, query)
            fresh.keys.append(k)
            fresh.values.append(v)
            if cache is None:
                keys, values = k, v
            else:
                keys, values = cache.keys[n].clone(), cache.values[n].clone()
                own = query if focus is None else query[focus.fresh]
                rows = slice(None) if focus is None else focus.fresh
                keys[own], values[own] = k[rows], v[rows]
            allowed = None
            if focus is not None and n >= focus.dense_layers:
                allowed = _focus_keys(q, keys, focus, sinks, total)
            if sparse_dllm is not None and sparse_dllm.kept is None:
                sparse_dllm.found = (sparse_dllm.found or []) + [
                    _sparse_dllm_keep(q, keys, sparse_dllm)
                ]
            elif sparse_dllm is not None:
                allowed = torch.zeros(total, dtype=torch.bool)
                allowed[sparse_dllm.kept[n]] = True
                allowed[sparse_dllm.start : sparse_dllm.end] = True
            if sparsed is not None and sparsed.masks is None:
                sparsed.found = (sparsed.found or []) + [_sparsed_pattern(q, keys, sparsed, cfg)]
            elif sparsed is not None:
                allowed = _expand_pattern(sparsed.masks[n], sparsed.block_size, total)
            attn, mass = _attention(q, keys, values, allowed)
            if focus is not None and n == focus.dense_layers - 1:
                sinks = _sinks(mass, focus)
            h = h + _linear(attn.reshape(-1, heads * d), layer["wo"])
            x = self._rms_norm(h, layer["mlp_norm"])
            gate = torch.nn.functional.silu(_linear(x, layer["w_gate"]))
            h = h + _linear(gate * _linear(x, layer["w_up"]), layer["w_down"])
        h = self._rms_norm(h, self.final_norm)
        logits = _linear(h, self.lm_head)[:, : cfg.vocab_size]
        return logits, fresh

    def empty_cache(self, total: int) -> KVCache:
        cfg = self.config
        shape = (total, cfg.num_kv_heads, cfg.head_dim)
        return KVCache(
            [torch.zeros(shape, dtype=self.dtype) for _ in range(cfg.num_layers)],
            [torch.zeros(shape, dtype=self.dtype) for _ in range(cfg.num_layers)],
        )


def _eos_token_ids(model_dir: Path, raw_config: dict) -> set[int]:
    """The ids that end an output, as vLLM reads them (generation_config.json first)."""
    generation = model_dir / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None
    if eos is None:
        eos = raw_config.get("eos_token_id")
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    out = x @ weight.T
    return out if bias is None else out + bias


# Queries per chunk of the attention: [heads, rows, keys] scores stay within this many
# elements (512 MB in float32), so a 32K-token forward fits in memory.
ATTENTION_CHUNK_ELEMENTS = 1 << 27


def _attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over every key, or the `allowed` ones (bool [T], or [H, Q, T] per
    head and query).

    q [Q, H, D], keys/values [T, Hkv, D] -> output [Q, H, D] and the attention mass each key
    receives, summed over heads and queries [T]. Long queries run in chunks of rows (each
    row's softmax is whole either way).
    """
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    rows = max(1, ATTENTION_CHUNK_ELEMENTS // (q.shape[1] * keys.shape[0]))
    outputs, mass = [], None
    for start in range(0, q.shape[0], rows):
        chunk = q[start : start + rows]
        scores = torch.einsum("qhd,khd->hqk", chunk, keys) / math.sqrt(q.shape[-1])
        if allowed is not None:
            rule = allowed if allowed.dim() == 1 else allowed[:, start : start + rows]
            scores = scores.masked_fill(~rule, float("-inf"))
        probs = scores.softmax(-1)
        outputs.append(torch.einsum("hqk,khd->qhd", probs, values))
        part = probs.sum((0, 1))
        mass = part if mass is None else mass + part
    return torch.cat(outputs), mass


def _best(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` highest scores, ties to the lower index (written out here, not
    shared with the engine)."""
    values = scores.tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:count]


def _sinks(mass: torch.Tensor, focus: FocusForward) -> torch.Tensor:
    """The prompt keys receiving the most attention mass from the step's queries."""
    return torch.tensor(_best(mass[: focus.prompt_len], focus.num_sinks), dtype=torch.long)


def _focus_keys(
    q: torch.Tensor, keys: torch.Tensor, focus: FocusForward, sinks: torch.Tensor, total: int
) -> torch.Tensor:
    """Keys a sparse layer attends: the top prompt blocks by F's scores against each block's
    mean key, the sinks, and every response position. Returns bool [T]."""
    size, length = focus.prompt_block_size, focus.prompt_len
    group = q.shape[1] // keys.shape[1]
    queries = q[focus.focus_rows]  # [F, H, D]
    scores = []
    for block in range(-(-length // size)):
        representative = keys[block * size : min((block + 1) * size, length)].mean(0)
        representative = representative.repeat_interleave(group, dim=0)  # [H, D]
        scores.append((queries * representative).sum() / math.sqrt(q.shape[-1]))
    allowed = torch.zeros(total, dtype=torch.bool)
    for block in _best(torch.stack(scores), focus.kept_blocks):
        allowed[block * size : min((block + 1) * size, length)] = True
    allowed[sinks] = True
    allowed[length:] = True
    return allowed


def _sparse_dllm_keep(q: torch.Tensor, keys: torch.Tensor, rule: SparseDllmForward) -> torch.Tensor:
    """Sparse-dLLM's kept keys at one layer of a full forward (q: every position, in order):
    each position outside the block scored by the block queries' mean dotted with its key,
    averaged over heads; max-pooled over the outside positions in order, -inf beyond the
    ends; the top int(N x keep_ratio), ties to the lower position. Ascending positions."""
    total = keys.shape[0]
    group = q.shape[1] // keys.shape[1]
    outside = torch.cat([torch.arange(rule.start), torch.arange(rule.end, total)])
    mean_query = q[rule.start : rule.end].float().mean(0)  # [H, D]
    outside_keys = keys[outside].float().repeat_interleave(group, dim=1)  # [N, H, D]
    importance = (outside_keys * mean_query).sum(-1).mean(-1)  # [N]
    half = rule.kernel // 2
    padded = torch.cat(
        [torch.full((half,), float("-inf")), importance, torch.full((half,), float("-inf"))]
    )
    count = importance.numel()
    pooled = torch.stack([padded[j : j + count] for j in range(rule.kernel)]).max(0).values
    keep = int(count * rule.keep_ratio)
    return outside[sorted(_best(pooled, keep))]


def _sparsed_pattern(
    q: torch.Tensor, keys: torch.Tensor, rule: SparsedForward, cfg: ReferenceConfig
) -> torch.Tensor:
    """SparseD's block pattern at one layer of a dense forward over the whole sequence: per
    head and query block, the key blocks whose tiles of softmax weight have the highest mean
    (int(n x select) + 1 of the n), then the generation's blocks chosen again by a softmax
    over them alone, with their own budget. LLaDA's softmax here is scaled by
    1/sqrt(num_heads), as its published copy has it; Dream's by 1/sqrt(head_dim)."""
    total, heads = q.shape[0], q.shape[1]
    size = rule.block_size
    n = math.ceil(total / size)
    last = next(i for i in range(n) if total - i * size <= rule.gen_length or i == n - 1)
    divisor = cfg.num_heads if cfg.family == "llada" else cfg.head_dim
    expanded = keys.float().repeat_interleave(heads // keys.shape[1], dim=1)
    pattern = torch.zeros(heads, n, n, dtype=torch.bool)

    def tile_means(weights: torch.Tensor) -> torch.Tensor:
        # weights [rows, keys]; tiles of size x size, zeros where missing
        count = math.ceil(weights.shape[1] / size)
        means = torch.zeros(count)
        for j in range(count):
            means[j] = weights[:, j * size : (j + 1) * size].sum() / (size * size)
        return means

    for i in range(n):
        rows = q[i * size : (i + 1) * size].float()
        for h in range(heads):
            scores = rows[:, h] @ expanded[:, h].T / math.sqrt(divisor)
            everywhere = tile_means(scores.softmax(-1))
            for j in _best(everywhere, int(n * rule.select) + 1):
                if j < last:
                    pattern[h, i, j] = True
            generation = tile_means(scores[:, last * size :].softmax(-1))
            for j in _best(generation, int((n - last) * rule.select) + 1):
                pattern[h, i, last + j] = True
    return pattern


def _expand_pattern(pattern: torch.Tensor, size: int, total: int) -> torch.Tensor:
    """A [heads, blocks, blocks] block pattern as per-position permissions [heads, T, T]."""
    grown = pattern.repeat_interleave(size, dim=1).repeat_interleave(size, dim=2)
    return grown[:, :total, :total]
