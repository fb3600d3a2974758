"""Exponential backoff with jitter: one formula for everything that retries after failures.

The n-th failure in a row (n >= 1) waits ``initial * factor**(n-1)``, capped at ``maximum``,
multiplied by a random factor from the ``jitter`` range and capped again. Jitter keeps many
clients (gateways, accounts on one server, outbox items after one outage) from retrying in
lock-step. Users: IMAP reconnects (``1 s .. 300 s``, +-20%) and outbox retries
(``1 s .. 300 s``, times 0.5 .. 1).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

MAX_EXPONENT = 64  # beyond any useful cap, and far from float overflow


@dataclass(frozen=True)
class Backoff:
    """`jitter`: a fraction (0.2 means 80% .. 120%) or an explicit (low, high) factor range."""

    initial: float = 1.0
    maximum: float = 300.0
    factor: float = 2.0
    jitter: float | tuple[float, float] = 0.2

    @property
    def spread(self) -> tuple[float, float]:
        if isinstance(self.jitter, tuple):
            return self.jitter
        return 1 - self.jitter, 1 + self.jitter

    def delay(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the `failures`-th failure in a row."""
        exponent = min(MAX_EXPONENT, max(0, failures - 1))
        base = min(self.maximum, self.initial * self.factor**exponent)
        low, high = self.spread
        return min(self.maximum, base * (low + (high - low) * rand()))
