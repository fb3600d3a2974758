"""PagerDuty-side events (Webhooks v3 deliveries, stored by `POST /pagerduty/webhook`) ->
the incident mirror, reverse rules, and the helpdesk's notification mail.

The receiver only stores a delivery (so PagerDuty gets its 2xx at once and nothing is lost);
the processor decides it here, like a mail job, in two phases: reading the event, the incident
and rendering the theme happen before the write transaction; the transaction re-reads the
incident and applies the change only if it is still what was read (else the event stays
pending and is decided again). Nothing here ever sends an event to PagerDuty: a change that
came from PagerDuty is never echoed back (and `recording._is_echo` keeps the helpdesk's reply
to our notification from echoing it either).

Events name the incident by `data.incident_key` (the dedup key the gateway sent); notes and
responder events carry only PagerDuty's incident id, found through the mirror (`pd_id`).
Events for keys the gateway never sent are recorded (`unknown_key`) and visible, not errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from gateway.config import Config, ServiceSettings
from gateway.decide import notifications
from gateway.decide.notifications import HelpdeskNotifier, Notification
from gateway.errors import Problem, RuleEvaluationError, StoreError
from gateway.files import FileSnapshot
from gateway.rules import PagerDutyDecision, Ruleset, evaluate_pagerduty
from gateway.store import DecisionStore, Incident, PagerDutyEvent
from gateway.themes import render as themes

log = logging.getLogger(__name__)

# event type -> the mirror state it means (others keep the state, update the details)
STATES = {
    "incident.triggered": "triggered",
    "incident.reopened": "triggered",
    "incident.unacknowledged": "triggered",
    "incident.acknowledged": "acknowledged",
    "incident.resolved": "resolved",
}
PAGERDUTY = "pagerduty"  # Incident.changed_by of a change that came from PagerDuty


@dataclass(frozen=True)
class WebhookFacts:
    """What one Webhooks v3 event says, read defensively (any field may be missing)."""

    event_type: str
    incident_key: str
    pd_id: str
    status: str = ""
    title: str = ""
    html_url: str = ""
    assignees: tuple[str, ...] | None = None  # None: the event does not say
    priority: str | None = None
    urgency: str = ""
    service: str = ""
    escalation_policy: str = ""
    note: str = ""
    agent: str = ""

    def rule_fields(self, incident: Incident | None) -> dict[str, str]:
        """The reverse rules' fields; what the event leaves out comes from the mirror."""
        known = incident or _NO_INCIDENT
        assignees = self.assignees
        return {
            "event_type": self.event_type,
            "title": self.title or known.summary,
            "status": self.status or known.pd_status or known.state,
            "service": self.service,
            "escalation_policy": self.escalation_policy,
            "priority": self.priority if self.priority is not None else known.priority,
            "urgency": self.urgency or known.urgency,
            "assignee": ", ".join(assignees) if assignees is not None else known.assignees,
            "note": self.note,
        }


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _summary(value: Any) -> str:
    """A PagerDuty reference's display name (`summary`)."""
    return _text(value.get("summary")) if isinstance(value, dict) else ""


def read_facts(event: Mapping[str, Any]) -> WebhookFacts:
    """The facts of an `event` object; an incident's data, or a note's / responder's."""
    data = event.get("data")
    data = data if isinstance(data, dict) else {}
    event_type = _text(event.get("event_type"))
    reference = data.get("incident") if isinstance(data.get("incident"), dict) else None
    agent = _summary(event.get("agent"))
    if reference is not None:  # incident_note, incident_responder, status update
        note = _text(data.get("content")) or _text(data.get("message"))
        responder = _summary(data.get("user"))
        return WebhookFacts(
            event_type,
            incident_key=_text(reference.get("incident_key")),
            pd_id=_text(reference.get("id")),
            html_url=_text(reference.get("html_url")),
            note=note or (f"responder added: {responder}" if responder else ""),
            escalation_policy=_summary(data.get("escalation_policy")),
            agent=agent,
        )
    assignees = data.get("assignees")
    names = None
    if isinstance(assignees, list):
        names = tuple(n for n in (_summary(a) for a in assignees) if n)
    priority = data.get("priority") if "priority" in data else None
    return WebhookFacts(
        event_type,
        incident_key=_text(data.get("incident_key")),
        pd_id=_text(data.get("id")),
        status=_text(data.get("status")),
        title=_text(data.get("title")),
        html_url=_text(data.get("html_url")),
        assignees=names,
        priority=None if priority is None else _summary(priority),
        urgency=_text(data.get("urgency")),
        service=_summary(data.get("service")),
        escalation_policy=_summary(data.get("escalation_policy")),
        agent=agent,
    )


