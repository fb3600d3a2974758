"""kill -9 under load: nothing acknowledged is lost, nothing is processed twice.

A separate process sends a few thousand mails (retrying, like an MTA, whatever got no 250) while
the gateway is killed with SIGKILL several times and restarted. Afterwards every acknowledged
mail is in the store once, was decided once (each incident triggered exactly once), and its
event reached PagerDuty. An event whose POST was in flight at the instant of a kill may be
sent again after the restart (at-least-once delivery); it carries the same dedup_key, which
PagerDuty folds into the same incident, so the test bounds those resends instead of forbidding
them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

from gateway.delivery.outbox import lease_owner
from gateway.store import Store, open_store
from tests.conftest import ROOT, GatewayProcess, free_port, wait_until, write_config
from tests.ops_support import worker_pid
from tests.pdserver import PagerDutyStandIn

MESSAGES = 2000
KILLS = 4


def acknowledged(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_kill_9_under_load_loses_nothing_and_acts_once(
    tmp_path: Path, pd: PagerDutyStandIn
) -> None:
    port = free_port()
    config = write_config(tmp_path, pd_url=pd.url, smtp_port=port)
    gateway = GatewayProcess(config, port).start()
    log = tmp_path / "acknowledged.txt"
    sender = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "crash_sender.py"),
            str(port),
            str(MESSAGES),
            str(log),
        ]
    )
    try:
        for kill in range(1, KILLS + 1):
            target = kill * MESSAGES // (KILLS + 1)
            wait_until(lambda t=target: len(acknowledged(log)) >= t, timeout=120)
            gateway.kill()
            gateway.start()
        assert sender.wait(timeout=240) == 0
    finally:
        if sender.poll() is None:
            sender.kill()

    acked = acknowledged(log)
    assert sorted(acked) == list(range(MESSAGES)), "the sender got a 250 for every mail"
    pd.wait_for(MESSAGES, timeout=120)
    store = open_store(config.parent / "data" / "gateway.sqlite3")
    wait_until(lambda: store.outbox(("pending",)) == [], timeout=60, message="outbox not drained")
    gateway.stop()

    incidents = {i.incident_key: i for i in store.incidents(limit=10 * MESSAGES)}
    assert set(incidents) == {f"Crash case {n}" for n in acked}
    assert {i.trigger_count for i in incidents.values()} == {1}, "a mail was processed twice"
    jobs = Counter(j.incident_key for j in store.jobs(limit=10 * MESSAGES))
    assert set(jobs.values()) == {1}
    assert store.outbox(("dead",)) == []

    sent = Counter(e["dedup_key"] for e in pd.events)
    assert set(sent) == set(incidents), "every acknowledged mail's event reached PagerDuty"
    resent = sum(count - 1 for count in sent.values())
    assert resent <= KILLS * 16, f"{resent} events resent: more than were in flight at the kills"


WORKER_KILLS = 3
WORKER_LOAD = 600


def claimed_by(store: Store, owner: str) -> set[str]:
    """The dedup keys of the items `owner` had claimed and not recorded: in flight."""
    return {
        o.payload["dedup_key"]
        for o in store.outbox(("pending",), limit=100_000)
        if o.lease_owner == owner
    }


def test_kill_9_of_the_worker_resends_at_most_the_items_in_flight(
    tmp_path: Path, pd: PagerDutyStandIn
) -> None:
    """Only the worker dies (the listener keeps accepting): each kill may resend the events it
    had in flight, once each, and nothing else. The worker is stopped before it is killed, so
    what it had claimed can be read from the store: that is the bound."""
    port = free_port()
    config = write_config(tmp_path, pd_url=pd.url, smtp_port=port)
    gateway = GatewayProcess(config, port).start()
    assert gateway.proc is not None
    store = open_store(config.parent / "data" / "gateway.sqlite3")
    log = tmp_path / "acknowledged.txt"
    sender = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "crash_sender.py"),
            str(port),
            str(WORKER_LOAD),
            str(log),
        ]
    )
    in_flight: Counter[str] = Counter()  # dedup key -> kills it was in flight at
    try:
        for kill in range(1, WORKER_KILLS + 1):
            target = kill * WORKER_LOAD // (WORKER_KILLS + 1)
            wait_until(lambda t=target: len(pd.events) >= t, timeout=120)
            pid = wait_until(lambda: worker_pid(gateway.proc.pid), timeout=30)
            os.kill(pid, signal.SIGSTOP)  # frozen mid-delivery: its claims stay as they are
            in_flight.update(claimed_by(store, lease_owner(pid)))
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda p=pid: worker_pid(gateway.proc.pid) not in (None, p), timeout=30)
        assert sender.wait(timeout=240) == 0
    finally:
        if sender.poll() is None:
            sender.kill()
    pd.wait_for(WORKER_LOAD, timeout=120)
    wait_until(lambda: store.outbox(("pending",)) == [], timeout=60, message="outbox not drained")
    gateway.stop()

    assert gateway.output().count("worker process exited with -9") == WORKER_KILLS
    sent = Counter(e["dedup_key"] for e in pd.events)
    assert set(sent) == {f"Crash case {n}" for n in acknowledged(log)}
    resent = {key: count - 1 for key, count in sent.items() if count > 1}
    over = {key: n for key, n in resent.items() if n > in_flight[key]}
    assert over == {}, f"resent more often than in flight at a kill: {over}"
    print(
        f"\n{WORKER_KILLS} worker kills: {sum(in_flight.values())} events in flight,"
        f" {sum(resent.values())} resent, {len(pd.events)} sent for {len(sent)} incidents"
    )


STORM_MAILS = 900
STORM_CASES = 30
STORM_KILLS = 3


def test_kill_9_during_a_storm_loses_nothing_and_pages_each_case(
    tmp_path: Path, pd: PagerDutyStandIn
) -> None:
    """Issue 12: an alert storm (many mails per case) with the rate limit on, and kill -9 of
    `gateway serve` in the middle of it. Every acknowledged mail is decided once and counted
    on its case's incident; repeats are absorbed (coalesced), never queued one per mail; each
    case is paged, at most once more per kill than once."""
    port = free_port()
    config = write_config(tmp_path, pd_url=pd.url, smtp_port=port)
    text = config.read_text().replace("rate_limit_per_minute = 0", "rate_limit_per_minute = 600")
    config.write_text(text)
    gateway = GatewayProcess(config, port).start()
    log = tmp_path / "acknowledged.txt"
    sender = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "crash_sender.py"),
            str(port),
            str(STORM_MAILS),
            str(log),
            str(STORM_CASES),
        ]
    )
    try:
        for kill in range(1, STORM_KILLS + 1):
            target = kill * STORM_MAILS // (STORM_KILLS + 1)
            wait_until(lambda t=target: len(acknowledged(log)) >= t, timeout=120)
            gateway.kill()
            gateway.start()
        assert sender.wait(timeout=240) == 0
    finally:
        if sender.poll() is None:
            sender.kill()

    acked = acknowledged(log)
    assert sorted(acked) == list(range(STORM_MAILS)), "the sender got a 250 for every mail"
    store = open_store(config.parent / "data" / "gateway.sqlite3")
    cases = {f"Crash case {n}" for n in range(STORM_CASES)}
    wait_until(
        lambda: {e["dedup_key"] for e in pd.events} >= cases, timeout=120, message="not paged"
    )
    wait_until(lambda: store.outbox(("pending",)) == [], timeout=60, message="outbox not drained")
    gateway.stop()

    jobs = store.jobs(limit=10 * STORM_MAILS)
    assert len(jobs) == STORM_MAILS and all(j.outcome for j in jobs), "every mail decided once"
    incidents = {i.incident_key: i for i in store.incidents(limit=10 * STORM_CASES)}
    assert set(incidents) == cases
    per_case = Counter(f"Crash case {n % STORM_CASES}" for n in acked)
    assert {k: i.trigger_count for k, i in incidents.items()} == dict(per_case)
    assert {k: i.coalesced for k, i in incidents.items()} == {k: n - 1 for k, n in per_case.items()}
    assert store.outbox(("dead",)) == []
    sent = Counter(e["dedup_key"] for e in pd.events)
    assert max(sent.values()) <= 1 + STORM_KILLS, f"a case paged more than once per kill: {sent}"
