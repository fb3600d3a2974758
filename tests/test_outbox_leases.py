"""Resends are bounded by what is in flight: leases held while an attempt runs, results never
forgotten, a dead worker's claims released at once.

Real SQLite files; the senders are coroutines that count what they were asked to send.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

from gateway.config import load_config
from gateway.decide.events import build_event
from gateway.delivery.dispatch import Deliveries, pagerduty_transport
from gateway.delivery.outbox import Dispatcher, RetryPolicy, dead_local_owners, lease_owner
from gateway.errors import StoreError
from gateway.store import OutboxItem, StoreThread, open_store
from tests.conftest import write_config
from tests.pdserver import PagerDutyStandIn

FAST = RetryPolicy(first_delay=0.01, max_delay=0.05)


def queue(db: Path, *keys: str) -> list[int]:
    store = open_store(db)
    with store.transaction():
        ids = [
            store.add_outbox(
                "pagerduty", "s", key, {"event_action": "trigger", "dedup_key": key}, None
            )
            for key in keys
        ]
    store.close()
    return ids


class CountingSender:
    """Records every send; items whose key is in `slow` take `slow_seconds`."""

    def __init__(self, slow: set[str] = frozenset(), slow_seconds: float = 0.0) -> None:
        self.sent: collections.Counter[int] = collections.Counter()
        self.slow, self.slow_seconds = slow, slow_seconds

    async def __call__(self, item: OutboxItem) -> str:
        self.sent[item.id] += 1
        if item.order_key in self.slow:
            await asyncio.sleep(self.slow_seconds)
        return "202"


async def deliver_until_done(
    dispatcher: Dispatcher | Deliveries, store: StoreThread, seconds: float
) -> None:
    stop = asyncio.Event()
    if isinstance(dispatcher, Dispatcher):
        running = asyncio.create_task(dispatcher.run(stop, max_sleep=0.02))
    else:
        running = asyncio.create_task(dispatcher.run(stop))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pending, _ = await store.call(lambda s: s.outbox_stats())
        if not pending and not attempts_running():
            break
        await asyncio.sleep(0.02)
    stop.set()
    await running


def attempts_running() -> list[asyncio.Task]:
    """Delivery attempts still under way: an attempt that outlived its lease and was started
    again kept running after its item was recorded, and sent it once more."""
    return [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_attempt"]


def test_an_attempt_that_outlives_its_lease_is_sent_once(tmp_path: Path) -> None:
    """The worker used to claim its own slow item again when the lease ran out (a rate limit,
    a slow relay or a starved worker process is enough): a duplicate with nobody killed."""
    db = tmp_path / "g.sqlite3"
    slow, *others = queue(db, "slow", *(f"k{i}" for i in range(30)))
    sender = CountingSender(slow={"slow"}, slow_seconds=1.0)

    async def run() -> None:
        store = StoreThread(db)
        dispatcher = Dispatcher(store, "pagerduty", sender, FAST, concurrency=4, lease_seconds=0.3)
        await deliver_until_done(dispatcher, store, 10)
        store.close()

    asyncio.run(run())
    assert sender.sent[slow] == 1, f"sent {sender.sent[slow]} times"
    assert all(sender.sent[i] == 1 for i in others)


def test_a_slow_attempt_keeps_its_claim_from_other_workers(tmp_path: Path) -> None:
    """`gateway outbox flush` beside `serve`: the lease is renewed while the attempt runs."""
    db = tmp_path / "g.sqlite3"
    [slow] = queue(db, "slow")
    first = CountingSender(slow={"slow"}, slow_seconds=1.2)
    second = CountingSender()

    async def run() -> None:
        store = StoreThread(db)
        one = Dispatcher(store, "pagerduty", first, FAST, lease_seconds=0.3, owner="host:1")
        two = Dispatcher(store, "pagerduty", second, FAST, lease_seconds=0.3, owner="host:2")
        stop = asyncio.Event()
        running = asyncio.create_task(one.run(stop, max_sleep=0.02))
        await asyncio.sleep(0.1)  # `one` has claimed it
        while first.sent[slow] and not (await store.call(lambda s: s.outbox(("done",)))):
            await two.run_once()  # tries again and again while `one` is still sending
            await asyncio.sleep(0.05)
        stop.set()
        await running
        store.close()

    asyncio.run(run())
    assert (first.sent[slow], second.sent[slow]) == (1, 0)


def test_results_the_store_refused_are_recorded_later_not_resent(tmp_path: Path) -> None:
    """A failed commit of results used to drop them: the items stayed claimed by this worker
    forever (less capacity) and were sent again when their leases ran out."""
    db = tmp_path / "g.sqlite3"
    ids = queue(db, "a", "b", "c")
    sender = CountingSender()
    failures = [1]

    async def run() -> None:
        store = StoreThread(db)
        real_call = store.call

        class FlakyStore:  # the first commit of results fails (database busy)
            def __init__(self, store):
                self.store = store

            def __getattr__(self, name):
                method = getattr(self.store, name)
                if name not in ("record_outbox", "record_and_claim_outbox"):
                    return method

                def record(results, *args, **kwargs):
                    if failures and results:
                        failures.pop()
                        raise StoreError("database busy or unwritable: database is locked")
                    return method(results, *args, **kwargs)

                return record

        async def flaky_call(fn):
            return await real_call(lambda s: fn(FlakyStore(s)))

        store.call = flaky_call  # type: ignore[method-assign]
        dispatcher = Dispatcher(store, "pagerduty", sender, FAST, lease_seconds=0.3)
        await deliver_until_done(dispatcher, store, 10)
        store.call = real_call  # type: ignore[method-assign]
        store.close()

    asyncio.run(run())
    assert not failures  # the failure was met
    assert [sender.sent[i] for i in ids] == [1, 1, 1]
    assert [o.state for o in open_store(db).outbox(("done", "pending"))] == ["done"] * 3


def test_a_dead_workers_claims_are_sent_at_once_by_the_next(tmp_path: Path) -> None:
    """kill -9 of the worker: its claims are released when the new one starts, not when their
    lease (tens of seconds) runs out; a live worker's claims are left alone."""
    db = tmp_path / "g.sqlite3"
    dead_item, live_item = queue(db, "a", "b")
    store = open_store(db)
    now = time.time()
    dead_owner = lease_owner(pid=2**22 + 12345)  # above pid_max: no such process
    assert [i.id for i in store.claim_outbox(now, 1, None, 3600, owner=dead_owner)] == [dead_item]
    assert [i.id for i in store.claim_outbox(now, 1, None, 3600, owner=lease_owner())] == [
        live_item
    ]
    assert dead_local_owners([dead_owner, lease_owner(), "otherhost:1"]) == [dead_owner]
    sender = CountingSender()

    async def run() -> None:
        thread = StoreThread(db)
        dispatcher = Dispatcher(thread, "pagerduty", sender, FAST, owner="host:new")
        stop = asyncio.Event()
        running = asyncio.create_task(dispatcher.run(stop, max_sleep=0.02))
        deadline = time.monotonic() + 5
        while not sender.sent[dead_item] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        stop.set()
        await running
        thread.close()

    asyncio.run(run())
    assert sender.sent == {dead_item: 1}
    [live] = store.outbox(("pending",))
    assert (live.id, live.lease_owner) == (live_item, lease_owner())  # still this process's