def mirror_update(incident: Incident, facts: WebhookFacts, now: float) -> Incident:
    """The incident after what PagerDuty said: state, assignees, priority, urgency, id, link."""
    changed = replace(
        incident,
        pd_id=facts.pd_id or incident.pd_id,
        pd_url=facts.html_url or incident.pd_url,
        pd_status=facts.status or STATES.get(facts.event_type, incident.pd_status),
        assignees=", ".join(facts.assignees) if facts.assignees is not None else incident.assignees,
        priority=facts.priority if facts.priority is not None else incident.priority,
        urgency=facts.urgency or incident.urgency,
        last_seen=now,
    )
    state = STATES.get(facts.event_type)
    if state is None or state == incident.state:
        return changed
    if state == "resolved":
        return replace(
            changed,
            state=state,
            resolved_at=now,
            resolve_count=incident.resolve_count + 1,
            changed_by=PAGERDUTY,
        )
    if state == "acknowledged":
        return replace(
            changed,
            state=state,
            acknowledge_count=incident.acknowledge_count + 1,
            changed_by=PAGERDUTY,
        )
    reopened = incident.state == "resolved"
    return replace(
        changed,
        state=state,
        changed_by=PAGERDUTY,
        resolved_at=None if reopened else incident.resolved_at,
        opened_at=now if reopened else incident.opened_at,
        times_opened=incident.times_opened + int(reopened),
    )


# What deciding a webhook delivery records (`gateway webhooks --outcome` takes these and
# "pending", a delivery not decided yet)
WEBHOOK_OUTCOMES = ("mirrored", "notified", "notify_failed", "unknown_key", "discarded", "failed")


@dataclass(frozen=True)
class Verdict:
    """Phase 1's result for one event."""

    event: PagerDutyEvent
    outcome: str
    detail: str = ""
    basis: Incident | None = None
    changed: Incident | None = None
    notification: Notification | None = None


