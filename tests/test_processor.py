"""The processor's two phases: themes render before the write transaction, and a decision whose
incident changed in between is made again from the new state."""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway.config import NotifySettings, OutgoingSettings, PagerDutySettings, ServiceSettings
from gateway.decide.incidents import apply_action
from gateway.decide.notifications import HelpdeskNotifier
from gateway.decide.pagerduty_side import PagerDutySide
from gateway.decide.processor import Processor, load_services
from gateway.decide.verdicts import Processed
from gateway.errors import StoreError, StoreUnavailable
from gateway.intake.spool import incoming
from gateway.outcomes import Outcome
from gateway.store import Store, open_store
from gateway.themes.render import Themes
from tests.conftest import ROOT, RULES_DIR, desk_mail
from tests.store_support import Backend, incident
from tests.webhook_support import event_body

AGENTS = "agents@helpdesk.example"


class WatchedThemes(Themes):
    """The real themes; every render records its event and whether a transaction was open."""

    def __init__(self, store: Store, before_render: Callable[[], None] = lambda: None) -> None:
        super().__init__(ROOT / "templates")
        self.store = store
        self.before_render = before_render
        self.renders: list[tuple[str, bool]] = []

    def render(self, theme: str, context: Mapping[str, Any], **kwargs: Any):
        self.renders.append((context["event"], self.store.conn.in_transaction))
        self.before_render()
        return super().render(theme, context, **kwargs)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path / "gateway.sqlite3")


def processor(store: Store, themes: Themes) -> Processor:
    notify = NotifySettings("incident_update", (AGENTS,), ("trigger", "duplicate", "resolve"))
    settings = ServiceSettings(
        "helpdesk", ("desk@*",), (RULES_DIR / "helpdesk.toml",), "R" * 32, notify=notify
    )
    notifier = HelpdeskNotifier(themes, OutgoingSettings(from_addr="gw@gateway.example"))
    return Processor(store, load_services((settings,)), PagerDutySettings(), notifier=notifier)


def spool(store: Store, *mails: bytes) -> None:
    store.accept([incoming(raw, source="cli", services=("helpdesk",)) for raw in mails])


def mail_events(store: Store) -> list[str]:
    """The X-Gateway-Event of each queued helpdesk mail, in queue order."""
    items = [item for item in store.outbox() if item.kind == "mail"]
    return [
        line.split(":", 1)[1].strip()
        for item in items
        for line in item.payload["message"].splitlines()
        if line.startswith("X-Gateway-Event:")
    ]


def test_themes_render_outside_the_write_transaction(store: Store) -> None:
    themes = WatchedThemes(store)
    spool(store, desk_mail("Printer on fire"), desk_mail("Printer on fire", "Resolved"))
    outcomes = processor(store, themes).process_pending()
    # one batch: the resolve saw the trigger decided just before it, although neither was
    # committed when the themes rendered
    assert [o.outcome for o in outcomes] == [Outcome.TRIGGERED, Outcome.RESOLVED]
    assert themes.renders == [("trigger", False), ("resolve", False)]
    assert mail_events(store) == ["trigger", "resolve"]
    (incident,) = store.incidents()
    assert incident.state == "resolved" and incident.trigger_count == 1


def test_an_incident_changed_between_the_phases_is_decided_again(
    store: Store, tmp_path: Path
) -> None:
    other = open_store(tmp_path / "gateway.sqlite3")  # e.g. `gateway ingest` in another process

    def race() -> None:
        if len(themes.renders) == 1:  # while the first verdict renders, another writer triggers
            opened, _ = apply_action(
                None, service="helpdesk", key="Printer on fire", action="trigger", now=1.0
            )
            assert opened is not None
            with other.transaction():
                other.save_incident(opened)

    themes = WatchedThemes(store, race)
    spool(store, desk_mail("Printer on fire"))
    (outcome,) = processor(store, themes).process_pending()
    assert outcome.outcome == Outcome.DUPLICATE  # not a second "triggered"
    assert themes.renders == [("trigger", False), ("duplicate", False)]
    assert mail_events(store) == ["duplicate"]  # the mail rendered for the stale read is dropped
    (incident,) = store.incidents()
    assert incident.trigger_count == 2


