"""The status page's HTML: the Jinja environment and the data each page shows.

Mail content is hostile, so every template is autoescaped and raw HTML mail is shown as text,
never rendered. The data functions run in the store's thread (`StoreThread.call`). A mail is
named by its message id everywhere (the id of `250 ... queued as N`); its jobs, one per
service, are secondary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.responses import HTMLResponse

from gateway.config import WebSettings
from gateway.config_time import HeartbeatSettings
from gateway.delivery.paging import Delivery, delivery_of
from gateway.mail.parse import parse_message
from gateway.outcomes import Outcome
from gateway.schedules import MaintenanceWindow
from gateway.store import (
    Incident,
    JobHistory,
    JobRecord,
    OutboxAttempt,
    OutboxItem,
    PagerDutyEvent,
    ReportStore,
)
from gateway.web import chart, timing, words

BODY_CHARS = 100_000  # of a mail body shown on the detail page
RECENT_MESSAGES = 50
FILTER_OUTCOMES = (*(o.value for o in Outcome), "pending")
ATTEMPT_WORDS = {  # an OutboxAttempt's state, as a person reads it
    "done": "delivered",
    "dead": "refused: dead letter",
    "pending": "failed, will retry",
    "requeued": "re-queued by an operator",
}


class Pages:
    """Renders the templates in `gateway/web/templates/` into responses."""

    def __init__(self) -> None:
        self.env = _environment()

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        now = time.time()
        html = self.env.get_template(template).render(now=now, zone=words.zone(now), **context)
        return HTMLResponse(html, status)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gateway.web", "templates"),
        autoescape=True,  # mail content is hostile
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = words.when
    env.filters["instant"] = words.instant
    env.filters["age"] = lambda ts: words.ago(ts, time.time())
    env.filters["duration"] = words.duration
    env.filters["seconds"] = chart.seconds_words
    env.filters["n"] = chart.number
    env.filters["event"] = describe_item
    env.globals["MEANING"] = chart.MEANING
    env.globals["geometry"] = chart.GEOMETRY
    env.globals["incident_link"] = incident_link
    env.globals["ATTEMPT"] = ATTEMPT_WORDS
    return env


# -- what a reader asks for (query parameters) --------------------------------------------------


@dataclass(frozen=True)
class IndexQuery:
    """The status page's filters: validated, so a typo is an answer, not an empty table."""

    outcomes: tuple[str, ...] = ()
    service: str | None = None
    hours: int = 24

    def link(self, **changes: Any) -> str:
        """The page's URL with these filters changed (for the window links)."""
        values = {"outcome": list(self.outcomes), "service": self.service, "hours": self.hours}
        values.update(changes)
        pairs = [("hours", str(values["hours"]))] if values["hours"] != 24 else []
        pairs += [("outcome", o) for o in values["outcome"]]
        pairs += [("service", values["service"])] if values["service"] else []
        return "/?" + urlencode(pairs) if pairs else "/"


def parse_index_query(params: Mapping[str, Sequence[str]], services: Sequence[str]) -> IndexQuery:
    """`?outcome=...&service=...&hours=...` -> IndexQuery; ValueError says what is wrong."""
    outcomes = tuple(o for o in params.get("outcome", ()) if o)
    for outcome in outcomes:
        if outcome not in FILTER_OUTCOMES:
            raise ValueError(
                f"unknown outcome {outcome!r}: use one of {', '.join(FILTER_OUTCOMES)}"
            )
    names = [s for s in params.get("service", ()) if s]
    if len(names) > 1:
        raise ValueError("give at most one service")
    service = names[0] if names else None
    if service is not None and services and service not in services:
        raise ValueError(f"unknown service {service!r}: configured are {', '.join(services)}")
    hours_text = (params.get("hours") or ["24"])[-1]
    allowed = ", ".join(str(h) for h in chart.WINDOWS_HOURS)
    if hours_text not in [str(h) for h in chart.WINDOWS_HOURS]:
        raise ValueError(f"hours must be one of {allowed} (got {hours_text[:20]!r})")
    return IndexQuery(outcomes, service, int(hours_text))


# -- data for the pages (run in the store's thread) ---------------------------------------------


@dataclass(frozen=True)
class IncidentRow:
    """An incident as the page lists it: with what PagerDuty was told, and whether it is
    open for longer than `[web] stale_incident_hours`."""

    incident: Incident
    delivery: Delivery
    stale: bool

    @property
    def link(self) -> str:
        return incident_link(self.incident.service, self.incident.incident_key)


@dataclass(frozen=True)
class PageContext:
    """What the page data needs besides the store: the running configuration's view."""

    settings: WebSettings
    local: frozenset[str] = frozenset()  # services in local mode (no routing_key)
    now: float = field(default_factory=time.time)
    maintenance: tuple[MaintenanceWindow, ...] = ()  # config.toml's [[maintenance]]
    heartbeats: tuple[HeartbeatSettings, ...] = ()  # config.toml's [[heartbeat]]


