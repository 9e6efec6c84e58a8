"""Dream-7B (Dream-org/Dream-v0-*-7B, DiffuCoder): a Qwen2.5-shaped masked diffusion LM.

The token at position i is predicted from the hidden state at i - 1 (`logits_shift = 1`).
"""

from __future__ import annotations

from typing import ClassVar

from vllm_focus.model_executor.models.bidirectional_decoder import MaskedDiffusionLM


class DreamModel(MaskedDiffusionLM):
    logits_shift: ClassVar[int] = 1
    qkv_bias: ClassVar[bool] = True
