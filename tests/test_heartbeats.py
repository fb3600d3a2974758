"""Heartbeats (dead man's switch): missing mail triggers `heartbeat:<name>`, the next matching
mail resolves it, and the state survives restarts. Instants are fixed: the processor's clock
moves only when the test moves it; the serve test seeds the stored state instead of waiting."""

from __future__ import annotations

import smtplib
import time
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from gateway.cli import main
from gateway.config import WebSettings, load_config
from gateway.config_time import HeartbeatSettings
from gateway.errors import ConfigError, RuleError
from gateway.outcomes import Outcome
from gateway.runtime.reload import load_generation
from gateway.store import HeartbeatState, Store, StoreThread, open_store
from gateway.web.metrics import LiveState
from gateway.web.status import WebApp
from tests.conftest import ROUTING_KEY, GatewayProcess, wait_until, write_config
from tests.net import free_port
from tests.pdserver import PagerDutyStandIn
from tests.time_support import Clock, accept_at, berlin, processor
from tests.web_support import SMTP_UP, call

HOUR = 3600.0
BACKUP_RULES = """
[[rule]]
name = "backup report"
conditions = [{ field = "subject", op = "starts_with", value = "Backup report" }]
action = "discard"
"""
HEARTBEAT = """
[[heartbeat]]
name = "nightly-backup"
service = "helpdesk"
rule = "backup report"
interval = "24h"
grace = "1h"
"""


def backup_mail(day: str = "2026-12-02") -> bytes:
    msg = EmailMessage()
    msg["From"] = "backup@db1.example"
    msg["To"] = "desk@gateway.example"
    msg["Subject"] = f"Backup report {day}: OK"
    msg.set_content("All 14 databases dumped.\n")
    return msg.as_bytes()


def heartbeat_config(tmp_path: Path, extra: str = "", **kwargs: object) -> Path:
    rules = tmp_path / "backup.toml"
    rules.write_text(BACKUP_RULES)
    path = write_config(tmp_path, extra=HEARTBEAT + extra, **kwargs)  # type: ignore[arg-type]
    path.write_text(path.read_text().replace('["helpdesk.toml"]', f'["{rules}", "helpdesk.toml"]'))
    return path


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path / "gateway.sqlite3")


def events(store: Store) -> list[tuple[str, str]]:
    return [(i.payload["event_action"], i.payload["dedup_key"]) for i in store.outbox()]


def test_missing_heartbeat_triggers_once_after_interval_and_grace(
    tmp_path: Path, store: Store
) -> None:
    settings = load_config(heartbeat_config(tmp_path))
    clock = Clock(berlin("2026-12-01T03:00"))
    gateway = processor(store, settings, clock)
    assert gateway.check_heartbeats() == []  # starts watching now
    clock.now += 25 * HOUR - 1
    assert gateway.check_heartbeats() == []  # 24 h + 1 h grace not over yet
    clock.now += 1
    assert gateway.check_heartbeats() == ["nightly-backup"]
    assert events(store) == [("trigger", "heartbeat:nightly-backup")]
    (item,) = store.outbox()
    assert "did not arrive (never seen)" in item.payload["payload"]["summary"]
    (incident,) = store.incidents()
    assert (incident.incident_key, incident.state) == ("heartbeat:nightly-backup", "triggered")
    clock.now += 3 * HOUR
    assert gateway.check_heartbeats() == []  # reported once, not every second
    assert len(store.outbox()) == 1


