"""Exponential backoff with jitter, shared by stream handlers and tasks."""

from __future__ import annotations

import random

import msgspec


class Backoff(msgspec.Struct, frozen=True):
    """Exponential backoff: ``base * 2**(attempt - 1)`` seconds, at most ``max``, with jitter.

    Jitter draws the delay uniformly from its upper half, so retries of many failures spread out
    instead of arriving together ("equal jitter")."""

    base: float = 0.1
    max: float = 30.0
    jitter: bool = True

    def delay(self, attempt: int) -> float:
        delay = min(self.base * 2 ** (attempt - 1), self.max)
        return random.uniform(delay / 2, delay) if self.jitter else delay


def exponential(base: float = 0.1, max: float = 30.0, jitter: bool = True) -> Backoff:
    """``riverbed.exponential(base, max, jitter=True)``: seconds before retry n are
    ``base * 2**(n-1)``, capped at ``max``."""
    if base <= 0 or max < base:
        raise ValueError(f"exponential backoff needs 0 < base <= max, got base={base}, max={max}")
    return Backoff(base, max, jitter)
