"""Diffusion decoding settings: names, defaults, allowed values, and the per-request plan.

Pure Python (no torch, no vLLM) so that the server can validate settings at startup and per
request, and the reference decoder and the engine read one definition. docs/design.md §3 is the
meaning of every field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

SCHEDULES = ("llada", "dream")
CONFIDENCE_KINDS = ("low_confidence", "maskgit_plus", "entropy", "margin", "topk_margin", "random")
# Kinds whose score is a probability-like number in [0, 1], comparable with a threshold.
THRESHOLD_KINDS = ("low_confidence", "maskgit_plus", "margin", "topk_margin", "random")
CACHE_MODES = ("none", "prefix", "dual")
REFRESH_POLICIES = ("block", "prefill")
# Sparse attention methods served under the FOCUS backend (docs/design.md §3).
METHODS = ("focus", "sparse_dllm", "sparsed")
MAX_BLOCK_LENGTH = 4096
DREAM_EPS = 1e-3


class SettingsError(ValueError):
    """A diffusion setting outside its allowed range; the message names the field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class DiffusionSettings:
    """Server-wide defaults, overridable per request. `None` means "the model's default"."""

    gen_length: int = 256
    block_length: int = 32
    steps: int | None = None
    schedule: str | None = None
    confidence: str | None = None
    threshold: float | None = None
    cache: str = "dual"
    refresh: str = "block"
    # Focus attention (used when the server runs `--attention-backend focus`; docs/design.md §3).
    window: int = 1
    dense_layers: int = 2
    num_sinks: int = 16
    prompt_block_size: int = 64
    keep_ratio: float = 0.1
    min_keep_tokens: int = 256
    min_prompt_len: int = 1024
    # Which sparse method the FOCUS backend runs for the request; Sparse-dLLM's knobs.
    method: str = "focus"
    sparse_dllm_keep_ratio: float = 0.5
    sparse_dllm_kernel: int = 3
    # SparseD's knobs; select and block size None: SparseD's published recipe by prompt
    # length (SparsedPlan.for_prompt).
    sparsed_skip: float = 0.2
    sparsed_select: float | None = None
    sparsed_block_size: int | None = None

    def __post_init__(self) -> None:
        _check_int("gen_length", self.gen_length, 1, None)
        _check_int("block_length", self.block_length, 1, MAX_BLOCK_LENGTH)
        if self.steps is not None:
            _check_int("steps", self.steps, 1, None)
        _check_choice("schedule", self.schedule, SCHEDULES, optional=True)
        _check_choice("confidence", self.confidence, CONFIDENCE_KINDS, optional=True)
        _check_choice("cache", self.cache, CACHE_MODES)
        _check_choice("refresh", self.refresh, REFRESH_POLICIES)
        _check_int("window", self.window, 0, MAX_BLOCK_LENGTH)
        _check_int("dense_layers", self.dense_layers, 1, None)
        _check_int("num_sinks", self.num_sinks, 0, None)
        _check_int("prompt_block_size", self.prompt_block_size, 1, MAX_BLOCK_LENGTH)
        _check_int("min_keep_tokens", self.min_keep_tokens, 0, None)
        _check_int("min_prompt_len", self.min_prompt_len, 0, None)
        _check_ratio("keep_ratio", self.keep_ratio)
        _check_choice("method", self.method, METHODS)
        _check_ratio("sparse_dllm_keep_ratio", self.sparse_dllm_keep_ratio)
        _check_int("sparse_dllm_kernel", self.sparse_dllm_kernel, 1, MAX_BLOCK_LENGTH - 1)
        if self.sparse_dllm_kernel % 2 == 0:
            raise SettingsError(
                f"`sparse_dllm_kernel` (the width of Sparse-dLLM's max-pool over the key "
                f"scores) must be odd, got {self.sparse_dllm_kernel}",
                "sparse_dllm_kernel",
            )
        if isinstance(self.sparsed_skip, bool) or not (
            isinstance(self.sparsed_skip, (int, float)) and 0 <= self.sparsed_skip <= 1
        ):
            raise SettingsError(
                f"`sparsed_skip` (the share of all steps SparseD runs dense before it fixes its "
                f"pattern) must be a number in [0, 1], got {self.sparsed_skip!r}",
                "sparsed_skip",
            )
        if self.sparsed_select is not None and (
            isinstance(self.sparsed_select, bool)
            or not isinstance(self.sparsed_select, (int, float))
            or not 0 < self.sparsed_select < 1
        ):
            raise SettingsError(
                f"`sparsed_select` (the share of key blocks SparseD keeps per query block) must "
                f"be a number in (0, 1), or null for its published recipe, got "
                f"{self.sparsed_select!r}",
                "sparsed_select",
            )
        if self.sparsed_block_size is not None:
            _check_int("sparsed_block_size", self.sparsed_block_size, 1, MAX_BLOCK_LENGTH)
        if self.method == "sparsed" and self.cache != "none":
            raise SettingsError(
                f"`method` 'sparsed' recomputes the whole sequence at every step (SparseD keeps "
                f"no KV cache): `cache` must be 'none' with it, got {self.cache!r}",
                "cache",
            )
        if self.method == "sparse_dllm":
            # Sparse-dLLM's steps after a block's second one compute the block alone over the
            # K/V kept from that step: the dual cache, refreshed at every block.
            for name, value, allowed in (
                ("cache", self.cache, "dual"),
                ("refresh", self.refresh, "block"),
            ):
                if value != allowed:
                    raise SettingsError(
                        f"`method` 'sparse_dllm' keeps, at each block's second step, part of "
                        f"every K/V outside the block and computes the block alone after that "
                        f"(a dual cache refreshed at every block): `{name}` must be "
                        f"{allowed!r} with it, got {value!r}",
                        name,
                    )
        if self.threshold is not None:
            _check_ratio("threshold", self.threshold)
            if self.confidence is not None and self.confidence not in THRESHOLD_KINDS:
                raise SettingsError(
                    f"`threshold` compares a probability-like confidence; `confidence` must be "
                    f"one of {list(THRESHOLD_KINDS)} with it, got {self.confidence!r}",
                    "confidence",
                )

    def updated(self, overrides: dict[str, Any] | None) -> DiffusionSettings:
        """A copy with `overrides` applied; unknown names are rejected, not ignored."""
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise SettingsError(
                f"unknown diffusion setting(s) {unknown}; known settings: {sorted(known)}",
                unknown[0],
            )
        return replace(self, **overrides)

    def plan(self, family: str, max_tokens: int, focus: bool = False) -> DecodePlan:
        """Resolve the model defaults and the canvas size for one request.

        `focus`: whether the server runs the FOCUS backend; the plan then carries the knobs
        of the request's `method` (Focus's, Sparse-dLLM's or SparseD's).
        """
        if family not in ("dream", "llada"):
            raise SettingsError(f"unknown model family {family!r}")
        if self.method != "focus" and not focus:
            raise SettingsError(
                f"`method` {self.method!r} runs in the FOCUS attention backend, which this "
                "server does not use (start it with --attention-backend focus); allowed here: "
                "'focus' (ignored by dense attention)",
                "method",
            )
        _check_int("max_tokens", max_tokens, 1, None)
        block = self.block_length
        gen = -(-min(max_tokens, self.gen_length) // block) * block
        num_blocks = gen // block
        steps = gen if self.steps is None else self.steps
        if steps % num_blocks:
            raise SettingsError(
                f"`steps` ({steps}) must be a multiple of the number of blocks ({num_blocks} = "
                f"generation length {gen} / block_length {block})",
                "steps",
            )
        schedule = self.schedule or ("dream" if family == "dream" else "llada")
        confidence = self.confidence or _default_confidence(schedule, self.threshold)
        return DecodePlan(
            gen_length=gen,
            block_length=block,
            num_blocks=num_blocks,
            steps_per_block=steps // num_blocks,
            schedule=schedule,
            confidence=confidence,
            threshold=None if self.threshold is None else float(self.threshold),
            cache=self.cache,
            refresh=self.refresh,
            focus=self.focus_plan() if focus and self.method == "focus" else None,
            sparse_dllm=self.sparse_dllm_plan() if focus and self.method == "sparse_dllm" else None,
            sparsed=self.sparsed_plan() if focus and self.method == "sparsed" else None,
        )

    def sparsed_plan(self) -> SparsedPlan:
        select = None if self.sparsed_select is None else float(self.sparsed_select)
        return SparsedPlan(float(self.sparsed_skip), select, self.sparsed_block_size)

    def sparse_dllm_plan(self) -> SparseDllmPlan:
        return SparseDllmPlan(float(self.sparse_dllm_keep_ratio), self.sparse_dllm_kernel)

    def focus_plan(self) -> FocusPlan:
        return FocusPlan(
            window=self.window,
            dense_layers=self.dense_layers,
            num_sinks=self.num_sinks,
            prompt_block_size=self.prompt_block_size,
            keep_ratio=float(self.keep_ratio),
            min_keep_tokens=self.min_keep_tokens,
            min_prompt_len=self.min_prompt_len,
        )


@dataclass(frozen=True)
class FocusPlan:
    """Focus attention's knobs for one request (docs/design.md §3, "Focus attention")."""

    window: int
    dense_layers: int
    num_sinks: int
    prompt_block_size: int
    keep_ratio: float
    min_keep_tokens: int
    min_prompt_len: int

    def applies(self, prompt_len: int, cache: str) -> bool:
        """Focus runs on the within-block steps of a cached mode, for long enough prompts."""
        return cache != "none" and prompt_len >= self.min_prompt_len

    def prompt_blocks(self, prompt_len: int) -> int:
        return -(-prompt_len // self.prompt_block_size)

    def kept_blocks(self, prompt_len: int) -> int:
        """Prompt blocks the sparse layers keep: keep_ratio of the prompt, at least
        min_keep_tokens, rounded up to whole blocks, at most all of them."""
        budget = max(math.ceil(self.keep_ratio * prompt_len), self.min_keep_tokens)
        return min(self.prompt_blocks(prompt_len), -(-budget // self.prompt_block_size))


@dataclass(frozen=True)
class SparseDllmPlan:
    """Sparse-dLLM's knobs for one request (docs/design.md §3, "Sparse-dLLM")."""

    keep_ratio: float
    kernel: int

    def kept(self, total: int, block_length: int) -> int:
        """Keys kept of the `total - block_length` outside the block: int(N x keep_ratio)."""
        return int((total - block_length) * self.keep_ratio)


# SparseD's published recipe (INV-WZQ/SparseD README): prompts of 4K tokens and more keep 30%
# of 128-token key blocks, shorter ones 50% of 32-token blocks.
SPARSED_LONG_PROMPT = 4096
SPARSED_RECIPES = {True: (0.3, 128), False: (0.5, 32)}


@dataclass(frozen=True)
class SparsedPlan:
    """SparseD's knobs for one request (docs/design.md §3, "SparseD"); `select` and
    `block_size` None: the published recipe for the prompt's length."""

    skip: float
    select: float | None
    block_size: int | None

    def for_prompt(self, prompt_len: int) -> tuple[float, int]:
        """(select, block_size) in force for a prompt of `prompt_len` tokens."""
        select, size = SPARSED_RECIPES[prompt_len >= SPARSED_LONG_PROMPT]
        return (
            select if self.select is None else self.select,
            size if self.block_size is None else self.block_size,
        )

    def pattern_step(self, total_steps: int) -> int:
        """The step (counted over the whole request, from 0) that fixes the pattern:
        int(total_steps x skip) + 1; it and every earlier step are dense."""
        return int(total_steps * self.skip) + 1

    @staticmethod
    def kept_blocks(num_blocks: int, select: float) -> int:
        """Key blocks one query block keeps of `num_blocks`: int(num_blocks x select) + 1."""
        return int(num_blocks * select) + 1


@dataclass(frozen=True)
class DecodePlan:
    """Everything the decoding loop of one request needs, resolved and validated."""

    gen_length: int
    block_length: int
    num_blocks: int
    steps_per_block: int
    schedule: str
    confidence: str
    threshold: float | None
    cache: str
    refresh: str
    focus: FocusPlan | None = None
    sparse_dllm: SparseDllmPlan | None = None
    sparsed: SparsedPlan | None = None

    @property
    def total_steps(self) -> int:
        return self.steps_per_block * self.num_blocks

    def full_step(self, block_step: int) -> bool:
        """Whether step `block_step` of a block computes every position: a block's first
        step (a refresh, or every step without a cache), and Sparse-dLLM's second one."""
        return (
            self.cache == "none"
            or block_step == 0
            or (self.sparse_dllm is not None and block_step == 1)
        )


def _check_ratio(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise SettingsError(f"`{name}` must be a number in (0, 1], got {value!r}", name)


def _default_confidence(schedule: str, threshold: float | None) -> str:
    if schedule == "llada":
        return "low_confidence"
    # Dream's recommended kind is entropy; Fast-dLLM's threshold decoding uses probabilities.
    return "entropy" if threshold is None else "maskgit_plus"


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
        raise SettingsError(f"`{name}` must be {allowed}, got {value!r}", name)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...], optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise SettingsError(f"`{name}` must be one of {list(allowed)}, got {value!r}", name)