def incident_link(service: str, key: str) -> str:
    return "/incident?" + urlencode({"service": service, "key": key})


def index_data(store: ReportStore, query: IndexQuery, context: PageContext) -> dict[str, Any]:
    """The status page's sections from one snapshot: a mail shown decided has its event in
    the outbox or delivered, never in neither list."""
    with store.read_snapshot():
        return _index_sections(store, query, context)


def _index_sections(store: ReportStore, query: IndexQuery, context: PageContext) -> dict[str, Any]:
    recent = store.recent_jobs(
        RECENT_MESSAGES, outcomes=query.outcomes or None, service=query.service
    )
    outbox = store.outbox(("pending", "dead"), limit=200)
    frame = chart.axes(context.now, query.hours)
    return {
        "jobs": [{"job": job, "subject": _subject(head)} for job, head in recent],
        "incidents": incident_rows(store, store.incidents(open_only=True, limit=200), context),
        "storm": store.storm_state(context.now),
        "pending": [o for o in outbox if o.state == "pending"],
        "dead": [o for o in outbox if o.state == "dead"],
        "imap_failures": store.imap_failures(),  # templates/imap_failures.html
        "pagerduty_events": [said(e) for e in store.pagerduty_events(limit=20)],
        "mail_chart": chart.mail_chart(store.mail_minutes(frame.start), frame),
        "latency_chart": chart.latency_chart(store.delivery_minutes(frame.start), frame),
        "maintenance": timing.maintenance_rows(store, context.maintenance, context.now),
        "heartbeats": timing.heartbeat_rows(store, context.heartbeats),  # _timing.html
    }


def incident_rows(
    store: ReportStore, incidents: Sequence[Incident], context: PageContext
) -> list[IncidentRow]:
    stale_after = context.settings.stale_incident_hours * 3600
    rows = []
    for incident in incidents:
        delivery = delivery_of(store, incident, context.local)
        opened = incident.opened_at or incident.first_seen
        stale = incident.is_open and context.now - opened > stale_after
        rows.append(IncidentRow(incident, delivery, stale))
    return rows


def message_data(store: ReportStore, message: int) -> dict[str, Any] | None:
    record = store.message(message)
    if record is None:
        return None
    raw = store.raw_message(message)
    mail = parse_message(raw) if raw else None
    jobs = []
    for job in record.jobs:
        detail = store.job_detail(job)
        items = store.outbox_of_job(job)
        attempts = _by_item(store.outbox_attempts([i.id for i in items]))
        jobs.append({"detail": detail, "outbox": items, "attempts": attempts})
    return {
        "record": record,
        "jobs": jobs,
        "mail": mail,
        "body": (mail.text[:BODY_CHARS] if mail else ""),
        "html_source": (mail.html[:BODY_CHARS] if mail else ""),
        "events": store.events(message=message, limit=50),
        "purged": raw is None,
    }


def incident_data(
    store: ReportStore, service: str, key: str, context: PageContext
) -> dict[str, Any] | None:
    incident = store.incident(service, key)
    if incident is None:
        return None
    [row] = incident_rows(store, [incident], context)
    history = store.incident_jobs(service, key)
    queued = {h.job.id: store.outbox_of_job(h.job.id) for h in history}
    attempts = store.outbox_attempts([i.id for items in queued.values() for i in items])
    return {
        "row": row,
        "latest": latest_repeat(incident),
        "timeline": timeline(history, queued, attempts),
        "truncated": len(history) >= 200,
        "pd_link": safe_link(incident.pd_url),
        "pagerduty_events": [said(e) for e in store.pagerduty_events(incident_key=key, limit=50)],
    }


def safe_link(url: str) -> str | None:
    """A PagerDuty `html_url` only as an http(s) link: the webhook body is not ours."""
    return url if url.startswith(("https://", "http://")) else None


def said(event: PagerDutyEvent) -> dict[str, Any]:
    """A webhook delivery for the pages: when, what, who, the note, and what it did here."""
    body = event.event
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    agent = body.get("agent") if isinstance(body.get("agent"), dict) else {}
    note = data.get("content") if isinstance(data.get("content"), str) else ""
    return {
        "event": event,
        "agent": agent.get("summary", "") if isinstance(agent.get("summary"), str) else "",
        "note": note[:BODY_CHARS],
    }


def latest_repeat(incident: Incident) -> dict[str, Any] | None:
    """The details of the newest repeat trigger absorbed on the incident, if any."""
    try:
        latest = json.loads(incident.latest_details) if incident.latest_details else None
    except ValueError:
        return None
    return latest if isinstance(latest, dict) else None


