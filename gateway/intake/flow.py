"""SMTP intake pacing: when mail arrives faster than it is decided, a new transaction waits.

Postfix's `in_flow_delay` for the gateway. Accepting mail is cheap and deciding it is not; in
a burst the listener would otherwise take mail far faster than the worker decides and pages
it, on the same cores, and build a backlog that every later mail (a new case too) queues
behind. So while more than `in_flow_backlog` accepted jobs wait for a decision, a client's
MAIL FROM is answered only once the backlog is back under the limit, or after
`in_flow_delay_seconds` at most. Nothing is ever refused: a sender just waits a little, as it
does for a busy Postfix, and the CPU that intake no longer takes goes to deciding and paging.

The backlog is the store's count (`SpoolStore.undecided_jobs`, asked on the spool writer's
connection, so on PostgreSQL it is the cluster's backlog), plus the mails this listener
accepted since it asked: an upper bound that needs no question while it stays under the
limit (at a steady rate, one question per `backlog` mails or per `MAX_AGE_SECONDS`). Over the
limit the count is asked again when, at the rate the last questions saw mail decided, the
backlog should be under it (every 5 to 100 ms), one question shared by every session: with
PostgreSQL each is a round trip, and several nodes ask.

When a wait runs out, pacing stops until the backlog has been seen under the limit again, and
a warning says why: nothing was decided (the worker is down or restarting: pacing would only
slow intake for nothing), or the backlog is more than a delay's worth of work (after an
outage). Either way intake pays one delay, not one per mail.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_AGE_SECONDS = 1.0  # other nodes and IMAP accept mail too: ask at least this often
POLL_SECONDS = 0.005  # the shortest time between questions while mail waits
MAX_POLL_SECONDS = 0.1  # the longest (a slow or stalled decider)
LOG_EVERY_SECONDS = 60.0  # one "paced" line per minute of pacing, not one per mail


@dataclass
class PacingCounts:
    """Since start, for `/metrics`."""

    paced: int = 0  # transactions that waited
    waited_seconds: float = 0.0
    timed_out: int = 0  # waits that ran out (pacing then paused until the backlog fell)


class IntakePacing:
    """`admit()` before each new transaction; see the module docstring."""

    def __init__(
        self,
        undecided: Callable[[], Awaitable[int]],
        *,
        backlog: int,
        max_delay: float,
    ) -> None:
        self._undecided = undecided
        self.backlog_limit = backlog
        self.max_delay = max_delay
        self.counts = PacingCounts()
        self._backlog = 0
        self._accepted_since = 0  # mails accepted here since the last question was asked
        self._rate = 0.0  # mails decided per second, as the last questions saw it
        self._decided = 0  # mails seen decided between questions, since start
        self._asked_at = float("-inf")
        self._question: asyncio.Future[int] | None = None
        self._suspended = False  # a wait ran out: no pacing until the backlog is under the limit
        self._logged_at = float("-inf")

    @property
    def enabled(self) -> bool:
        return self.backlog_limit > 0 and self.max_delay > 0

    async def admit(self) -> float:
        """Wait while the decision backlog is over the limit; the seconds waited."""
        if not self.enabled:
            return 0.0
        fresh = self._now() - self._asked_at < MAX_AGE_SECONDS
        if fresh and (
            self._suspended or self._backlog + self._accepted_since <= self.backlog_limit
        ):
            return 0.0
        if await self._backlog_now() <= self.backlog_limit or self._suspended:
            return 0.0  # (suspended: asked once a second, to see the backlog fall)
        return await self._wait()

    def accepted(self) -> None:
        """One more mail in the spool (the upper bound grows until the next question)."""
        self._accepted_since += 1

    async def _wait(self) -> float:
        start = self._now()
        deadline = start + self.max_delay
        if start - self._logged_at >= LOG_EVERY_SECONDS:
            self._logged_at = start
            log.info(
                "smtp intake paced: %d mails wait for a decision (in_flow_backlog %d);"
                " %d transactions paced since start",
                self._backlog,
                self.backlog_limit,
                self.counts.paced,
            )
        decided_before = self._decided
        while not self._suspended:
            await asyncio.sleep(min(self._poll_delay(), max(deadline - self._now(), 0.0)))
            if await self._backlog_now() <= self.backlog_limit:
                break
            if self._now() >= deadline:
                self._suspend(progressed=self._decided > decided_before)
                break
        waited = self._now() - start
        self.counts.paced += 1
        self.counts.waited_seconds += waited
        return waited

    def _suspend(self, progressed: bool) -> None:
        """A wait ran out: say truthfully why, and pace no more until the backlog falls."""
        if self._suspended:
            return
        self._suspended = True
        self.counts.timed_out += 1
        if progressed:
            why = (
                f"{self._backlog} mails wait for a decision, more than"
                f" {self.max_delay:g} s of work at the current rate"
            )
        else:
            why = (
                f"nothing was decided for {self.max_delay:g} s while {self._backlog} mails"
                " waited (is the worker running?)"
            )
        log.warning(
            "smtp intake pacing paused: %s; mail is accepted at full speed until fewer than"
            " %d wait",
            why,
            self.backlog_limit + 1,
        )

    def _poll_delay(self) -> float:
        """When the backlog should be under the limit at the rate mail is being decided."""
        if self._rate <= 0:
            return MAX_POLL_SECONDS
        excess = self._backlog - self.backlog_limit
        return min(max(excess / self._rate, POLL_SECONDS), MAX_POLL_SECONDS)

    async def _backlog_now(self) -> int:
        """The store's backlog, asked again when older than `POLL_SECONDS` (one question for
        everyone waiting)."""
        if self._question is None and self._now() - self._asked_at >= POLL_SECONDS:
            expected = self._backlog + self._accepted_since  # if nothing were decided meanwhile
            self._accepted_since = 0
            self._question = asyncio.ensure_future(self._ask(expected))
        if self._question is not None:
            await asyncio.shield(self._question)
        return self._backlog

    async def _ask(self, expected: int) -> int:
        previous = self._asked_at
        try:
            self._backlog = await asyncio.wait_for(self._undecided(), self.max_delay)
        except Exception as exc:  # the store's trouble shows at the commit (451), not here
            log.debug("smtp intake pacing: backlog unknown: %s", exc)
            self._backlog = 0  # (and no rate learnt from it)
        else:
            self._note_rate(max(expected - self._backlog, 0), self._now() - previous)
        finally:
            self._asked_at = self._now()
            self._question = None
        if self._suspended and self._backlog <= self.backlog_limit:
            self._suspended = False
            log.info("smtp intake pacing resumed: the backlog is under %d", self.backlog_limit)
        return self._backlog

    def _note_rate(self, decided: int, seconds: float) -> None:
        self._decided += decided
        if 0 < seconds < MAX_AGE_SECONDS:  # (the first question, or one after a quiet spell)
            sample = decided / seconds
            self._rate = sample if self._rate <= 0 else (self._rate + sample) / 2

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()
