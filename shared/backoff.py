"""Capped exponential backoff with full jitter (as aiomqtt and AWS describe it)."""

from __future__ import annotations

import random


class Backoff:
    def __init__(
        self, base: float = 0.1, cap: float = 10.0, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0