def outbox_data(store: ReportStore, item: int) -> dict[str, Any] | None:
    entry = store.outbox_entry(item)
    if entry is None:
        return None
    shown = dict(entry.item.payload)
    if "routing_key" in shown:  # an incident's opening key, kept for fidelity: a secret
        shown["routing_key"] = "(the key that opened the incident)"
    payload = json.dumps(shown, indent=2, ensure_ascii=False)
    key = entry.item.payload.get("dedup_key")
    incident = incident_link(entry.item.service, key) if entry.item.kind == "pagerduty" else None
    return {
        "entry": entry,
        "payload": payload[:BODY_CHARS],
        "attempts": store.outbox_attempts([item]),
        "incident_link": incident if key else None,
    }


# -- the incident timeline ----------------------------------------------------------------------


@dataclass(frozen=True)
class Moment:
    """One line of an incident's timeline."""

    at: float
    what: str  # 'mail' | 'decision' | 'queued' | 'attempt'
    text: str
    link: str = ""
    bad: bool = False


def timeline(
    history: Sequence[JobHistory],
    queued: Mapping[int, Sequence[OutboxItem]],
    attempts: Sequence[OutboxAttempt],
) -> list[Moment]:
    """Each mail, its decision, each outbox item it queued, each attempt and its answer,
    oldest first. An item is queued in its decision's transaction, so it is listed at the
    decision's time (its `created_at` moves when an operator re-queues it)."""
    lines: list[tuple[float, int, Moment]] = []
    items: dict[int, OutboxItem] = {}
    for h in history:
        for rank, moment in enumerate(_job_moments(h.job, h.decided_at, _subject(h.head))):
            lines.append((moment.at, rank, moment))
        for item in queued.get(h.job.id, ()):
            items[item.id] = item
            text = f"queued {describe_item(item)} (outbox #{item.id})"
            at = h.decided_at or item.created_at
            lines.append((at, 2, Moment(at, "queued", text, f"/outbox/{item.id}")))
    for attempt in attempts:
        lines.append((attempt.at, 3, _attempt_moment(attempt, items.get(attempt.item))))
    return [moment for _, _, moment in sorted(lines, key=lambda line: line[:2])]


def _job_moments(job: JobRecord, decided_at: float | None, subject: str) -> list[Moment]:
    link = f"/messages/{job.message}"
    moments = [
        Moment(
            job.received_at,
            "mail",
            f"message {job.message} via {job.source}: {subject or '(no subject)'}",
            link,
        )
    ]
    if decided_at is not None:
        rule = f" by rule {job.rule!r}" if job.rule else ""
        text = f"{job.outcome}{rule}" + (f": {job.reason}" if job.reason else "")
        bad = job.outcome == Outcome.QUARANTINED
        moments.append(Moment(decided_at, "decision", text, link, bad))
    return moments


def _attempt_moment(attempt: OutboxAttempt, item: OutboxItem | None) -> Moment:
    what = describe_item(item) if item else f"outbox #{attempt.item}"
    head = f"attempt {attempt.attempt}: {what}"
    link = f"/outbox/{attempt.item}"
    answer = attempt.response[:300]
    if attempt.state == "requeued":
        return Moment(attempt.at, "attempt", f"{what} re-queued by an operator", link)
    if attempt.state == "done":
        text = f"{head} delivered" + (f", answer {answer}" if answer else "")
        return Moment(attempt.at, "attempt", text, link)
    why = attempt.error or answer
    if answer and answer not in why:
        why = f"{why}, answer {answer}"
    if attempt.state == "dead":
        return Moment(
            attempt.at, "attempt", f"{head} NOT DELIVERED (dead letter): {why}", link, True
        )
    return Moment(attempt.at, "attempt", f"{head} failed, will retry: {why}", link, True)


def _by_item(attempts: Sequence[OutboxAttempt]) -> dict[int, list[OutboxAttempt]]:
    grouped: dict[int, list[OutboxAttempt]] = {}
    for attempt in attempts:
        grouped.setdefault(attempt.item, []).append(attempt)
    return grouped


def describe_item(item: OutboxItem) -> str:
    """`PagerDuty trigger 'Printer on fire'` or `mail 'Re: Printer on fire'`."""
    payload = item.payload
    if "event_action" in payload:
        return f"PagerDuty {payload['event_action']} {payload.get('dedup_key', '')!r}"
    if item.kind == "pagerduty_rest":
        return f"PagerDuty REST {payload.get('action')} {payload.get('incident_key', '')!r}"
    return f"mail {str(payload.get('subject', ''))!r}"


def _subject(head: bytes) -> str:
    """The decoded Subject from the first bytes of a mail; '' when unreadable."""
    try:
        value = BytesHeaderParser(policy=compat32).parsebytes(head).get("Subject", "")
        return str(make_header(decode_header(str(value))))[:300]
    except Exception:  # hostile or truncated headers: show nothing rather than fail the page
        return ""