def test_a_requeued_dead_letter_gets_the_whole_retry_time(tmp_path: Path) -> None:
    """`retry` keeps the original created time; the give-up clock starts at the re-queue."""
    db = tmp_path / "g.sqlite3"
    [item] = queue(db, "a")
    store = open_store(db)
    store.conn.execute("UPDATE outbox SET created_at = created_at - 7200, state = 'dead'")  # type: ignore[attr-defined]
    created = store.outbox(("dead",))[0].created_at
    assert store.retry_outbox(item).requeued == (item,)

    async def fail_once() -> None:
        async def down(_: OutboxItem) -> str:
            from gateway.errors import TemporaryDeliveryError

            raise TemporaryDeliveryError("HTTP 503")

        thread = StoreThread(db)
        await Dispatcher(thread, "pagerduty", down, RetryPolicy(give_up_after=3600)).run_once()
        thread.close()

    asyncio.run(fail_once())
    [again] = store.outbox()
    assert again.state == "pending", again.last_error  # two hours old, re-queued just now
    assert again.created_at == created and again.requeued_at is not None


def test_a_rate_limited_burst_is_sent_once(tmp_path: Path, pd: PagerDutyStandIn) -> None:
    """The serve wiring, with PagerDuty's documented 120 events/min limit switched on: the
    last of 16 attempts in flight waits 7.5 s for its turn, longer than the 6 s lease a 0.5 s
    HTTP timeout gives. Such waits used to end in the same event being claimed and sent
    again (and again), with no worker killed at all."""
    config_path = write_config(tmp_path, pd_url=pd.url)
    config_path.write_text(
        config_path.read_text().replace(
            "timeout_seconds = 5\nrate_limit_per_minute = 0",
            "timeout_seconds = 0.5\nrate_limit_per_minute = 120",
        )
    )
    config = load_config(config_path)
    keys = [f"burst {n}" for n in range(20)]
    store = open_store(config.db_path)
    with store.transaction():
        for key in keys:
            event = build_event(action="trigger", dedup_key=key, summary=key)
            store.add_outbox("pagerduty", "helpdesk", f"pagerduty:helpdesk:{key}", event, None)

    async def run() -> None:
        thread = StoreThread(config.db_path)
        async with pagerduty_transport(config) as transport:
            await deliver_until_done(Deliveries(thread, transport, config), thread, 60)
        thread.close()

    asyncio.run(run())
    sent = collections.Counter(e["dedup_key"] for e in pd.events)
    assert sent == dict.fromkeys(keys, 1)
