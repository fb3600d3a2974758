"""Two `gateway serve` nodes on one PostgreSQL under SMTP load; node A is killed with SIGKILL
three times (restarted each time) and a fourth time left dead (issue 13, "How it must be
shown"). Every mail either node acknowledged reaches the PagerDuty stand-in, A's leftovers are
delivered by B, resends are bounded and each incident's events keep their order."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.runtime.worker import DECIDE_TURN_SILENCE
from gateway.store import open_store
from gateway.store.postgres.connection import close_pool
from tests.conftest import GatewayProcess, desk_mail, free_port, wait_until, write_config
from tests.ops_support import worker_pid
from tests.pdserver import PagerDutyStandIn

KEYS_PER_SENDER = 30  # each key: a trigger, then (once that was acknowledged) its resolve
CONCURRENCY = 16  # a dispatcher's attempts in flight: what one kill can leave unrecorded


class Node(GatewayProcess):
    def __init__(self, tmp_path: Path, name: str, pd: PagerDutyStandIn, url: str) -> None:
        directory = tmp_path / name
        directory.mkdir()
        port = free_port()
        store = f'[store]\nurl = "{url}"\nnode = "{name}"\n'
        super().__init__(write_config(directory, pd_url=pd.url, smtp_port=port, extra=store), port)
        self.name = name

    def kill_node(self) -> None:
        """SIGKILL the service and its worker process: the node is gone at once."""
        assert self.proc is not None
        worker = worker_pid(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Sender(threading.Thread):
    """An MTA with two MX hosts: each key's trigger, then its resolve, to the preferred node,
    falling back to the other one until a 250 comes back."""

    def __init__(self, name: str, nodes: list[Node]) -> None:
        super().__init__(name=f"sender-{name}", daemon=True)
        self.prefix, self.nodes = name, nodes
        self.acked: list[tuple[str, str, str]] = []  # (key, action, node) per 250
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        for i in range(KEYS_PER_SENDER):
            key = f"{self.prefix} case {i}"
            for status, action in (("New", "trigger"), ("Resolved", "resolve")):
                if not self._deliver(key, status, action):
                    return

    def _deliver(self, key: str, status: str, action: str) -> bool:
        raw = desk_mail(key, status)  # one Message-ID: a retried copy is a duplicate
        attempt = 0
        while not self.stop.is_set():
            node = self.nodes[attempt % 2]
            attempt += 1
            try:
                with smtplib.SMTP("127.0.0.1", node.port, timeout=20) as client:
                    client.sendmail("support@helpdesk.example", ["desk@gateway.example"], raw)
            except (OSError, smtplib.SMTPException):
                self.errors += 1
                self.stop.wait(0.05)
                continue
            self.acked.append((key, action, node.name))
            return True
        return False


@pytest.fixture
def url(postgres_url: str) -> Iterator[str]:
    yield postgres_url
    close_pool(postgres_url)


def test_two_nodes_lose_nothing_acknowledged_when_one_is_killed_again_and_again(
    tmp_path: Path, pd: PagerDutyStandIn, url: str
) -> None:
    a, b = Node(tmp_path, "a", pd, url), Node(tmp_path, "b", pd, url)
    a.start(), b.start()
    senders = [Sender("alpha", [a, b]), Sender("beta", [b, a])]
    try:
        for sender in senders:
            sender.start()

        def acked() -> int:
            return sum(len(s.acked) for s in senders)

        for kill, at in enumerate((15, 35, 55, 75), 1):
            wait_until(lambda at=at: acked() >= at, 60, message=f"load stalled before kill {kill}")
            if kill == 4:
                pd.fail_next(3, 503)  # A's last attempts fail: its leftovers are B's to send
            a.kill_node()
            if kill < 4:
                a.start()
        for sender in senders:
            sender.join(120)
            assert not sender.is_alive(), "a sender never got its 250s"
        acknowledged = {(key, action) for s in senders for key, action, _ in s.acked}
        assert len(acknowledged) == 2 * 2 * KEYS_PER_SENDER

        def delivered() -> set[tuple[str, str]]:
            return {(e["dedup_key"], e["event_action"]) for e in list(pd.events)}

        wait_until(lambda: acknowledged <= delivered(), 90, message="acknowledged mail lost")
        store = open_store(url, read_only=True)
        wait_until(lambda: store.outbox_stats()[0] == 0, 60, message="outbox never drained")
        events = list(pd.events)
        print(  # shown with -s or on failure
            f"acknowledged {len(acknowledged)}, events {len(events)},"
            f" refused or cut sends {sum(s.errors for s in senders)}"
        )
        assert len(events) - len(acknowledged) <= 4 * CONCURRENCY  # resends are bounded
        for key in {k for k, _ in acknowledged}:
            actions = "".join(e["event_action"][0] for e in events if e["dedup_key"] == key)
            assert re.fullmatch("t+r+", actions), f"{key}: events out of order: {actions}"
        assert b_delivered_what_a_accepted(store)
        assert not a.alive() and b.alive()
        assert b.stop() == 0
    finally:
        for sender in senders:
            sender.stop.set()
        for node in (a, b):
            if node.alive():
                node.kill_node()


def b_delivered_what_a_accepted(store) -> bool:
    """Some mail only A had accepted went out through B (A was dead by then)."""
    for job in store.jobs(limit=10_000):
        message = store.message(job.message)
        if message is None or message.node != "a":
            continue
        if any(item.delivered_by == "b" for item in store.outbox_of_job(job.id)):
            return True
    return False


def test_a_frozen_node_holding_the_decide_turn_does_not_stop_the_others(
    tmp_path: Path, pd: PagerDutyStandIn, url: str
) -> None:
    """SIGSTOP (a hung host whose kernel still answers keepalives): its session goes silent,
    the server ends it after DECIDE_TURN_SILENCE and another node decides."""
    a = Node(tmp_path, "a", pd, url).start()
    b = None
    frozen: list[int] = []
    try:
        a_sender = Sender("warm", [a, a])
        a_sender._deliver("Warm-up", "New", "trigger")
        pd.wait_for(1)  # A's worker decided: it holds the decide turn
        b = Node(tmp_path, "b", pd, url).start()
        assert a.proc is not None
        frozen = [p for p in (a.proc.pid, worker_pid(a.proc.pid)) if p is not None]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        Sender("b", [b, b])._deliver("Printer on fire", "New", "trigger")
        events = pd.wait_for(2, timeout=DECIDE_TURN_SILENCE + 30)
        assert events[1]["dedup_key"] == "Printer on fire"
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        for node in (a, b):
            if node is not None and node.alive():
                node.kill_node()
