"""Diffusion decoding settings: names, defaults, allowed values, and the per-request plan.

Pure Python (no torch, no vLLM) so that the server can validate settings at startup and per
request, and the reference decoder and the engine read one definition. DESIGN.md §3 is the
meaning of every field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

SCHEDULES = ("llada", "dream")
CONFIDENCE_KINDS = ("low_confidence", "maskgit_plus", "entropy", "margin", "topk_margin", "random")
# Kinds whose score is a probability-like number in [0, 1], comparable with a threshold.
THRESHOLD_KINDS = ("low_confidence", "maskgit_plus", "margin", "topk_margin", "random")
CACHE_MODES = ("none", "prefix", "dual")
REFRESH_POLICIES = ("block", "prefill")
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

    def __post_init__(self) -> None:
        _check_int("gen_length", self.gen_length, 1, None)
        _check_int("block_length", self.block_length, 1, MAX_BLOCK_LENGTH)
        if self.steps is not None:
            _check_int("steps", self.steps, 1, None)
        _check_choice("schedule", self.schedule, SCHEDULES, optional=True)
        _check_choice("confidence", self.confidence, CONFIDENCE_KINDS, optional=True)
        _check_choice("cache", self.cache, CACHE_MODES)
        _check_choice("refresh", self.refresh, REFRESH_POLICIES)
        if self.threshold is not None:
            value = self.threshold
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise SettingsError(
                    f"`threshold` must be a number in (0, 1], got {value!r}", "threshold"
                )
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

    def plan(self, family: str, max_tokens: int) -> DecodePlan:
        """Resolve the model defaults and the canvas size for one request."""
        if family not in ("dream", "llada"):
            raise SettingsError(f"unknown model family {family!r}")
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
        )


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
