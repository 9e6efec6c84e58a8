"""LLaDA-8B, LLaDA-1.5 and UltraLLaDA: OLMo-layout masked diffusion LMs.

The token at position i is predicted from the hidden state at i itself (`logits_shift = 0`).
"""

from __future__ import annotations

from typing import ClassVar

from vllm_focus.model_executor.models.bidirectional_decoder import MaskedDiffusionLM


class LLaDAModelLM(MaskedDiffusionLM):
    logits_shift: ClassVar[int] = 0
    qkv_bias: ClassVar[bool] = False