class PagerDutySide:
    """Decides pending webhook deliveries; its services and notifier follow reloads."""

    def __init__(
        self,
        store: DecisionStore,
        *,
        clock: Callable[[], float],
        regex_timeout: float = 0.5,
    ) -> None:
        self.store = store
        self.clock = clock
        self.regex_timeout = regex_timeout

    def process_pending(
        self,
        services: Mapping[str, tuple[ServiceSettings, Ruleset]],
        notifier: HelpdeskNotifier | None,
        limit: int = 100,
    ) -> tuple[int, int]:
        """Decide up to `limit` stored events: (how many were decided, mails queued)."""
        decided = mailed = 0
        for event in self.store.pending_pagerduty_events(limit):
            try:
                verdict = self._evaluate(event, services, notifier)
            except StoreError:  # the store's trouble, not the event's: it stays pending
                raise
            except Exception as exc:  # a bug must not keep later events waiting forever
                log.exception("pagerduty event %d: internal error", event.id)
                verdict = Verdict(event, "failed", f"internal error: {type(exc).__name__}: {exc}")
            done = self._record(verdict)
            decided += done
            mailed += int(done and verdict.outcome == "notified")
        return decided, mailed

    def _evaluate(
        self,
        event: PagerDutyEvent,
        services: Mapping[str, tuple[ServiceSettings, Ruleset]],
        notifier: HelpdeskNotifier | None,
    ) -> Verdict:
        facts = read_facts(event.event)
        basis = self._find(facts)
        if basis is None or basis.service not in services:
            detail = f"{facts.event_type or 'event'} for a key this gateway never sent"
            return Verdict(event, "unknown_key", detail)
        settings, ruleset = services[basis.service]
        try:
            decision = evaluate_pagerduty(
                ruleset, facts.rule_fields(basis), regex_timeout=self.regex_timeout
            )
        except RuleEvaluationError as exc:
            decision = PagerDutyDecision(exc.rule, "mirror")
            log.error("pagerduty event %d: %s; mirror only", event.id, exc)
        if decision.action == "discard":
            return Verdict(event, "discarded", f"pagerduty_rule {decision.rule!r}", basis)
        changed = mirror_update(basis, facts, self.clock())
        theme, to = _addressed(decision, settings, facts.event_type)
        notification = None
        if to and notifier is not None:
            notification = notifier.render_event(
                theme, to, facts.event_type, changed, note=facts.note, agent=facts.agent
            )
        rule = f"pagerduty_rule {decision.rule!r}" if decision.rule else "no pagerduty_rule"
        outcome = "mirrored"
        if notification is not None:
            outcome = "notified" if notification.payload is not None else "notify_failed"
        return Verdict(event, outcome, rule, basis, changed, notification)

    def _find(self, facts: WebhookFacts) -> Incident | None:
        """By the dedup key when the event has one (it is what the gateway sent); notes and
        responders name only PagerDuty's incident id, which the mirror learnt earlier."""
        if facts.incident_key:
            found = self.store.incidents_with_key(facts.incident_key)
            return found[0] if found else None
        return self.store.incident_by_pagerduty_id(facts.pd_id)

    def _record(self, verdict: Verdict) -> int:
        """Phase 2: one transaction per event; 0 if the incident moved (decided again)."""
        event = verdict.event
        with self.store.transaction():
            if verdict.basis is not None and verdict.changed is not None:
                basis = verdict.basis
                if self.store.incident(basis.service, basis.incident_key) != basis:
                    return 0  # a mail changed it meanwhile: stays pending, decided again
                self.store.save_incident(verdict.changed)
                if verdict.notification is not None:
                    notifications.queue(self.store, verdict.notification, None)
            service = verdict.basis.service if verdict.basis is not None else ""
            key = verdict.basis.incident_key if verdict.basis else event.incident_key
            if verdict.outcome == "unknown_key":
                self.store.log_event(
                    "pagerduty_unknown_key", incident_key=key, detail=verdict.detail
                )
            done = self.store.finish_pagerduty_event(
                event.id,
                outcome=verdict.outcome,
                service=service,
                detail=verdict.detail,
                incident_key=key,
            )
        log.info(
            "pagerduty event=%d type=%s key=%r service=%s outcome=%s (%s)",
            event.id,
            event.event_type,
            key,
            service or "-",
            verdict.outcome,
            verdict.detail,
        )
        return int(done)


def _addressed(
    decision: PagerDutyDecision, settings: ServiceSettings, event_type: str
) -> tuple[str, tuple[str, ...]]:
    """(theme, recipients) of the helpdesk mail: the matching reverse rule's, else the
    service's `notify` if it lists this event type in `on`; no recipients: no mail."""
    if decision.action == "notify":
        return decision.theme, decision.to
    notify = settings.notify
    if decision.rule is None and notify is not None and event_type in notify.on:
        return notify.theme, notify.to
    return "", ()


_NO_INCIDENT = Incident(
    service="",
    incident_key="",
    state="",
    summary="",
    trigger_count=0,
    acknowledge_count=0,
    resolve_count=0,
    times_opened=0,
    first_seen=0.0,
    last_seen=0.0,
    opened_at=None,
    resolved_at=None,
    last_message=None,
    case_message_id="",
)


def reverse_rule_problems(
    config: Config, services: Mapping[str, Any], files: FileSnapshot
) -> list[Problem]:
    """A `[[pagerduty_rule]]` that mails needs an [outgoing] relay and an existing theme
    (`services`: the processor's ServiceRuntime per name; checked by `gateway check`)."""
    rules = [r for s in services.values() for r in s.ruleset.pagerduty_rules if r.to]
    if not rules:
        return []
    directory = config.gateway.templates_dir
    names = themes.Themes(directory, files=files).names() if files.exists(directory) else []
    problems = []
    for rule in dict.fromkeys(rules):  # a file shared by services: once
        where = f"pagerduty_rule {rule.name!r}"
        if config.outgoing is None:
            problems.append(Problem(rule.file, f"{where} sends mail: needs an [outgoing] relay",
                                    rule.line, where))  # fmt: skip
        if rule.theme not in names:
            problems.append(Problem(rule.file, f"{where}: no theme {rule.theme!r} in {directory}",
                                    rule.line, f"{where}.theme"))  # fmt: skip
    return problems