def test_matching_mail_resolves_a_missing_heartbeat_and_restarts_its_deadline(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_config(heartbeat_config(tmp_path))
    clock = Clock(berlin("2026-12-01T03:00"))
    gateway = processor(store, settings, clock)
    gateway.check_heartbeats()
    clock.now += 26 * HOUR
    assert gateway.check_heartbeats() == ["nightly-backup"]
    clock.now += HOUR
    accept_at(store, monkeypatch, clock.now, backup_mail())
    (done,) = gateway.process_pending()
    assert (done.outcome, done.rule, done.queued) == (Outcome.DISCARDED, "backup report", True)
    assert events(store) == [
        ("trigger", "heartbeat:nightly-backup"),
        ("resolve", "heartbeat:nightly-backup"),
    ]
    assert store.incidents()[0].state == "resolved"
    (state,) = store.mail_heartbeats()
    assert (state.last_seen, state.missing_since) == (clock.now, None)
    clock.now += 25 * HOUR - 1  # the deadline now counts from this mail
    assert gateway.check_heartbeats() == []
    clock.now += 1
    assert gateway.check_heartbeats() == ["nightly-backup"]


def test_a_heartbeat_incident_keeps_the_routing_key_that_opened_it_after_a_rotation(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_config(heartbeat_config(tmp_path))
    clock = Clock(berlin("2026-12-01T03:00"))
    gateway = processor(store, settings, clock)
    gateway.check_heartbeats()
    clock.now += 26 * HOUR
    assert gateway.check_heartbeats() == ["nightly-backup"]
    rotated = "S" + ROUTING_KEY[1:]
    config = heartbeat_config(tmp_path)
    config.write_text(config.read_text().replace(ROUTING_KEY, rotated))
    gateway = processor(store, load_config(config), clock)  # a reload with the new key
    accept_at(store, monkeypatch, clock.now + HOUR, backup_mail())
    gateway.process_pending()
    keys = [(i.payload["event_action"], i.payload.get("routing_key")) for i in store.outbox()]
    assert keys == [("trigger", ROUTING_KEY), ("resolve", ROUTING_KEY)]
    assert store.incidents()[0].routing_key == ROUTING_KEY


def test_mail_in_time_keeps_the_heartbeat_quiet(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_config(heartbeat_config(tmp_path))
    clock = Clock(berlin("2026-12-01T03:00"))
    gateway = processor(store, settings, clock)
    for day in range(5):
        clock.now += 24 * HOUR + 50 * 60  # within the hour of grace, every night
        gateway.check_heartbeats()
        accept_at(store, monkeypatch, clock.now, backup_mail(f"day {day}"))
        gateway.process_pending()
        assert gateway.check_heartbeats() == []
    assert store.outbox() == []  # nothing resolved that was not open
    assert store.incidents() == []


def test_heartbeat_state_survives_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new store connection and processor (a restart) neither forget a missing heartbeat
    nor report it again, and a deadline that passed while down triggers at once."""
    settings = load_config(heartbeat_config(tmp_path))
    db = tmp_path / "gateway.sqlite3"
    clock = Clock(berlin("2026-12-01T03:00"))
    first = open_store(db)
    processor(first, settings, clock).check_heartbeats()
    first.close()
    clock.now += 30 * HOUR  # down for the deadline
    second = open_store(db)
    assert processor(second, settings, clock).check_heartbeats() == ["nightly-backup"]
    second.close()
    third = open_store(db)
    restarted = processor(third, settings, clock)
    clock.now += HOUR
    assert restarted.check_heartbeats() == []  # still reported, not again
    accept_at(third, monkeypatch, clock.now, backup_mail())
    restarted.process_pending()
    assert events(third) == [
        ("trigger", "heartbeat:nightly-backup"),
        ("resolve", "heartbeat:nightly-backup"),
    ]


def test_a_suppressing_window_postpones_a_missing_heartbeat(tmp_path: Path, store: Store) -> None:
    window = (
        '[[maintenance]]\nname = "backup host move"\nservice = "helpdesk"\n'
        "start = 2026-12-02T00:00:00+01:00\nend = 2026-12-02T12:00:00+01:00\n"
    )
    settings = load_config(heartbeat_config(tmp_path, window))
    clock = Clock(berlin("2026-12-01T03:00"))
    gateway = processor(store, settings, clock)
    gateway.check_heartbeats()
    clock.now = berlin("2026-12-02T05:00")  # overdue, inside the window
    assert gateway.check_heartbeats() == []
    clock.now = berlin("2026-12-02T12:00")  # the window is over
    assert gateway.check_heartbeats() == ["nightly-backup"]


def test_a_heartbeat_naming_an_unknown_rule_fails_check_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = heartbeat_config(tmp_path)
    text = path.read_text().replace('rule = "backup report"', 'rule = "backup reports"')
    path.write_text(text)
    line = text.splitlines().index('rule = "backup reports"') + 1
    with pytest.raises(ConfigError) as caught:
        load_generation(path)
    assert f"{path}:{line}:" in str(caught.value)
    assert "unknown rule 'backup reports' for service 'helpdesk'" in str(caught.value)
    assert main(["--config", str(path), "check"]) == 1
    assert f"{path}:{line}:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        pytest.param('interval = "24h"', 'interval = "daily"', "not a duration", id="interval"),
        pytest.param(
            'service = "helpdesk"', 'service = "ops"', "unknown service 'ops'", id="service"
        ),
        pytest.param('grace = "1h"', "grace = -5", "longer than 0", id="grace"),
    ],
)
def test_bad_heartbeats_are_reported_with_file_and_line(
    tmp_path: Path, old: str, new: str, words: str
) -> None:
    path = heartbeat_config(tmp_path)
    text = path.read_text().replace(old, new)
    path.write_text(text)
    line = text.splitlines().index(new) + 1
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert words in str(caught.value) and f"{path}:{line}:" in str(caught.value), str(caught.value)


# --------------------------------------------------------------------------- gateway serve


def send(port: int, raw: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("backup@db1.example", ["desk@gateway.example"], raw)


def test_missing_heartbeat_triggers_and_resolves_across_a_restart_of_serve(
    tmp_path: Path, pd: PagerDutyStandIn
) -> None:
    """The stored state says the gateway has watched for two days: the first `serve` triggers
    at once; after a restart the backup mail resolves it, and the page shows when it came."""
    smtp_port, web_port = free_port(), free_port()
    web = f'\n[web]\nlisten = "127.0.0.1:{web_port}"\n'
    config = heartbeat_config(tmp_path, web, pd_url=pd.url, smtp_port=smtp_port)
    store = open_store(tmp_path / "data" / "gateway.sqlite3")
    two_days_ago = time.time() - 48 * HOUR
    store.save_mail_heartbeat(HeartbeatState("nightly-backup", "helpdesk", two_days_ago))
    store.close()
    gateway = GatewayProcess(config, smtp_port).start()
    try:
        wait_until(lambda: pd.events, message="no trigger for the missing heartbeat")
        assert gateway.stop() == 0
        gateway.start()
        send(smtp_port, backup_mail())
        wait_until(lambda: len(pd.events) >= 2, message=f"no resolve:\n{gateway.output()}")
        assert [(e["event_action"], e["dedup_key"]) for e in pd.events] == [
            ("trigger", "heartbeat:nightly-backup"),
            ("resolve", "heartbeat:nightly-backup"),
        ]
        page = httpx.get(f"http://127.0.0.1:{web_port}/", timeout=10).text
        assert 'id="heartbeat-nightly-backup"' in page
        row = page.split('id="heartbeat-nightly-backup"', 1)[1].split("</tr>", 1)[0]
        assert "never" not in row and "ago" in row and "MISSING" not in row
    finally:
        gateway.stop()


CONDITIONS_HEARTBEAT = """
[[heartbeat]]
name = "cron-db1"
service = "helpdesk"
conditions = [
  { field = "from", op = "contains", value = "backup@db1.example" },
  { field = "subject", op = "contains", value = "OK" },
]
interval = "1h"
"""


def test_a_heartbeat_recognises_its_mail_by_its_own_conditions(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever rule decides the mail (here: none, it is unmatched), it counts."""
    path = write_config(tmp_path, extra=CONDITIONS_HEARTBEAT)
    load_generation(path)  # passes `gateway check`
    settings = load_config(path)
    clock = Clock(berlin("2026-12-01T03:00"))
    gateway = processor(store, settings, clock)
    gateway.check_heartbeats()
    clock.now += HOUR
    assert gateway.check_heartbeats() == ["cron-db1"]
    accept_at(store, monkeypatch, clock.now, backup_mail())
    (done,) = gateway.process_pending()
    assert done.outcome == Outcome.UNMATCHED
    assert events(store) == [("trigger", "heartbeat:cron-db1"), ("resolve", "heartbeat:cron-db1")]
    row = status_row(tmp_path, settings.heartbeats, "cron-db1")
    assert "its own 2 condition(s) (all)" in row and "1.0h + 0s grace" in row
    assert "ago" in row and "MISSING" not in row


def status_row(tmp_path: Path, beats: tuple[HeartbeatSettings, ...], name: str) -> str:
    """The heartbeat's row on the status page, served from the test's store."""
    thread = StoreThread(tmp_path / "gateway.sqlite3", "web-test")
    try:
        app = WebApp(thread, WebSettings(), live=LiveState(smtp=SMTP_UP))
        app.heartbeats = beats
        page = call(app, "GET", "/").text
    finally:
        thread.close()
    return page.split(f'id="heartbeat-{name}"', 1)[1].split("</tr>", 1)[0]


def test_a_bad_heartbeat_condition_fails_check_with_file_and_line(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        extra=CONDITIONS_HEARTBEAT.replace('"contains", value = "OK"', '"has", value = "OK"'),
    )
    line = (
        path.read_text().splitlines().index('  { field = "subject", op = "has", value = "OK" },')
        + 1
    )
    with pytest.raises(RuleError) as caught:
        load_generation(path)
    assert f"{path}:{line}:" in str(caught.value) and "unknown op 'has'" in str(caught.value)


def test_a_heartbeat_needs_a_rule_or_conditions_not_both(tmp_path: Path) -> None:
    path = write_config(tmp_path, extra=CONDITIONS_HEARTBEAT + 'rule = "new case"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "give either rule (a rule's name) or conditions" in str(caught.value)
