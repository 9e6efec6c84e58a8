"""Block means cached per request and version of its prompt K/V (both op sets use it).

A within-block step leaves a request's prompt K/V as they are; the runner bumps the version
whenever a step rewrites prompt positions (a `block` refresh), so each layer computes a
request's block means once per version and every within-block step reuses them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (key cache, block table, request row, prompt length, prompt block size) -> [blocks, Hkv, D]
Compute = Callable[[torch.Tensor, torch.Tensor, int, int, int], torch.Tensor]


class BlockMeansCache:
    def __init__(self, compute: Compute) -> None:
        self._compute = compute
        self._entries: dict[str, tuple[int, int, torch.Tensor]] = {}

    def forget_finished(self, batch) -> None:
        live = {req_id for req_id, _ in batch.prompt_keys}
        for req_id in [k for k in self._entries if k not in live]:
            del self._entries[req_id]

    def get(self, keys: torch.Tensor, meta, r: int) -> torch.Tensor:
        """Request r's block means at this layer, computed if its prompt K/V changed."""
        batch = meta.focus
        req_id, version = batch.prompt_keys[r]
        size = batch.plans[r].prompt_block_size
        cached = self._entries.get(req_id)
        if cached is None or cached[:2] != (version, size):
            means = self._compute(keys, meta.block_table, r, batch.prompt_lens[r], size)
            cached = self._entries[req_id] = (version, size, means)
        return cached[2]
