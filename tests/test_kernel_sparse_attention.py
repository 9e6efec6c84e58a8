"""The sparse paged-attention Triton kernel against its torch twin (Triton interpreter on CPU,
compiled under the `gpu` marker), and at density 1 against dense attention."""

from __future__ import annotations

import contextlib
import importlib
import os

import pytest
import torch

from vllm_focus.kernels.reference import sparse_paged_attention_ref

HEAD_DIM = 32
BLOCK_SIZE = 16


@contextlib.contextmanager
def _interpreter_on_cpu():
    """TRITON_INTERPRET=1 while kernels are defined and launched, where no GPU compiles them;
    restored afterwards so engine processes started by later tests do not inherit it."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _load_kernel():
    with _interpreter_on_cpu():
        import vllm_focus.kernels.sparse_attention as module

        kernel = importlib.reload(module).sparse_paged_attention

    def launch(*args, **kwargs):
        with _interpreter_on_cpu():
            return kernel(*args, **kwargs)

    return launch


def _rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def _case(seq_lens, num_queries, num_heads, num_kv_heads, density, seed, device="cpu"):
    """Dense K/V per request laid into a shuffled paged cache, plus the selected key lists."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-n // BLOCK_SIZE) for n in seq_lens]
    total_blocks = sum(blocks_per_req) + 3
    # The CPU backend's logical view [blocks, kv_heads, block_size, K|V]; the kernel reads it
    # through strided [blocks, block_size, kv_heads, head_dim] views.
    kv = torch.randn(total_blocks, num_kv_heads, BLOCK_SIZE, 2 * HEAD_DIM, generator=gen)
    key_cache = kv[..., :HEAD_DIM].permute(0, 2, 1, 3)
    value_cache = kv[..., HEAD_DIM:].permute(0, 2, 1, 3)
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
    q = torch.randn(query_req.numel(), num_heads, HEAD_DIM, generator=gen)
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


LAYOUTS = [(4, 4), (7, 1), (6, 2)]  # LLaDA-like MHA, Dream-like GQA 7, GQA 3
RAGGED = [([1], [1]), ([63, 200, 15], [3, 1, 15]), ([1000], [2])]


@pytest.mark.parametrize("num_heads, num_kv_heads", LAYOUTS)
@pytest.mark.parametrize("seq_lens, num_queries", RAGGED, ids=["len1", "ragged", "long"])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_kernel_matches_torch_twin(num_heads, num_kv_heads, seq_lens, num_queries, density):
    kernel = _load_kernel()
    case = _case(seq_lens, num_queries, num_heads, num_kv_heads, density, seed=len(seq_lens))
    scale = HEAD_DIM**-0.5
    out = torch.full_like(case["q"], float("nan"))  # a row the kernel skips stays NaN
    got = kernel(**case, scale=scale, out=out)
    want = sparse_paged_attention_ref(**case, scale=scale)
    assert not got.isnan().any()
    assert _rel_rms(got, want) < 1e-5


def test_density_one_equals_dense_attention():
    case = _case([63, 200], [4, 2], 6, 2, 1.0, seed=3)
    scale = HEAD_DIM**-0.5
    got = _load_kernel()(**case, scale=scale)
    # Dense attention from contiguous per-request K/V, without the paged-cache indirection.
    for token in range(case["q"].shape[0]):
        req = int(case["query_req"][token])
        length = [63, 200][req]
        blocks = case["block_table"][req, : -(-length // BLOCK_SIZE)].long()
        keys = case["key_cache"][blocks].reshape(-1, 2, HEAD_DIM)[:length]
        values = case["value_cache"][blocks].reshape(-1, 2, HEAD_DIM)[:length]
        want = torch.nn.functional.scaled_dot_product_attention(
            case["q"][token][:, None, :],
            keys.repeat_interleave(3, dim=1).transpose(0, 1),
            values.repeat_interleave(3, dim=1).transpose(0, 1),
            scale=scale,
        )[:, 0, :]
        assert _rel_rms(got[token], want) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("num_heads, num_kv_heads", [(28, 4), (32, 32)])
def test_kernel_compiled_on_gpu(num_heads, num_kv_heads):
    case = _case([4096, 300], [96, 3], num_heads, num_kv_heads, 0.2, seed=0, device="cuda")
    scale = HEAD_DIM**-0.5
    got = _load_kernel()(**case, scale=scale)
    want = sparse_paged_attention_ref(**{k: v.cpu() for k, v in case.items()}, scale=scale)
    assert _rel_rms(got.cpu(), want) < 1e-4
