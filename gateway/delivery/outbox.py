"""The outbox worker: delivers durable outbox items (PagerDuty events, mail) with retries.

Items were written in the same transaction as the decision that caused them, so a crash between
decision and delivery only delays delivery (at-least-once; PagerDuty dedups by dedup_key). Per
order key only the oldest pending item is ever in flight, so a resolve never overtakes its
trigger; different keys are delivered concurrently and a slow one holds up no other. Results are
committed in batches, one fsync per batch. Temporary failures back off exponentially with jitter
until `give_up_after`; rejected items become dead letters with the receiver's answer.

Resends are bounded by what is in flight. Each attempt holds a lease (a claim naming this
worker, `lease_owner()`), renewed while the attempt runs, so no other worker (serve, `outbox
flush`) takes the item however long the attempt lasts, and this worker never claims an item
it still has in flight. A worker killed mid-attempt leaves at most its items in flight
(`concurrency` per kind, including those delivered but not yet recorded) to be sent again: a
restarted worker releases the claims of dead workers on this host at once, other claims run
out with their lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from gateway.backoff import Backoff
from gateway.errors import RejectedDeliveryError, StoreError, TemporaryDeliveryError
from gateway.store import OutboxItem, OutboxResult, OutboxStore, StoreThread

log = logging.getLogger(__name__)

# a node that leaves new items to the other nodes (`Dispatcher.leave_new_items`) takes those
# that waited this long: the most a node that is up but stuck can delay a page
LEAVE_NEW_SECONDS = 1.0

Sender = Callable[[OutboxItem], Awaitable[str]]


class Throttle(Protocol):
    """A rate limit applied when items are claimed (`pagerduty.RateBudget`)."""

    held_back: int  # due items the last claim left unclaimed

    def admit(
        self,
        items: list[OutboxItem],
        limit: int | None = None,
        slots: OutboxStore | None = None,
    ) -> list[OutboxItem]:
        """The items that may be sent now; `slots`: the claiming store, whose send slots are
        shared with every other worker of it (every node)."""
        ...

    def wait_seconds(self) -> float: ...


def lease_owner(pid: int | None = None) -> str:
    """How a worker names itself on its claims: host and process id."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def dead_local_owners(owners: Iterable[str]) -> list[str]:
    """The owners among `owners` that are processes of this host that no longer run (a pid
    reused since only keeps a claim until its lease runs out)."""
    host = socket.gethostname() + ":"
    dead = []
    for owner in owners:
        pid = owner.removeprefix(host)
        if owner.startswith(host) and pid.isdigit() and not _running(int(pid)):
            dead.append(owner)
    return dead


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass(frozen=True)
class RetryPolicy:
    """When to try a failed item again: `Backoff` from `first_delay` up to `max_delay`, times
    random(0.5..1), at least the receiver's Retry-After (up to 4 * max_delay), and no more
    attempts once the item is `give_up_after` seconds old."""

    first_delay: float = 1.0
    max_delay: float = 300.0
    give_up_after: float = 24 * 3600.0

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.first_delay, self.max_delay, factor=2.0, jitter=(0.5, 1.0))

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """`attempts`: the failed attempts before this one (0 after the first failure)."""
        delay = self.backoff.delay(attempts + 1)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_delay * 4))
        return delay


