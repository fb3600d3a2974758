"""The delivery loop's cost per event (issue 12, perf3): one store call and one write
transaction per round (record the finished attempts and claim the next), no look-up of the next
due time while attempts are in flight, no busy loop over items waiting behind their key's head,
and one callback for the decider's many wakes before a round.

Counts, not times: store calls made by the dispatcher and BEGINs seen by the SQLite connection.
Real SQLite files; the sender is a coroutine (tests/test_outbox_leases.py's `CountingSender`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.delivery.outbox import LEAVE_NEW_SECONDS, Dispatcher, RetryPolicy
from gateway.store import OutboxResult, StoreThread, open_store
from tests.test_outbox_leases import CountingSender, queue

FAST = RetryPolicy(first_delay=0.01, max_delay=0.05)


class CountedStore(StoreThread):
    """A store thread that counts the calls made to it and the transactions begun on it."""

    calls = 0
    statements: list[str]

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        self.calls += 1
        return await super().call(fn)

    async def trace(self) -> None:
        self.statements = []
        await super().call(lambda s: s.conn.set_trace_callback(self.statements.append))

    def begins(self) -> int:
        return sum(1 for s in self.statements if s.startswith("BEGIN"))


async def _wait_for(done: Callable[[], Any], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not await done() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def test_a_delivered_event_costs_two_store_calls_and_two_transactions(tmp_path: Path) -> None:
    """At a steady rate each event is alone: it used to cost six store calls (a claim, a claim
    that found nothing, the due time, the record, another empty claim, the due time again) and
    four write transactions; now the claim, then the record with the (empty) next claim."""
    db = tmp_path / "g.sqlite3"
    queue(db)  # creates the schema
    sender = CountingSender()
    events = 10

    async def run() -> tuple[int, int]:
        store = CountedStore(db)  # the dispatcher's; the test queues and looks through `mine`
        mine = StoreThread(db, "test")
        dispatcher = Dispatcher(store, "pagerduty", sender, FAST)
        stop = asyncio.Event()
        running = asyncio.create_task(dispatcher.run(stop, max_sleep=5.0))
        await asyncio.sleep(0.1)  # the first round found nothing; the loop sleeps
        await store.trace()
        calls = store.calls
        for n in range(events):
            await mine.call(lambda s, n=n: _add(s, f"k{n}"))
            dispatcher.wake()

            async def delivered(n: int = n) -> bool:
                done = await mine.call(lambda s: s.outbox(("done",)))
                return len(done) == n + 1 and not _busy(dispatcher)

            await _wait_for(delivered)
            await asyncio.sleep(0.02)  # the loop is asleep again
        counts = store.calls - calls, store.begins()
        stop.set()
        await running
        store.close()
        mine.close()
        return counts

    calls, begins = asyncio.run(run())
    assert sum(sender.sent.values()) == events
    assert calls <= 2 * events + 2, f"{calls} store calls for {events} events"
    assert begins <= 2 * events + 2, f"{begins} write transactions for {events} events"


def _add(s: Any, key: str) -> int:
    with s.transaction():
        return s.add_outbox("pagerduty", "s", key, {"event_action": "trigger"}, None)


def _busy(dispatcher: Dispatcher) -> bool:
    return bool(dispatcher._in_flight or dispatcher._results)


def _calls_while(tmp_path: Path, sender: CountingSender, setup: Callable[[Path], None]) -> int:
    """Store calls the dispatcher makes in its first 0.5 s over what `setup` queued."""
    db = tmp_path / "g.sqlite3"
    setup(db)

    async def run() -> int:
        store = CountedStore(db)
        dispatcher = Dispatcher(store, "pagerduty", sender, FAST)
        stop = asyncio.Event()
        running = asyncio.create_task(dispatcher.run(stop, max_sleep=5.0))
        await asyncio.sleep(0.5)
        calls = store.calls
        stop.set()
        await running
        store.close()
        return calls

    return asyncio.run(run())


def test_an_item_behind_an_attempt_in_flight_does_not_spin_the_loop(tmp_path: Path) -> None:
    """A resolve queued behind its trigger's attempt used to make the due time "now": the loop
    claimed nothing and asked the time again, hundreds of times a second, until the attempt
    ended."""
    sender = CountingSender(slow={"k"}, slow_seconds=2.0)
    calls = _calls_while(tmp_path, sender, lambda db: queue(db, "k", "k"))
    assert calls <= 3, f"{calls} store calls while one attempt was in flight"


def test_an_item_behind_a_retrying_head_does_not_spin_the_loop(tmp_path: Path) -> None:
    """Nothing in flight, the key's head waits an hour for its retry: its follower is not due
    either, so the loop sleeps (it used to wake at once, again and again)."""

    def retrying_head_with_a_follower(db: Path) -> None:
        head, _follower = queue(db, "k", "k")
        store = open_store(db)
        later = time.time() + 3600
        store.record_outbox([OutboxResult(head, "pending", error="503", next_attempt_at=later)])
        store.close()

    calls = _calls_while(tmp_path, CountingSender(), retrying_head_with_a_follower)
    assert calls <= 2, f"{calls} store calls with nothing due"


def test_wakes_before_the_round_begins_cost_one_callback(tmp_path: Path) -> None:
    """The decider wakes the deliveries after every batch: while a wake is on its way, more
    wakes add no callback (each was a write to the loop's self-pipe and a round)."""
    db = tmp_path / "g.sqlite3"
    queue(db)

    async def run() -> int:
        store = StoreThread(db)
        dispatcher = Dispatcher(store, "pagerduty", CountingSender(), FAST)
        stop = asyncio.Event()
        running = asyncio.create_task(dispatcher.run(stop, max_sleep=5.0))
        await asyncio.sleep(0.2)  # asleep
        loop = asyncio.get_running_loop()
        scheduled: list[object] = []
        real = loop.call_soon_threadsafe

        def counted(callback: Any, *args: Any) -> Any:
            scheduled.append(callback)
            return real(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        for _ in range(50):  # from the loop's own thread: no round can begin in between
            dispatcher.wake()
        await asyncio.sleep(0.1)
        wakes = sum(1 for c in scheduled if c == dispatcher._set_wake)
        loop.call_soon_threadsafe = real  # type: ignore[method-assign]
        stop.set()
        await running
        store.close()
        return wakes

    assert asyncio.run(run()) == 1


def test_a_node_leaving_new_items_to_others_takes_only_what_waited(tmp_path: Path) -> None:
    """The node deciding for the cluster, while other nodes deliver: wakes do not send it
    after new items, its rounds skip items younger than `LEAVE_NEW_SECONDS`, and take them
    once they waited that long (another node that is up but stuck delays a page that much).
    Back on its own, it delivers new items at once again. The clock is the dispatcher's."""
    db = tmp_path / "g.sqlite3"
    (first,) = queue(db, "k1")
    now = [time.time()]

    async def run() -> None:
        store = CountedStore(db)
        mine = StoreThread(db, "test")
        sender = CountingSender()
        dispatcher = Dispatcher(store, "pagerduty", sender, FAST, clock=lambda: now[0])
        dispatcher.leave_new_items(True)
        stop = asyncio.Event()
        running = asyncio.create_task(dispatcher.run(stop, max_sleep=5.0))

        async def looked_three_times() -> bool:
            dispatcher.wake()  # ignored: new items are the other nodes'
            return store.calls >= 3

        await _wait_for(looked_three_times)  # every LEAVE_NEW_SECONDS / 2, not every wake
        assert store.calls >= 3 and sender.sent == {}
        now[0] += LEAVE_NEW_SECONDS + 0.1  # it waited long enough

        async def sent(item: int) -> bool:
            return sender.sent[item] == 1

        await _wait_for(lambda: sent(first))
        assert sender.sent == {first: 1}
        dispatcher.leave_new_items(False)
        second = await mine.call(lambda s: _add(s, "k2"))
        dispatcher.wake()
        await _wait_for(lambda: sent(second))  # the clock stands still: only if not leaving
        assert sender.sent == {first: 1, second: 1}
        stop.set()
        await running
        store.close()
        mine.close()

    asyncio.run(run())
