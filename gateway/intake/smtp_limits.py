"""Per-client limits of the SMTP listener, and the record of what they refused.

A public listener meets clients that guess passwords or hold connections open to starve
everyone else. The listener keeps, across sessions:

* `AuthThrottle`: failed AUTH attempts per client address. Each failure is answered after a
  growing delay; `max_failures` within `lockout_seconds` lock the address out of AUTH for
  `lockout_seconds` (454 4.7.0 at AUTH, 421 4.7.0 at connect when AUTH is required), without
  checking the password at all, so guessing stops and costs no hashing;
* `Refusals`: a count per reason, read by `/metrics`, and one warning per refusal with the
  peer, at most `burst` lines a minute so that a flood cannot flood the log.

Clients are keyed by `client_key`: the IPv4 address, or the /64 network of an IPv6 address
(one host usually holds a whole /64, so counting single IPv6 addresses would count nothing).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.intake.smtp_handler import format_peer

log = logging.getLogger(__name__)

REFUSAL_REASONS = (
    "too_many_connections",  # over max_connections
    "too_many_from_address",  # over max_unauthenticated_per_ip
    "auth_failed",  # wrong user or password (535)
    "auth_locked_out",  # AUTH refused while the address is locked out (454 / 421)
    "session_lifetime",  # the session reached max_session_seconds (421)
    "shutting_down",  # a connection while the listener closes (421)
)


def client_key(peer: Any) -> str:
    """The address a limit counts by: IPv4 as it is, IPv6 by its /64, others as text."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host or "")
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return f"{ipaddress.IPv6Address(int(address) >> 64 << 64)}/64"
    return str(address)


# -- failed AUTH per client ---------------------------------------------------------------------


@dataclass(frozen=True)
class Penalty:
    """What one failed AUTH costs: the delay before its 535, and whether it locked the address."""

    delay: float
    failures: int  # inside the window, this one included
    locked: bool


@dataclass
class _Failures:
    times: deque[float] = field(default_factory=deque)  # failures inside the window
    locked_until: float = 0.0


class AuthThrottle:
    """Failed AUTH attempts per client address: a growing delay, then a lockout.

    The delay after the n-th failure in the window is `max_delay` * 2^(n-4), capped at
    `max_delay` (0.25 s, 0.5 s, 1 s, 2 s, 2 s ... for the default 2 s): a typo costs a
    moment, a guessing run costs seconds per guess even over many parallel sessions.
    """

    MAX_CLIENTS = 50_000  # the least recently failing addresses are forgotten beyond this

    def __init__(
        self,
        *,
        max_failures: int,
        lockout_seconds: float,
        max_delay: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self.max_delay = max_delay
        self.clock = clock
        self._clients: OrderedDict[str, _Failures] = OrderedDict()

    def locked_for(self, client: str) -> float:
        """Seconds the client is still locked out of AUTH; 0 when it may try."""
        entry = self._clients.get(client)
        if entry is None:
            return 0.0
        return max(0.0, entry.locked_until - self.clock())

    def failed(self, client: str) -> Penalty:
        """Record a failure and say what it costs. The failure that reaches `max_failures`
        locks the client out (see `locked_for`)."""
        now = self.clock()
        entry = self._entry(client)
        while entry.times and now - entry.times[0] >= self.lockout_seconds:
            entry.times.popleft()
        entry.times.append(now)
        count = len(entry.times)
        locked = count >= self.max_failures
        if locked:
            entry.locked_until = now + self.lockout_seconds
            entry.times.clear()  # after the lockout, a fresh start
        delay = min(self.max_delay, self.max_delay * 2.0 ** (count - 4))
        return Penalty(delay, count, locked)

    def failures(self, client: str) -> int:
        """Failures inside the window."""
        entry = self._clients.get(client)
        return len(entry.times) if entry else 0

    def _entry(self, client: str) -> _Failures:
        entry = self._clients.pop(client, None) or _Failures()
        self._clients[client] = entry  # most recent last
        while len(self._clients) > self.MAX_CLIENTS:
            self._clients.popitem(last=False)
        return entry


# -- refusals: counted and logged ---------------------------------------------------------------


class Refusals:
    """Refusals by reason (for `/metrics`) and their log lines, rate-limited.

    Every refusal is counted; each is logged as one warning line with the peer until `burst`
    lines were written in the current minute. The next line after that says how many were
    left out.
    """

    def __init__(
        self,
        *,
        burst: int = 20,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._window_start = -interval
        self._logged = 0
        self._left_out = 0

    def record(self, reason: str, peer: Any, text: str) -> None:
        """Count one refusal and log it (`text` says what was refused and how)."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = self.clock()
        if now - self._window_start >= self.interval:
            self._window_start, self._logged = now, 0
        if self._logged >= self.burst:
            self._left_out += 1
            return
        self._logged += 1
        note = f" ({self._left_out} more refusals not logged)" if self._left_out else ""
        self._left_out = 0
        log.warning("smtp %s: %s%s", format_peer(peer), text, note)
