"""Run a plugin model class inside one process: real vLLM layers, real attention kernels.

The engine adds scheduling, processes and sampling on top of the same forward; tests that
only need "logits of these positions" use this instead of starting an engine (~40 s). It
builds the VllmConfig the engine would build, loads the checkpoint with vLLM's loader,
allocates a paged KV cache per attention layer and runs a forward under vLLM's forward
context with attention metadata from the layer's own backend builder.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import torch


@dataclass
class Forward:
    """One sequence's query: `positions` [Q] of `token_ids`, keys over its first `seq_len`."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    seq_len: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class InProcessModel:
    """A vLLM model built and loaded in this process (tensor-parallel size 1)."""

    def __init__(
        self, model_dir: str, max_model_len: int = 2048, block_size: int = 32, **engine_kwargs
    ) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.distributed import (
            ensure_model_parallel_initialized,
            init_distributed_environment,
        )
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.model_loader import get_model
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # The CPU worker's own stand-ins for torch.cuda/accelerator calls.
            import vllm.v1.worker.cpu.shm  # noqa: F401

        # Eager on purpose: this builds the model class alone, without the engine's warm-up
        # that compiles it, to compare single forwards with the reference; the compiled model
        # is what the engine tests run (test_llm_generate.py compares it with eager).
        args = EngineArgs(
            model=model_dir,
            dtype="float32",
            enforce_eager=True,
            max_model_len=max_model_len,
            block_size=block_size,
            **engine_kwargs,
        )
        self.vllm_config = args.create_engine_config()
        self.block_size = block_size
        with set_current_vllm_config(self.vllm_config):
            init_distributed_environment(
                world_size=1,
                rank=0,
                local_rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                backend="gloo",
            )
            ensure_model_parallel_initialized(1, 1)
            self.model = get_model(vllm_config=self.vllm_config)
        self._bind_kv_caches(num_blocks=max_model_len // block_size + 1)

    def _bind_kv_caches(self, num_blocks: int) -> None:
        from vllm.model_executor.layers.attention import Attention

        context = self.vllm_config.compilation_config.static_forward_context
        self.layers = {n: m for n, m in context.items() if isinstance(m, Attention)}
        self.builders = {}
        for name, layer in self.layers.items():
            spec = layer.get_kv_cache_spec(self.vllm_config)
            backend = layer.get_attn_backend()
            # vLLM 0.32's logical per-layer view: [blocks, kv_heads, block_size, K|V].
            shape = (num_blocks, spec.num_kv_heads, self.block_size, 2 * spec.head_size)
            layer.bind_kv_cache(torch.zeros(shape, dtype=torch.float32))
            builder_cls = backend.get_builder_cls()
            self.builders[name] = builder_cls(spec, [name], self.vllm_config, torch.device("cpu"))

    def logits(self, forward: Forward) -> torch.Tensor:
        """Logits [Q, vocab] of the query positions; attention is non-causal over the keys.

        Blocks are assigned in order (block i of the sequence = cache block i), so K/V written
        by earlier calls for positions outside this query stay readable.
        """
        from vllm.config import set_current_vllm_config
        from vllm.forward_context import set_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata

        num_q = forward.positions.numel()
        num_blocks = -(-forward.seq_len // self.block_size)
        block_table = torch.arange(num_blocks, dtype=torch.int32)[None, :]
        slot_mapping = forward.positions.to(torch.int64)
        query_start_loc = torch.tensor([0, num_q], dtype=torch.int32)
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc,
            query_start_loc_cpu=query_start_loc,
            seq_lens=torch.tensor([forward.seq_len], dtype=torch.int32),
            num_reqs=1,
            num_actual_tokens=num_q,
            max_query_len=num_q,
            max_seq_len=forward.seq_len,
            block_table_tensor=block_table,
            slot_mapping=slot_mapping,
            causal=False,
            positions=forward.positions,
        )
        metadata = {name: b.build(0, common) for name, b in self.builders.items()}
        slots = dict.fromkeys(self.layers, slot_mapping)
        with set_current_vllm_config(self.vllm_config), torch.inference_mode():
            with set_forward_context(metadata, self.vllm_config, slot_mapping=slots):
                hidden = self.model(
                    input_ids=forward.token_ids[forward.positions],
                    positions=forward.positions,
                )
            return self.model.compute_logits(hidden)
