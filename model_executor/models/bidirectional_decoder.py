"""The transformer shared by Dream and LLaDA, built from vLLM's tensor-parallel layers.

Both are LLaMA-style decoders (RMSNorm, RoPE, GQA/MHA attention, SwiGLU MLP) trained with
bidirectional attention: Dream adds biases on q/k/v; LLaDA has none and a possibly padded
embedding/LM-head width. The attention mask is not decided here: the model runner passes a
non-causal mask in the attention metadata (and the Focus backend ignores causality).

Modules follow vLLM's chain MLP -> Attention -> DecoderLayer -> Model -> top class, so the
parameter tree is `model.layers.N.{self_attn.qkv_proj,self_attn.o_proj,mlp.gate_up_proj,...}`
for both families; `layout.py` maps the published tensor names onto it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from vllm_focus.attention.backend import FocusAttentionBackend, focus_requested
from vllm_focus.model_executor.models.layout import (
    CheckpointError,
    check_checkpoint,
    family_of,
    published_tensor_shapes,
    to_vllm_name,
)


def rope_parameters(config: Any) -> dict[str, Any]:
    """vLLM's `rope_parameters` dict from the published `rope_theta` / `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params["rope_theta"] = config.rope_theta
    return params


class DiffusionMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=False, prefix=f"{prefix}.down_proj"
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(gate_up))
        return x


class DiffusionAttention(nn.Module):
    def __init__(
        self, config: Any, vllm_config: VllmConfig, qkv_bias: bool, prefix: str = ""
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.total_num_heads = config.num_attention_heads
        self.total_num_kv_heads = config.num_key_value_heads
        if self.total_num_heads % tp_size:
            raise ValueError(
                f"tensor_parallel_size {tp_size} must divide the number of attention heads "
                f"({self.total_num_heads})"
            )
        if self.total_num_kv_heads % tp_size and tp_size % self.total_num_kv_heads:
            raise ValueError(
                f"tensor_parallel_size {tp_size} and the number of KV heads "
                f"({self.total_num_kv_heads}) must divide one another"
            )
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = config.hidden_size // self.total_num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            self.total_num_heads,
            self.total_num_kv_heads,
            bias=qkv_bias,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            self.total_num_heads * self.head_dim,
            config.hidden_size,
            bias=False,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            rope_parameters=rope_parameters(config),
        )
        # The CPU platform ignores --attention-backend; the layer is told directly.
        backend = FocusAttentionBackend if focus_requested(vllm_config) else None
        self.attn = Attention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.attn",
            attn_backend=backend,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v))
        return output


class DiffusionDecoderLayer(nn.Module):
    def __init__(
        self, config: Any, vllm_config: VllmConfig, qkv_bias: bool, prefix: str = ""
    ) -> None:
        super().__init__()
        self.self_attn = DiffusionAttention(
            config, vllm_config, qkv_bias, prefix=f"{prefix}.self_attn"
        )
        self.mlp = DiffusionMLP(
            config.hidden_size, config.intermediate_size, prefix=f"{prefix}.mlp"
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(
    dynamic_arg_dims={
        "input_ids": 0,
        "positions": -1,
        "intermediate_tensors": 0,
        "inputs_embeds": 0,
    }
)
class DiffusionDecoderModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", qkv_bias: bool) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(
            embedding_width(config), config.hidden_size, prefix=f"{prefix}.embed_tokens"
        )
        self.layers = nn.ModuleList(
            DiffusionDecoderLayer(config, vllm_config, qkv_bias, prefix=f"{prefix}.layers.{n}")
            for n in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


def embedding_width(config: Any) -> int:
    """Rows of the embedding and LM head: LLaDA may pad them beyond the vocabulary."""
    return getattr(config, "embedding_size", None) or config.vocab_size


class MaskedDiffusionLM(nn.Module):
    """Top class shared by DreamModel and LLaDAModelLM (vLLM's model interface).

    `logits_shift` is 1 when the token at position i is predicted from the hidden state at
    i - 1 (Dream), 0 when from position i itself (LLaDA); the decoding loop applies it.
    """

    logits_shift: ClassVar[int] = 0
    qkv_bias: ClassVar[bool] = False

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.family = family_of(config)
        check_checkpoint(vllm_config.model_config.model, config)
        self.model = DiffusionDecoderModel(
            vllm_config=vllm_config, prefix=_join(prefix, "model"), qkv_bias=self.qkv_bias
        )
        width = embedding_width(config)
        self.lm_head = ParallelLMHead(width, config.hidden_size, prefix=_join(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(width, org_vocab_size=config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Logits over the vocabulary (unshifted; see `logits_shift`)."""
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        expected = published_tensor_shapes(self.config)
        loaded: set[str] = set()
        for name, tensor in weights:
            if name not in expected:
                raise CheckpointError(
                    f"tensor {name!r} is not part of the published {self.family} layout"
                )
            if tuple(tensor.shape) != expected[name]:
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {expected[name]}"
                )
            target, shard = to_vllm_name(self.family, name)
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(target)
        return loaded


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
