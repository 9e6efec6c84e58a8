"""Test helpers for the kernels: paged KV caches built from dense K/V, and the interpreter.

Kernel tests run the Triton kernels through the interpreter on CPU (compiled where a GPU is)
against their torch twins on these random, shuffled paged layouts.
"""

from __future__ import annotations

import importlib
import os

import torch

HEAD_DIM = 32
BLOCK_SIZE = 16


def interpreted(module_name: str, function_name: str):
    """The launcher `function_name` of kernels/<module_name>.py.

    Without a GPU it runs in Triton's interpreter, which needs TRITON_INTERPRET=1 in the
    environment before Triton is first imported (tests/conftest.py sets it).
    """
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 before importing triton to run kernels on CPU")
    module = importlib.import_module(f"vllm_focus.kernels.{module_name}")
    return getattr(module, function_name)


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def paged_case(
    seq_lens,
    num_queries,
    num_heads,
    num_kv_heads,
    density,
    seed,
    device="cpu",
    head_dim=HEAD_DIM,
    dtype=torch.float32,
):
    """Dense K/V per request laid into a shuffled paged cache, plus the selected key lists."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-n // BLOCK_SIZE) for n in seq_lens]
    total_blocks = sum(blocks_per_req) + 3
    # The CPU backend's logical view [blocks, kv_heads, block_size, K|V]; the kernel reads it
    # through strided [blocks, block_size, kv_heads, head_dim] views.
    kv = torch.randn(total_blocks, num_kv_heads, BLOCK_SIZE, 2 * head_dim, generator=gen)
    kv = kv.to(device=device, dtype=dtype)
    key_cache = kv[..., :head_dim].permute(0, 2, 1, 3)
    value_cache = kv[..., head_dim:].permute(0, 2, 1, 3)
    order = torch.randperm(total_blocks, generator=gen)
    width = max(blocks_per_req)
    block_table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    used = 0
    for r, count in enumerate(blocks_per_req):
        block_table[r, :count] = order[used : used + count].to(torch.int32)
        used += count
    keys, cu_k = [], [0]
    for n in seq_lens:
        if density == 1.0:
            chosen = torch.arange(n)
        elif density == 0.0:
            chosen = torch.randint(0, n, (1,), generator=gen)  # the least a query can attend
        else:
            chosen = torch.nonzero(torch.rand(n, generator=gen) < density).flatten()
            if chosen.numel() == 0:
                chosen = torch.tensor([n - 1])
        keys.append(chosen)
        cu_k.append(cu_k[-1] + chosen.numel())
    query_req = torch.cat([torch.full((q,), r) for r, q in enumerate(num_queries)])
    q = torch.randn(query_req.numel(), num_heads, head_dim, generator=gen).to(dtype)
    tensors = dict(
        q=q,
        key_cache=key_cache,
        value_cache=value_cache,
        block_table=block_table,
        query_req=query_req.to(torch.int32),
        key_positions=torch.cat(keys).to(torch.int32),
        cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
    )
    return {k: v.to(device) for k, v in tensors.items()}