class Dispatcher:
    """Delivers due items of one kind; `wake()` from any thread after adding items."""

    def __init__(
        self,
        store: StoreThread,
        kind: str,
        send: Sender,
        policy: RetryPolicy,
        *,
        concurrency: int = 16,
        lease_seconds: float = 60.0,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
        throttle: Throttle | None = None,
    ) -> None:
        self.store = store
        self.throttle = throttle
        self.kind = kind
        self.send = send
        self.policy = policy
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds  # longer than any one attempt can take
        self.clock = clock
        self.owner = owner or lease_owner()
        self._in_flight: dict[int, asyncio.Task[None]] = {}
        self._results: list[OutboxResult] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = False  # on the loop: look again (new items, a finished attempt, stop)
        self._waiter: asyncio.Future[None] | None = None  # the sleep `_set_wake` ends
        # a wake is on its way and the round that will see it has not begun: later wakes (the
        # decider's, one per batch) need no callback and no write to the loop's self-pipe
        self._woken = False
        # other nodes deliver what is new (`leave_new_items`): this one takes only what waited
        self._leaving_new = False

    def leave_new_items(self, others: bool) -> None:
        """Thread-safe. `others`: other nodes are delivering, and this node is busy deciding
        every node's mail (the decide turn): it leaves them the new items, which their own
        wake-ups bring them at once, and takes only what waited `LEAVE_NEW_SECONDS` (a node
        that is up but stuck delays a page by that much, at most). Spreads the cluster's
        work: the deciding node was the busiest, and with nodes on hosts of their own the
        cluster's rate was its rate."""
        if others == self._leaving_new:
            return
        self._leaving_new = others
        if not others:
            self._signal()  # what was left may be waiting: look now

    def wake(self) -> None:
        """Thread-safe: new items were committed, look now instead of at the next timer."""
        if not self._leaving_new:  # else: other nodes take new items; the timer looks for the rest
            self._signal()

    def _signal(self) -> None:
        if self._woken or self._loop is None:
            return
        self._woken = True  # cleared by the loop before the round whose claim sees the items
        self._loop.call_soon_threadsafe(self._set_wake)

    def _set_wake(self) -> None:
        """On the loop: end the sleep, or skip the next one."""
        self._wake = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _admit(
        self, store: OutboxStore, capacity: int
    ) -> Callable[[list[OutboxItem]], list[OutboxItem]] | None:
        """The claim's rate limit, taking its send slots in the claiming store's transaction."""
        if self.throttle is None:
            return None
        return functools.partial(self.throttle.admit, limit=capacity, slots=store)

    async def run(self, stop: asyncio.Event, max_sleep: float = 5.0) -> None:
        """Deliver until `stop` is set, then let the attempts in flight finish and record them."""
        self._loop = asyncio.get_running_loop()
        stopped = asyncio.ensure_future(stop.wait())  # one waiter for the whole run
        stopped.add_done_callback(lambda _: self._set_wake())
        try:
            await self._release_dead_claims()
            async with self._leases_kept():
                while not stop.is_set():
                    self._wake = self._woken = False
                    try:
                        due = await self._round()
                    except StoreError as exc:  # the database is away (a PostgreSQL restart)
                        log.warning("%s outbox: store unavailable, retrying: %s", self.kind, exc)
                        await asyncio.sleep(1.0)
                        continue
                    except Exception:
                        log.exception("%s outbox: store error, retrying shortly", self.kind)
                        await asyncio.sleep(1.0)
                        continue
                    await self._sleep(stop, max_sleep, due)
                await self._drain()
        finally:
            stopped.cancel()

    async def _round(self) -> float | None:
        """Record the finished attempts and claim the due items that fit, in one store call
        and one transaction; returns when the next head is due if nothing is left in flight
        (else a finishing attempt wakes the loop, and the time is not looked up)."""
        results, self._results = self._results, []
        finished = {result.id for result in results}
        skip = sorted(i for i in self._in_flight if i not in finished)  # never claim our own again
        capacity = self.concurrency - len(skip)
        now, lease, owner, kind = self.clock(), self.lease_seconds, self.owner, self.kind
        if self._leaving_new:  # only items due that long ago; the leases end as usual
            now, lease = now - LEAVE_NEW_SECONDS, lease + LEAVE_NEW_SECONDS

        def record_and_claim(s: OutboxStore) -> tuple[list[OutboxItem], float | None]:
            admit = self._admit(s, capacity) if capacity > 0 else None
            items = s.record_and_claim_outbox(
                results, now, capacity, kind, lease, skip, owner, admit
            )
            idle = not items and not skip
            return items, s.next_outbox_due(kind) if idle else None

        try:
            items, due = await self.store.call(record_and_claim)
        except BaseException:
            self._results[:0] = results  # recorded with the next round, never forgotten
            raise
        for item_id in finished:  # only now may their keys' next items be started
            self._in_flight.pop(item_id, None)
        for item in items:
            self._in_flight[item.id] = asyncio.create_task(self._attempt(item))
        return due

    async def run_until_idle(self, deadline: float) -> None:
        """One-shot commands: try each due item once (a failure waits for its backoff, in
        `serve`), following each key's queue after successes, until the deadline."""
        tried: set[int] = set()
        await self._release_dead_claims()
        async with self._leases_kept():
            while self.clock() < deadline:
                started = await self._start_due(exclude=tried)
                tried.update(self._in_flight)
                if not started and not self._in_flight:
                    if not await self._wait_for_budget(deadline):
                        break
                    continue
                await asyncio.wait(list(self._in_flight.values()), return_when="FIRST_COMPLETED")
                await self._flush()
            await self._drain()

    async def _wait_for_budget(self, deadline: float) -> bool:
        """Due items wait for the rate limit: sleep until a slot frees (False: none wait,
        or not before the deadline)."""
        if self.throttle is None or not self.throttle.held_back:
            return False
        wait = self.throttle.wait_seconds()
        if self.clock() + wait >= deadline:
            return False
        await asyncio.sleep(max(wait, 0.01))
        return True

    async def run_once(self) -> int:
        """Attempt every item that is due now and record the results; returns how many."""
        async with self._leases_kept():
            started = await self._start_due()
            await self._drain()
        return started

    async def _start_due(self, exclude: set[int] | frozenset[int] = frozenset()) -> int:
        capacity = self.concurrency - len(self._in_flight)
        if capacity <= 0:
            return 0
        now, lease, owner = self.clock(), self.lease_seconds, self.owner
        skip = sorted(set(exclude) | set(self._in_flight))  # never claim our own item again
        items = await self.store.call(
            lambda s: s.claim_outbox(
                now, capacity, self.kind, lease, skip, owner, self._admit(s, capacity)
            )
        )
        for item in items:
            self._in_flight[item.id] = asyncio.create_task(self._attempt(item))
        return len(items)

    async def _flush(self) -> None:
        """Commit finished attempts; only then may their keys' next items be started."""
        if not self._results:
            return
        results, self._results = self._results, []
        try:
            await self.store.call(lambda s: s.record_outbox(results, self.owner))
        except BaseException:
            self._results[:0] = results  # recorded with the next flush, never forgotten
            raise
        for result in results:
            self._in_flight.pop(result.id, None)

    async def _drain(self) -> None:
        if self._in_flight:
            await asyncio.gather(*self._in_flight.values())
        await self._flush()

    @contextlib.asynccontextmanager
    async def _leases_kept(self) -> AsyncIterator[None]:
        """Renew the claims of the attempts in flight while the body runs."""
        keeper = asyncio.create_task(self._keep_leases())
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _keep_leases(self) -> None:
        """Every third of the lease, extend it for what is in flight: an attempt that takes
        long (a rate limit, a slow relay, a starved process) keeps its item to itself."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if self._in_flight:
                await self._renew(sorted(self._in_flight))

    async def _renew(self, items: list[int]) -> None:
        until, owner = self.clock() + self.lease_seconds, self.owner
        try:
            await self.store.call(lambda s: s.renew_outbox_leases(items, owner, until))
        except Exception:
            log.exception("%s outbox: could not renew leases; retrying", self.kind)

    async def _release_dead_claims(self) -> None:
        """A worker that died mid-attempt (kill -9, OOM) left claims: make them due now
        instead of when their lease runs out."""
        try:
            owners = await self.store.call(lambda s: s.outbox_lease_owners(self.kind))
            for owner in dead_local_owners(owners):
                await self._release(owner)
        except Exception:  # their leases run out anyway
            log.exception("%s outbox: could not release dead workers' claims", self.kind)

    async def _release(self, owner: str) -> None:
        now = self.clock()
        count = await self.store.call(lambda s: s.release_outbox_leases(owner, now))
        if count:
            log.warning(
                "%s outbox: %d item(s) claimed by %s, which is gone, are due again",
                self.kind,
                count,
                owner,
            )

    async def _sleep(self, stop: asyncio.Event, max_sleep: float, due: float | None) -> None:
        """Until woken (new items, a finished attempt), the next head is due, or `max_sleep`."""
        if self._results or self._wake or stop.is_set():
            return
        if self._leaving_new:  # look again when the next item has waited long enough
            due = None if due is None else due + LEAVE_NEW_SECONDS
            max_sleep = min(max_sleep, LEAVE_NEW_SECONDS / 2)
        timeout = max_sleep if due is None else min(max_sleep, max(0.0, due - self.clock()))
        if self.throttle is not None and self.throttle.held_back:
            # due items wait for the rate limit: look again when a slot frees, not at once
            wait = min(max_sleep, self.throttle.wait_seconds())
            timeout = wait if due is None else max(timeout, wait)
        # a bare future and a timer: no tasks made and cancelled per sleep (two per event)
        assert self._loop is not None
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def _attempt(self, item: OutboxItem) -> None:
        result = await self._deliver(item)
        # appended only now: `_flush` may have swapped the list while we were awaiting
        self._results.append(result)
        self._set_wake()

    async def _deliver(self, item: OutboxItem) -> OutboxResult:
        try:
            response = await self.send(item)
        except TemporaryDeliveryError as exc:
            return self._retry_or_give_up(item, exc)
        except RejectedDeliveryError as exc:
            log.error("%s #%d rejected, dead letter: %s", self.kind, item.id, exc)
            return OutboxResult(item.id, "dead", response=exc.response, error=str(exc))
        except Exception as exc:  # a bug in a sender must not stop the worker
            log.exception("%s #%d: unexpected delivery error", self.kind, item.id)
            return self._retry_or_give_up(item, TemporaryDeliveryError(f"internal error: {exc}"))
        log.info("%s #%d delivered (%s)", self.kind, item.id, item.order_key)
        return OutboxResult(item.id, "done", response=response)

    def _retry_or_give_up(self, item: OutboxItem, exc: TemporaryDeliveryError) -> OutboxResult:
        now = self.clock()
        if now - (item.requeued_at or item.created_at) >= self.policy.give_up_after:
            message = f"gave up after {item.attempts + 1} attempts: {exc}"
            log.error("%s #%d %s", self.kind, item.id, message)
            return OutboxResult(item.id, "dead", error=message)
        delay = self.policy.delay(item.attempts, exc.retry_after)
        log.warning(
            "%s #%d attempt %d failed (%s); retry in %.1fs",
            self.kind,
            item.id,
            item.attempts + 1,
            exc,
            delay,
        )
        return OutboxResult(item.id, "pending", error=str(exc), next_attempt_at=now + delay)
