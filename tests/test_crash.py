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

import subprocess
import sys
from collections import Counter
from pathlib import Path

from gateway.store import open_store
from tests.conftest import ROOT, GatewayProcess, free_port, wait_until, write_config
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