def test_decision_lines_are_not_built_when_info_is_off(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line per decision is the info-level contract; at warning level, building each
    line's text and fields is work nobody reads."""
    built: list[int] = []
    original = Processed.log_line
    monkeypatch.setattr(Processed, "log_line", lambda self: built.append(1) or original(self))
    monkeypatch.setattr(logging.getLogger("gateway.decide.processor"), "level", logging.WARNING)
    spool(store, desk_mail("Printer on fire"))
    (outcome,) = processor(store, WatchedThemes(store)).process_pending()
    assert outcome.outcome == Outcome.TRIGGERED
    assert built == []


def test_the_stored_trace_lists_every_rule_tried(store: Store) -> None:
    spool(store, desk_mail("Printer on fire"))
    (outcome,) = processor(store, WatchedThemes(store)).process_pending()
    detail = store.job_detail(outcome.job)
    assert detail is not None
    assert detail["trace"] == [
        {"rule": "resolved case", "matched": False, "reason": "none of 2 conditions matched (any)"},
        {
            "rule": "new case",
            "matched": True,
            "reason": 'all 1 condition matched; key "Printer on fire"',
        },
    ]


def test_a_job_decided_elsewhere_between_the_phases_is_recorded_once(
    store: Store, tmp_path: Path
) -> None:
    """`gateway ingest` decides the same job while this processor renders: this one records
    nothing (its incident change, event and mail are undone with the job's savepoint)."""
    other_store = open_store(tmp_path / "gateway.sqlite3")
    other = processor(other_store, WatchedThemes(other_store))

    def race() -> None:
        if len(themes.renders) == 1:
            (decided,) = other.process_pending()
            assert decided.outcome == Outcome.TRIGGERED

    themes = WatchedThemes(store, race)
    spool(store, desk_mail("Printer on fire"))
    assert processor(store, themes).process_pending() == []
    assert [
        item.payload["event_action"] for item in store.outbox() if item.kind == "pagerduty"
    ] == ["trigger"]
    assert mail_events(store) == ["trigger"]
    (incident,) = store.incidents()
    assert incident.trigger_count == 1


class CountingStore:
    """A real store that counts the queries for pending jobs."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.looks = 0

    def pending_jobs(self, *args: Any, **kwargs: Any) -> Any:
        self.looks += 1
        return self.store.pending_jobs(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_backlog_of_one_mail_is_decided_with_one_look_for_pending_jobs(store: Store) -> None:
    """At a steady rate every wake finds one mail: the batch that took every pending job ends
    the round, without a second query that only finds nothing left."""
    counting = CountingStore(store)
    spool(store, desk_mail("Printer on fire"))
    worker = processor(counting, WatchedThemes(store))  # type: ignore[arg-type]
    assert worker.process_backlog(5) is True
    assert counting.looks == 1
    assert [j.id for j in store.pending_jobs()] == []
    spool(store, desk_mail("Printer on fire", "Resolved"))  # a later commit: the next wake
    assert worker.process_backlog(5) is True
    assert counting.looks == 2
    (incident,) = store.incidents()
    assert incident.state == "resolved"


def test_a_full_batch_looks_again_for_pending_jobs(store: Store) -> None:
    counting = CountingStore(store)
    spool(store, *(desk_mail(f"Case {n}") for n in range(3)))
    worker = processor(counting, WatchedThemes(store))  # type: ignore[arg-type]
    assert len(worker.process_pending(batch=2)) == 2
    assert worker.drained is False
    assert len(worker.process_pending(batch=2)) == 1
    assert worker.drained is True
    assert counting.looks == 2


def test_a_mail_to_two_services_is_parsed_once(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.decide.evaluation as evaluation_module

    parses: list[bytes] = []
    real_parse = evaluation_module.parse_message

    def counting_parse(raw: bytes, envelope_from: str | None = None) -> Any:
        parses.append(raw)
        return real_parse(raw, envelope_from)

    monkeypatch.setattr(evaluation_module, "parse_message", counting_parse)
    services = tuple(
        ServiceSettings(name, (f"{name}@*",), (RULES_DIR / "helpdesk.toml",), "R" * 32)
        for name in ("helpdesk", "facilities")
    )
    store.accept(
        [incoming(desk_mail("Printer on fire"), source="cli", services=("helpdesk", "facilities"))]
    )
    outcomes = Processor(store, load_services(services), PagerDutySettings()).process_pending()
    assert sorted((o.service, o.outcome) for o in outcomes) == [
        ("facilities", Outcome.TRIGGERED),
        ("helpdesk", Outcome.TRIGGERED),
    ]
    assert len(parses) == 1


class WebhookLooks(CountingStore):
    """A real store that counts the looks for stored PagerDuty webhook deliveries."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.webhook_looks = 0

    def pending_pagerduty_events(self, *args: Any, **kwargs: Any) -> Any:
        self.webhook_looks += 1
        return self.store.pending_pagerduty_events(*args, **kwargs)


def test_without_a_webhook_secret_batches_do_not_look_for_webhooks(store: Store) -> None:
    """No receiver, nothing new to decide: one look after each (re)configuration decides what
    an earlier configuration stored, then the mail hot path is spared that query."""
    store.add_pagerduty_event(body='{"event": {}}', received_at=1.0, event_id="stored-earlier")
    counting = WebhookLooks(store)
    worker = processor(counting, WatchedThemes(store))  # type: ignore[arg-type]
    for n in range(3):
        spool(store, desk_mail(f"Case {n}"))
        worker.process_pending()
    assert store.pending_pagerduty_events(10) == []  # the earlier delivery was decided
    assert counting.webhook_looks == 2  # it found one, so it looked once more, then stopped
    worker.reconfigure(
        worker.services, PagerDutySettings(), regex_timeout=0.5, notifier=worker.notifier
    )
    worker.process_pending()
    worker.process_pending()
    assert counting.webhook_looks == 3
    worker.reconfigure(
        worker.services,
        PagerDutySettings(webhook_secret=("s",)),
        regex_timeout=0.5,
        notifier=worker.notifier,
    )
    worker.process_pending()
    worker.process_pending()
    assert counting.webhook_looks == 5  # a receiver: every batch looks


def test_the_store_failing_while_a_batch_is_evaluated_leaves_its_jobs_pending(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the batch's incidents fails (the database went away): not the mail's fault, so
    nothing is quarantined; the jobs wait for the next try, which decides them."""
    decide = processor(store, WatchedThemes(store))
    spool(store, desk_mail("Printer on fire"))

    def away(slots: object) -> dict:
        raise StoreError("database unreachable")

    monkeypatch.setattr(store, "incidents_of", away)
    with pytest.raises(StoreError):
        decide.process_pending()
    assert [(job.state, job.outcome) for job in store.jobs()] == [("pending", None)]
    monkeypatch.undo()
    [done] = decide.process_pending()
    assert done.outcome == Outcome.TRIGGERED


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        opened = Backend("sqlite", tmp_path / "gateway.sqlite3")
    else:
        opened = Backend("postgresql", request.getfixturevalue("postgres_server").new_database())
    try:
        yield opened
    finally:
        opened.close()


class FailingStore(CountingStore):
    """A real store that counts savepoints; the outbox insert for the case named `fails`
    goes through and then the database refuses the job's next write (a NOT NULL column)."""

    def __init__(self, store: Store, fails: str = "") -> None:
        super().__init__(store)
        self.fails = fails
        self.savepoints = 0

        self.calls: collections.Counter[str] = collections.Counter()

    def savepoint(self) -> Any:
        self.savepoints += 1
        return self.store.savepoint()

    def __getattr__(self, name: str) -> Any:
        if name in (
            "incident",
            "lock_incidents",
            "save_incident",
            "save_incidents",
            "note_coalesced",
            "finish_job",
            "finish_jobs",
        ):
            self.calls[name] += 1
        return getattr(self.store, name)

    def add_outbox(self, kind: str, service: str, order_key: str, *args: Any) -> int:
        item = self.store.add_outbox(kind, service, order_key, *args)
        if self.fails and order_key.endswith(self.fails):
            (incident,) = [i for i in self.store.incidents() if i.incident_key == self.fails]
            self.store.save_incident(dataclasses.replace(incident, state=None))  # type: ignore[arg-type]
        return item


class RefusingKey(FailingStore):
    """A real store whose database refuses any read of one incident (a server-side error,
    which on PostgreSQL aborts the transaction up to the enclosing savepoint)."""

    def __init__(self, store: Store, refused: str) -> None:
        super().__init__(store)
        self.refused = refused

    def _refuse(self) -> None:
        self.store.save_incident(incident(self.refused, state=None))  # type: ignore[arg-type]

    def lock_incidents(self, slots: list[tuple[str, str]]) -> Any:
        if any(key == self.refused for _, key in slots):
            self._refuse()
        return self.store.lock_incidents(slots)

    def incident(self, service: str, key: str) -> Any:
        if key == self.refused:
            self._refuse()
        return self.store.incident(service, key)


class Deadlocks(FailingStore):
    """A real store where the database breaks a deadlock at the outbox insert of one case,
    `times` times (what the server says then: try again, not this job's fault)."""

    def __init__(self, store: Store, victim: str, times: int) -> None:
        super().__init__(store)
        self.victim, self.times = victim, times

    def add_outbox(self, kind: str, service: str, order_key: str, *args: Any) -> int:
        if self.times and order_key.endswith(self.victim):
            self.times -= 1
            raise StoreUnavailable("deadlock detected")
        return self.store.add_outbox(kind, service, order_key, *args)


def decide(store: Store) -> list[Processed]:
    settings = ServiceSettings("helpdesk", ("desk@*",), (RULES_DIR / "helpdesk.toml",), "R" * 32)
    return Processor(store, load_services((settings,)), PagerDutySettings()).process_pending()


def test_a_batch_locks_once_and_writes_each_table_once(
    backend: Backend,
) -> None:
    """Not per job: a savepoint, an incident's lock and read, a job's update each cost
    statements (round trips on PostgreSQL). Two jobs of one key in the batch: the second
    builds on what the first wrote, without reading it again."""
    store = FailingStore(backend.open())
    mails = [desk_mail(f"Case {n}") for n in range(3)] + [desk_mail("Case 0", "Resolved")]
    spool(store.store, *mails)
    outcomes = decide(store)  # type: ignore[arg-type]
    assert [o.outcome for o in outcomes] == [Outcome.TRIGGERED] * 3 + [Outcome.RESOLVED]
    assert store.savepoints == 2  # the locks' (so they last the transaction), the batch's
    assert store.calls == {"lock_incidents": 1, "save_incidents": 1, "finish_jobs": 1}
    assert sorted((i.incident_key, i.state) for i in store.incidents()) == [
        ("Case 0", "resolved"),
        ("Case 1", "triggered"),
        ("Case 2", "triggered"),
    ]
    assert store.store.pending_jobs() == []


def test_a_batch_with_no_incident_to_act_on_takes_no_locks(backend: Backend) -> None:
    """Unmatched mail (a spam wave, say): no incident, so no locks' savepoint either."""
    store = FailingStore(backend.open())
    spool(store.store, *(desk_mail(f"Case {n}", "Pending") for n in range(3)))
    outcomes = decide(store)  # type: ignore[arg-type]
    assert [o.outcome for o in outcomes] == [Outcome.UNMATCHED] * 3
    assert store.savepoints == 1  # the batch's
    assert store.calls == {"lock_incidents": 1, "save_incidents": 1, "finish_jobs": 1}


def test_repeats_in_one_batch_are_counted_once_on_the_episode_they_belong_to(
    backend: Backend,
) -> None:
    """The batch writes its incident once and its absorbed repeats in one count: a repeat
    before the case was resolved and opened again belongs to the episode before, which the
    reopening resets (as when each job wrote at once)."""
    store = FailingStore(backend.open())
    statuses = ["New", "New", "Resolved", "New", "New", "New"]
    spool(store.store, *(desk_mail("Case 0", status) for status in statuses))
    outcomes = decide(store)  # type: ignore[arg-type]
    assert [o.outcome for o in outcomes] == [
        Outcome.TRIGGERED,
        Outcome.DUPLICATE,
        Outcome.RESOLVED,
        Outcome.TRIGGERED,
        Outcome.DUPLICATE,
        Outcome.DUPLICATE,
    ]
    (incident,) = store.incidents()
    assert (incident.state, incident.times_opened, incident.coalesced) == ("triggered", 2, 2)
    assert [item.payload["event_action"] for item in store.outbox()] == [
        "trigger",
        "resolve",
        "trigger",
    ]
    assert store.calls == {
        "lock_incidents": 1,
        "save_incidents": 1,
        "note_coalesced": 1,
        "finish_jobs": 1,
    }


def test_a_job_the_database_asks_to_try_again_is_not_quarantined(backend: Backend) -> None:
    """A deadlock broken by the server (or a lost connection) in the job-by-job redo is not
    the job's fault: the batch stays pending and is decided whole the next time."""
    store = Deadlocks(backend.open(), victim="Case 1", times=2)  # the batch, then its redo
    spool(store.store, *(desk_mail(f"Case {n}") for n in range(3)))
    with pytest.raises(StoreUnavailable):
        decide(store)  # type: ignore[arg-type]
    assert len(store.store.pending_jobs()) == 3
    assert store.incidents() == [] and store.outbox() == []
    outcomes = decide(store)  # type: ignore[arg-type]
    assert [o.outcome for o in outcomes] == [Outcome.TRIGGERED] * 3


class Blip:
    """A real store whose first look-up of incidents by key fails: the database away."""

    def __init__(self, store: Store) -> None:
        self.store, self.failed = store, False

    def incidents_with_key(self, key: str) -> Any:
        if not self.failed:
            self.failed = True
            raise StoreUnavailable("database unreachable")
        return self.store.incidents_with_key(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_webhook_event_stays_pending_while_the_store_cannot_be_read(store: Store) -> None:
    """A database blip while a PagerDuty webhook event is judged is the store's trouble, not
    the event's: it is decided at the next look, not marked failed and lost."""
    opened, _ = apply_action(
        None, service="helpdesk", key="Printer on fire", action="trigger", now=1.0
    )
    assert opened is not None
    with store.transaction():
        store.save_incident(opened)
    body = event_body("incident.acknowledged", "Printer on fire").decode()
    event = store.add_pagerduty_event(body=body, received_at=2.0, event_id="E1")
    settings = ServiceSettings("helpdesk", ("desk@*",), (RULES_DIR / "helpdesk.toml",), "R" * 32)
    services = {n: (r.settings, r.ruleset) for n, r in load_services((settings,)).items()}
    side = PagerDutySide(Blip(store), clock=lambda: 3.0)  # type: ignore[arg-type]
    with pytest.raises(StoreUnavailable):
        side.process_pending(services, None)
    assert [e.id for e in store.pending_pagerduty_events()] == [event]
    assert side.process_pending(services, None) == (1, 0)
    assert store.pending_pagerduty_events() == []
    acknowledged = store.incident("helpdesk", "Printer on fire")
    assert acknowledged is not None and acknowledged.state == "acknowledged"


@pytest.mark.parametrize(
    ("failing", "savepoints"),
    [
        # the locks', the batch's, then one per job
        pytest.param(lambda s: FailingStore(s, fails="Case 1"), 2 + 3, id="a-write-fails"),
        # locking and reading a batch's incidents at once must not turn one bad key into a
        # batch that fails forever: the locks' (undone), then one per job
        pytest.param(lambda s: RefusingKey(s, refused="Case 1"), 1 + 3, id="a-read-fails"),
    ],
)
def test_a_job_failing_in_a_batch_is_quarantined_alone_and_its_writes_undone(
    backend: Backend, failing: Callable[[Store], FailingStore], savepoints: int
) -> None:
    """The batch is recorded again job by job: the others are decided as if nothing happened;
    the failing job is quarantined, and its incident and outbox item (written before the
    database refused its next write) are gone."""
    store = failing(backend.open())
    spool(store.store, *(desk_mail(f"Case {n}") for n in range(3)))
    outcomes = decide(store)  # type: ignore[arg-type]
    assert [o.outcome for o in outcomes] == [
        Outcome.TRIGGERED,
        Outcome.QUARANTINED,
        Outcome.TRIGGERED,
    ]
    assert outcomes[1].reason.startswith("internal error: ")
    assert "null" in outcomes[1].reason.lower()  # what the database said
    assert store.savepoints == savepoints
    assert sorted(i.incident_key for i in store.incidents()) == ["Case 0", "Case 2"]
    assert sorted(item.payload["dedup_key"] for item in store.outbox()) == ["Case 0", "Case 2"]
    assert store.store.pending_jobs() == []
