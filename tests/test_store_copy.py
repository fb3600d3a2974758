"""`gateway store copy`: an installation moves from SQLite to PostgreSQL with nothing left
behind (pending mail and outbox, incidents, history) and keeps working there."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import StoreError
from gateway.store import (
    HeartbeatState,
    ImapPosition,
    JobDecision,
    OutboxResult,
    Store,
    copy_store,
    open_store,
)
from gateway.store.postgres.connection import close_pool
from tests.conftest import ROOT
from tests.store_support import counts, incident, mail


@pytest.fixture
def url(postgres_url: str) -> Iterator[str]:
    yield postgres_url
    close_pool(postgres_url)


def installation(path: Path) -> Store:
    """A SQLite store with something in every state."""
    store = open_store(path)
    decided, pending, _duplicate = store.accept(
        [mail("a", raw=b"Subject: a\r\n\r\nbody\x00"), mail("b"), mail("a")],
        [ImapPosition("desk", "INBOX", 7, 42, unfinished=(41, 42))],
    )
    store.finish_job(
        JobDecision(store.pending_jobs()[0].id, outcome="triggered", reason="rule", rule="r")
    )
    store.save_incident(incident("case 1"))
    done = store.add_outbox("pagerduty", "helpdesk", "k1", {"event_action": "trigger"}, 1)
    dead = store.add_outbox("pagerduty", "helpdesk", "k2", {"event_action": "trigger"}, 1)
    store.add_outbox("pagerduty", "helpdesk", "k3", {"event_action": "trigger"}, 1)  # pending
    store.claim_outbox(time.time(), 2, None, 60.0, owner="old:1")
    store.record_outbox(
        [OutboxResult(done, "done", response="202"), OutboxResult(dead, "dead", error="400")]
    )
    store.record_imap_failure("desk", "INBOX", 40, "unreadable", 9e9)
    store.save_mail_heartbeat(HeartbeatState("backup", "helpdesk", 1.0, 2.0, 1, None))
    store.note_coalesced("helpdesk", "case 1", 4.0, {"n": 1})
    store.add_pagerduty_event(body='{"event": {}}', received_at=3.0, event_id="E1")
    decided_webhook = store.add_pagerduty_event(body="{}", received_at=3.5, event_id="E2")
    assert decided_webhook is not None
    store.finish_pagerduty_event(decided_webhook, outcome="mirrored", service="helpdesk")
    assert decided.duplicate_of is None and pending.duplicate_of is None
    return store


def snapshot(store: Store) -> dict[str, object]:
    return {
        "counts": counts(store),
        "incidents": store.incidents(),
        "outbox": store.outbox(("pending", "dead", "done")),
        "attempts": store.outbox_attempts([1, 2, 3]),
        "messages": [store.message(i) for i in (1, 2, 3)],
        "raw": store.raw_message(1),
        "imap": (store.imap_position("desk", "INBOX"), store.imap_unfinished("desk", "INBOX")),
        "owed": store.imap_owed("desk", "INBOX"),
        "events": [(e["kind"], e["detail"]) for e in store.events()],
        "totals": store.metric_totals(),
        "heartbeats": store.mail_heartbeats(),
        "webhooks": store.pagerduty_events(),
        "coalesced": [(i.coalesced, i.coalesced_at, i.latest_details) for i in store.incidents()],
    }


def test_store_copy_moves_everything_and_postgresql_carries_on(tmp_path: Path, url: str) -> None:
    source = installation(tmp_path / "gateway.sqlite3")
    before = snapshot(source)
    source.close()
    copied = copy_store(f"sqlite:///{tmp_path / 'gateway.sqlite3'}", url)
    assert copied["messages"] == 3 and copied["outbox"] == 3
    target = open_store(url)
    assert snapshot(target) == before
    [pending] = target.pending_jobs()
    assert pending.message == 2  # still to be decided, on PostgreSQL now
    [new] = target.accept([mail("c")])
    assert new.id == 4  # ids continue after the copied ones
    assert target.add_pagerduty_event(body="{}", received_at=5.0, event_id="E3") == 3
    assert [i.order_key for i in target.due_outbox(time.time())] == ["k3"]


def test_store_copy_refuses_a_database_that_holds_data(tmp_path: Path, url: str) -> None:
    installation(tmp_path / "gateway.sqlite3").close()
    copy_store(tmp_path / "gateway.sqlite3", url)
    with pytest.raises(StoreError, match="already holds data"):
        copy_store(tmp_path / "gateway.sqlite3", url)


def test_gateway_store_copy_command(tmp_path: Path, url: str) -> None:
    installation(tmp_path / "gateway.sqlite3").close()
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "store", "copy",
         "--from", f"sqlite:///{tmp_path / 'gateway.sqlite3'}", "--to", url],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "messages 3" in result.stdout
    again = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "store", "copy",
         "--from", str(tmp_path / "gateway.sqlite3"), "--to", url],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert again.returncode == 75 and "already holds data" in again.stderr
    assert "Traceback" not in again.stderr
