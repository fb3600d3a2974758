"""The outbox worker: delivers durable outbox items (PagerDuty events, mail) with retries.

Items were written in the same transaction as the decision that caused them, so a crash between
decision and delivery only delays delivery. Per order key only the oldest pending item is ever in
flight, so a resolve never overtakes its trigger. Temporary failures back off exponentially with
jitter until `give_up_after`; rejected items become dead letters with the receiver's answer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.errors import RejectedDeliveryError, TemporaryDeliveryError
from gateway.store import OutboxItem, StoreThread

log = logging.getLogger(__name__)

Sender = Callable[[OutboxItem], Awaitable[str]]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: delay = random(0.5..1) * min(max, first * 2^n)."""

    first_delay: float = 1.0
    max_delay: float = 300.0
    give_up_after: float = 24 * 3600.0

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        backoff = min(self.max_delay, self.first_delay * (2 ** min(attempts, 30)))
        delay = backoff * random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay * 4))
        return delay


class OutboxWorker:
    """Delivers due items of one kind; `wake()` from any thread after adding items."""

    def __init__(
        self,
        store: StoreThread,
        kind: str,
        send: Sender,
        policy: RetryPolicy,
        *,
        concurrency: int = 16,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.kind = kind
        self.send = send
        self.policy = policy
        self.concurrency = concurrency
        self.clock = clock
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Thread-safe: new items were committed, look now instead of at the next timer."""
        if self._loop is not None and self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run_once(self) -> int:
        """Attempt every item that is due now; returns how many were attempted."""
        now = self.clock()
        items = await self.store.call(lambda s: s.due_outbox(now, self.concurrency, self.kind))
        await asyncio.gather(*(self._deliver(item) for item in items))
        return len(items)

    async def run_until_idle(self, deadline: float) -> None:
        """Deliver until nothing is due or the deadline passes (used by one-shot commands)."""
        while self.clock() < deadline and await self.run_once():
            pass

    async def run(self, stop: asyncio.Event, max_sleep: float = 5.0) -> None:
        """Deliver until `stop` is set; sleeps until the next item is due or `wake()`."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        while not stop.is_set():
            self._wake.clear()
            try:
                attempted = await self.run_once()
            except Exception:
                log.exception("%s outbox: store error, retrying shortly", self.kind)
                attempted = 0
                await asyncio.sleep(1.0)
            if attempted:
                continue
            await self._sleep(stop, max_sleep)

    async def _sleep(self, stop: asyncio.Event, max_sleep: float) -> None:
        assert self._wake is not None
        due = await self.store.call(lambda s: s.next_outbox_due(self.kind))
        timeout = max_sleep if due is None else min(max_sleep, max(0.0, due - self.clock()))
        waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _deliver(self, item: OutboxItem) -> None:
        try:
            response = await self.send(item)
        except TemporaryDeliveryError as exc:
            await self._retry_or_give_up(item, exc)
        except RejectedDeliveryError as exc:
            log.error("%s #%d rejected, dead letter: %s", self.kind, item.id, exc)
            error, answer = str(exc), exc.response
            await self.store.call(lambda s: s.outbox_dead(item.id, error, answer))
        except Exception as exc:  # a bug in a sender must not stop the worker
            log.exception("%s #%d: unexpected delivery error", self.kind, item.id)
            await self._retry_or_give_up(item, TemporaryDeliveryError(f"internal error: {exc}"))
        else:
            log.info("%s #%d delivered (%s)", self.kind, item.id, item.order_key)
            await self.store.call(lambda s: s.outbox_done(item.id, response))

    async def _retry_or_give_up(self, item: OutboxItem, exc: TemporaryDeliveryError) -> None:
        now = self.clock()
        if now - item.created_at >= self.policy.give_up_after:
            message = f"gave up after {item.attempts + 1} attempts: {exc}"
            log.error("%s #%d %s", self.kind, item.id, message)
            await self.store.call(lambda s: s.outbox_dead(item.id, message))
            return
        next_at = now + self.policy.delay(item.attempts, exc.retry_after)
        log.warning(
            "%s #%d attempt %d failed (%s); retry in %.1fs",
            self.kind,
            item.id,
            item.attempts + 1,
            exc,
            next_at - now,
        )
        await self.store.call(lambda s: s.outbox_retry(item.id, next_at, str(exc)))
