"""Maintenance windows: triggers suppressed or downgraded while one is active, recorded as
such; acknowledges and resolves still go through. Instants are fixed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.config import WebSettings, load_config
from gateway.decide.replay import replay
from gateway.errors import ConfigError
from gateway.outcomes import Outcome
from gateway.store import Store, StoreThread, open_store
from gateway.web.metrics import LiveState
from gateway.web.status import WebApp
from tests.conftest import desk_mail, write_config
from tests.time_support import Clock, accept_at, berlin, config, processor
from tests.web_support import SMTP_UP, call

WINDOWS = """
[schedules.deploys]
timezone = "Europe/Berlin"
daily = ["22:00-23:00"]

[[maintenance]]
name = "database upgrade"
service = "helpdesk"
start = 2026-12-01T22:00:00+01:00
end = 2026-12-02T02:00:00+01:00
mode = "suppress"

[[maintenance]]
name = "nightly deploys"
service = "helpdesk"
schedule = "deploys"
mode = "downgrade"
severity = "info"
"""


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path / "gateway.sqlite3")


def outbox_events(store: Store) -> list[tuple[str, str, str]]:
    return [
        (
            i.payload["event_action"],
            i.payload["dedup_key"],
            i.payload.get("payload", {}).get("severity", ""),
        )
        for i in store.outbox()
        if i.kind == "pagerduty"
    ]


def test_trigger_during_a_suppressing_window_is_recorded_and_not_sent(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config(tmp_path, WINDOWS)
    accept_at(store, monkeypatch, berlin("2026-12-01T23:30"), desk_mail("Disk full"))
    (done,) = processor(store, settings, Clock(berlin("2026-12-02T09:00"))).process_pending()
    assert done.outcome == Outcome.MAINTENANCE == "maintenance_suppressed"
    assert "suppressed by maintenance window 'database upgrade'" in done.reason
    assert store.outbox() == [] and store.incidents() == []
    (kept,) = store.jobs(outcomes=[Outcome.MAINTENANCE])
    assert kept.action == "trigger" and kept.incident_key == "Disk full"


def test_trigger_outside_the_window_pages_as_usual(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config(tmp_path, WINDOWS)
    accept_at(store, monkeypatch, berlin("2026-12-02T02:00"), desk_mail("Disk full"))
    (done,) = processor(store, settings, Clock(berlin("2026-12-02T02:00"))).process_pending()
    assert done.outcome == Outcome.TRIGGERED
    assert outbox_events(store) == [("trigger", "Disk full", "critical")]


def test_trigger_during_a_recurring_downgrading_window_is_sent_milder(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config(tmp_path, WINDOWS)
    accept_at(store, monkeypatch, berlin("2026-12-05T22:15"), desk_mail("Deploy broke login"))
    (done,) = processor(store, settings, Clock(berlin("2026-12-05T22:15"))).process_pending()
    assert done.outcome == Outcome.TRIGGERED
    assert "severity critical downgraded to info by maintenance window 'nightly deploys'" in (
        done.reason
    )
    assert outbox_events(store) == [("trigger", "Deploy broke login", "info")]
    (job,) = store.jobs()
    assert "downgraded to info" in (job.reason or "")


def test_resolve_during_a_suppressing_window_still_goes_through(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config(tmp_path, WINDOWS)
    clock = Clock(berlin("2026-12-01T21:00"))
    accept_at(store, monkeypatch, clock.now, desk_mail("Disk full"))
    assert [d.outcome for d in processor(store, settings, clock).process_pending()] == [
        Outcome.TRIGGERED
    ]
    clock.now = berlin("2026-12-01T23:00")  # inside "database upgrade"
    accept_at(store, monkeypatch, clock.now, desk_mail("Disk full", "Resolved"))
    (done,) = processor(store, settings, clock).process_pending()
    assert done.outcome == Outcome.RESOLVED
    assert [e[:2] for e in outbox_events(store)] == [
        ("trigger", "Disk full"),
        ("resolve", "Disk full"),
    ]


@pytest.mark.parametrize(
    ("window", "line", "words"),
    [
        pytest.param(
            "start = 2026-12-02T02:00:00Z\nend = 2026-12-01T22:00:00Z",
            6,
            "must be after start",
            id="end-first",
        ),
        pytest.param(
            "start = 2026-12-01T22:00:00\nend = 2026-12-02T02:00:00",
            5,
            "has no UTC offset",
            id="no-zone",
        ),
        pytest.param('schedule = "deploy"', 5, "unknown schedule 'deploy'", id="schedule"),
        pytest.param(
            'schedule = "deploys"\nmode = "mute"',
            6,
            "must be one of suppress, downgrade",
            id="mode",
        ),
    ],
)
def test_bad_maintenance_windows_are_reported_with_file_and_line(
    tmp_path: Path, window: str, line: int, words: str
) -> None:
    extra = '[schedules.deploys]\ntimezone = "UTC"\ndaily = ["22:00-23:00"]\n'
    path = write_config(tmp_path, extra=extra)
    text = path.read_text()
    head = len(text.splitlines())
    path.write_text(text + f'[[maintenance]]\nname = "w"\nservice = "helpdesk"\n{window}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert words in str(caught.value)
    assert f"{path}:{head + line - 1}:" in str(caught.value), str(caught.value)


def test_a_local_window_takes_its_zone_from_timezone(tmp_path: Path) -> None:
    extra = (
        '[[maintenance]]\nname = "w"\nservice = "helpdesk"\ntimezone = "America/New_York"\n'
        "start = 2026-11-01T01:30:00\nend = 2026-11-01T03:00:00\n"
    )
    (window,) = config(tmp_path, extra).maintenance
    assert window.start == berlin("2026-11-01T06:30")  # 01:30 EDT (first of two 01:30s)
    assert window.end == berlin("2026-11-01T09:00")  # 03:00 EST


def test_status_page_summarises_the_windows_and_what_they_suppressed(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config(tmp_path, WINDOWS)
    accept_at(store, monkeypatch, berlin("2026-12-01T23:30"), desk_mail("Disk full"))
    processor(store, settings, Clock(berlin("2026-12-01T23:30"))).process_pending()
    thread = StoreThread(tmp_path / "gateway.sqlite3", "web-test")
    try:
        app = WebApp(thread, WebSettings(), live=LiveState(smtp=SMTP_UP))
        app.services, app.maintenance = list(settings.services), settings.maintenance
        response = call(app, "GET", "/")
    finally:
        thread.close()
    assert response.status_code == 200
    rows = re.findall(r'<tr class="maintenance.*?</tr>', response.text, re.S)
    assert len(rows) == 2
    upgrade, deploys = rows
    assert "database upgrade" in upgrade and "suppressed" in upgrade
    assert "once, 2026-12-01 21:00 UTC - 2026-12-02 01:00 UTC" in upgrade
    assert 'outcome=maintenance_suppressed&amp;service=helpdesk">1</a>' in upgrade
    assert "downgraded to info" in deploys and "schedule deploys" in deploys


def test_replay_does_not_report_a_suppressed_trigger_as_a_rule_change(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = config(tmp_path, WINDOWS)
    accept_at(store, monkeypatch, berlin("2026-12-01T23:30"), desk_mail("Disk full"))
    gateway = processor(store, settings, Clock(berlin("2026-12-01T23:30")))
    gateway.process_pending()
    (replayed,) = replay(store, gateway.services, since=0)
    assert not replayed.changed, (replayed.old, replayed.new)
