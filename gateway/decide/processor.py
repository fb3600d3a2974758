"""Spool -> parse -> rules -> incident mirror -> outbox, one transaction per batch.

A job (message, service) is decided exactly once: its decision, the incident change and the
outbox item are committed together with the job's state, so a crash before the commit simply
repeats the work and a crash after it never repeats it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.config import PagerDutySettings, ServiceSettings
from gateway.decide import incidents
from gateway.decide.events import build_event
from gateway.decide.notifications import HelpdeskNotifier
from gateway.errors import RuleError, RuleEvaluationError
from gateway.mail.parse import ParsedMail, parse_message
from gateway.outcomes import Outcome
from gateway.rules import Decision, Ruleset, evaluate, load_ruleset
from gateway.store import DecisionStore, PendingJob

log = logging.getLogger(__name__)

# outcomes that are not incident changes


@dataclass(frozen=True)
class ServiceRuntime:
    """What processing needs of one service: its settings and its compiled rules."""

    settings: ServiceSettings
    ruleset: Ruleset


@dataclass(frozen=True)
class Verdict:
    """Phase 1's result for one job: a final outcome, or a decision with its event to apply."""

    job: PendingJob
    outcome: str  # '' when the decision still has to be applied to the incident mirror
    reason: str
    rule: str | None = None
    decision: Decision | None = None
    case_message_id: str = ""  # the Message-ID that opened the incident, for threading
    event: dict | None = None


@dataclass(frozen=True)
class Processed:
    """What happened to one job; logged as one line and returned to callers."""

    job: int
    message: int
    service: str
    source: str
    outcome: str
    reason: str
    rule: str | None = None
    action: str | None = None
    incident_key: str | None = None
    event: dict | None = None  # the PagerDuty event queued (or that would be sent)
    sender: str = ""  # envelope sender ('' is the null sender of bounces)
    queued: bool = False  # True when it went to the outbox (a routing key is configured)

    def log_line(self) -> str:
        return (
            f"message={self.message} job={self.job} source={self.source} from=<{self.sender}>"
            f" service={self.service}"
            f" rule={self.rule!r} action={self.action} key={self.incident_key!r}"
            f" outcome={self.outcome} reason={self.reason!r}"
        )

    def log_fields(self) -> dict[str, object]:
        """The same facts as structured fields, for JSON logs (`extra=`)."""
        return {
            "message_id": self.message,
            "job": self.job,
            "source": self.source,
            "sender": self.sender,
            "service": self.service,
            "rule": self.rule,
            "action": self.action,
            "key": self.incident_key,
            "outcome": self.outcome,
            "reason": self.reason,
        }


class Processor:
    """Decides pending jobs. `services` may be swapped (hot reload) between batches."""

    def __init__(
        self,
        store: DecisionStore,
        services: Mapping[str, ServiceRuntime],
        pagerduty: PagerDutySettings,
        *,
        regex_timeout: float = 0.5,
        on_outbox: Callable[[], None] | None = None,
        notifier: HelpdeskNotifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.services = services
        self.pagerduty = pagerduty
        self.regex_timeout = regex_timeout
        self.on_outbox = on_outbox
        self.clock = clock

    def process_pending(self, batch: int = 200) -> list[Processed]:
        """Decide up to `batch` pending jobs; returns their outcomes.

        Parsing and rules (the CPU work) run before the write transaction, so the spool writer
        is never kept waiting for them; the short transaction then applies every decision.
        """
        jobs = self.store.pending_jobs(batch)
        if not jobs:
            return []
        verdicts = [self._evaluate_safely(job) for job in jobs]
        outcomes: list[Processed] = []
        with self.store.transaction():
            for verdict in verdicts:
                outcome = self._record_safely(verdict)
                if outcome is not None:
                    outcomes.append(outcome)
        for outcome in outcomes:
            log.info("%s", outcome.log_line(), extra=outcome.log_fields())
        if self.on_outbox and any(o.queued for o in outcomes):
            self.on_outbox()
        return outcomes

    def process_all(self) -> list[Processed]:
        outcomes: list[Processed] = []
        while batch := self.process_pending():
            outcomes.extend(batch)
        return outcomes

    # -- phase 1: no database writes ---------------------------------------------------------

    def _evaluate_safely(self, job: PendingJob) -> Verdict:
        """A bug or bad input quarantines one job; it never blocks the rest of the batch."""
        try:
            return self._evaluate(job)
        except Exception as exc:
            log.exception("job %d: internal error, quarantined", job.id)
            return Verdict(job, Outcome.QUARANTINED, f"internal error: {type(exc).__name__}: {exc}")

    def _evaluate(self, job: PendingJob) -> Verdict:
        runtime = self.services.get(job.service)
        if runtime is None:
            return Verdict(job, Outcome.QUARANTINED, f"service {job.service!r} is not configured")
        mail = parse_message(job.raw, job.mail_from)
        if mail.is_auto_reply or mail.is_bounce:
            return Verdict(job, Outcome.LOOP_IGNORED, f"loop guard: {mail.loop_reason}")
        try:
            decision = evaluate(runtime.ruleset, mail, regex_timeout=self.regex_timeout)
        except RuleEvaluationError as exc:
            return Verdict(job, Outcome.QUARANTINED, str(exc), rule=exc.rule)
        if decision.action == "discard" or decision.incident_key is None:
            outcome = Outcome.UNMATCHED if decision.unmatched else Outcome.DISCARDED
            return Verdict(job, outcome, decision.reason, decision=decision)
        event = self._event(runtime, mail, decision)
        return Verdict(
            job,
            "",
            decision.reason,
            decision=decision,
            case_message_id=mail.message_id,
            event=event,
        )

    # -- phase 2: inside the write transaction ------------------------------------------------

    def _record_safely(self, verdict: Verdict) -> Processed | None:
        job = verdict.job
        try:
            with self.store.savepoint():
                if not self.store.job_is_pending(job.id):
                    return None  # another processor (e.g. `gateway ingest`) decided it first
                if verdict.event is None:
                    return self._finish(
                        job,
                        verdict.outcome,
                        verdict.reason,
                        rule=verdict.rule,
                        decision=verdict.decision,
                    )
                return self._act(verdict)
        except Exception as exc:
            log.exception("job %d: internal error, quarantined", job.id)
            return self._finish(
                job, Outcome.QUARANTINED, f"internal error: {type(exc).__name__}: {exc}"
            )

    def _act(self, verdict: Verdict) -> Processed:
        job, decision, event = verdict.job, verdict.decision, verdict.event
        assert decision is not None and event is not None
        runtime = self.services[job.service]
        key = decision.incident_key
        assert key is not None
        existing = self.store.incident(job.service, key)
        changed, outcome = incidents.apply_action(
            existing,
            service=job.service,
            key=key,
            action=decision.action,
            now=self.clock(),
            summary=decision.summary,
            message=job.message,
            case_message_id=verdict.case_message_id,
        )
        queued = False
        if changed is not None:
            self.store.save_incident(changed)
            queued = self._notify(job, runtime, outcome, changed)
        queued = self._queue_event(job, runtime, event) or queued
        return self._finish(
            job, outcome, decision.reason, decision=decision, event=event, queued=queued
        )

    def _notify(self, job: PendingJob, runtime: ServiceRuntime, outcome: str, incident) -> bool:
        notify = runtime.settings.notify
        if notify is None or self.notifier is None:
            return False
        return self.notifier.queue(self.store, notify, outcome, incident, job.id) is not None

    def _event(self, runtime: ServiceRuntime, mail: ParsedMail, decision: Decision) -> dict:
        details = {
            **decision.details,
            "email_subject": mail.subject,
            "email_from": mail.from_,
            "email_message_id": mail.message_id,
            "gateway_rule": decision.rule or "[unmatched]",
        }
        return build_event(
            action=decision.action,
            dedup_key=decision.incident_key or "",
            summary=decision.summary,
            severity=decision.severity,
            source=self.pagerduty.source,
            component=runtime.settings.name,
            rule=decision.rule or "",
            timestamp=mail.date,
            details=details,
            links=list(decision.links),
            client_url=self.pagerduty.client_url,
        )

    def _queue_event(self, job: PendingJob, runtime: ServiceRuntime, event: dict) -> bool:
        """Outbox the event, or (embedded default, no routing key) record what would be sent."""
        key = event["dedup_key"]
        if runtime.settings.routing_key:
            order_key = f"pagerduty:{job.service}:{key}"
            self.store.add_outbox("pagerduty", job.service, order_key, event, job.id)
            return True
        self.store.log_event(
            "would_send",
            service=job.service,
            message=job.message,
            incident_key=key,
            detail=f"no routing_key: {event['event_action']} not sent",
        )
        log.info("service %s has no routing_key; would send %s", job.service, json.dumps(event))
        return False

    def _finish(
        self,
        job: PendingJob,
        outcome: str,
        reason: str,
        *,
        rule: str | None = None,
        decision: Decision | None = None,
        event: dict | None = None,
        queued: bool = False,
    ) -> Processed:
        fields: dict = {"rule": rule}
        if decision is not None:
            fields = {
                "rule": decision.rule,
                "action": decision.action,
                "incident_key": decision.incident_key,
                "summary": decision.summary,
                "severity": decision.severity,
                "details": dict(decision.details),
                "trace": [dataclasses.asdict(step) for step in decision.trace],
            }
        self.store.finish_job(job.id, outcome=outcome, reason=reason, **fields)
        return Processed(
            job=job.id,
            message=job.message,
            service=job.service,
            source=job.source,
            sender=job.mail_from or "",
            outcome=outcome,
            reason=reason,
            rule=fields.get("rule"),
            action=fields.get("action"),
            incident_key=fields.get("incident_key"),
            event=event,
            queued=queued,
        )


def load_services(services: tuple[ServiceSettings, ...]) -> dict[str, ServiceRuntime]:
    """Compile every service's rule files; RuleError lists all problems of all services."""
    runtimes: dict[str, ServiceRuntime] = {}
    problems = []
    for settings in services:
        try:
            runtimes[settings.name] = ServiceRuntime(settings, load_ruleset(list(settings.rules)))
        except RuleError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RuleError(list(dict.fromkeys(problems)))  # a file shared by services: once
    return runtimes
