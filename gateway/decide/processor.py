"""Spool -> parse -> rules -> incident mirror -> outbox, one transaction per batch.

A job (message, service) is decided exactly once: its decision, the incident change and the
outbox item are committed together with the job's state, so a crash before the commit simply
repeats the work and a crash after it never repeats it.

Each batch runs in two phases. Phase 1 does all the CPU work without holding the write lock:
parsing, rules, the incident change (computed from a read of the incident, carried forward
through the batch so two jobs of one key see each other) and the helpdesk notification's
theme, which needs that change. Phase 2, the short write transaction, re-reads each incident
under the lock: if it is still what phase 1 read, the prepared change, event and mail are
inserted; if another writer (`gateway ingest`, a job that failed earlier in the batch) changed
it meanwhile, the job is left pending and decided again from the new state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.config import Config, PagerDutySettings, ServiceSettings
from gateway.decide import incidents, notifications
from gateway.decide.events import build_event, pagerduty_order_key
from gateway.decide.notifications import HelpdeskNotifier, Notification, build_helpdesk_notifier
from gateway.decide.senders import sender_refusal
from gateway.errors import RuleError, RuleEvaluationError
from gateway.files import FileSnapshot
from gateway.mail.parse import ParsedMail, parse_message
from gateway.outcomes import Outcome
from gateway.rules import Decision, Ruleset, TraceStep, evaluate, load_ruleset
from gateway.store import DecisionStore, Incident, PendingJob

log = logging.getLogger(__name__)

# rounds per `process_pending` for jobs whose incident changed between the phases
DECIDE_ROUNDS = 3
# mail per batch, about (`DecisionStore.pending_jobs`): a backlog of big mails never loads at once
BATCH_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServiceRuntime:
    """What processing needs of one service: its settings and its compiled rules."""

    settings: ServiceSettings
    ruleset: Ruleset


@dataclass(frozen=True)
class IncidentChange:
    """Phase 1's incident change for one action; phase 2 applies it if `basis` still holds."""

    basis: Incident | None  # the incident as phase 1 saw it
    changed: Incident | None  # after the action; None: nothing to record
    outcome: str
    notification: Notification | None = None  # rendered helpdesk mail, if subscribed


@dataclass(frozen=True)
class Verdict:
    """Phase 1's result for one job: a final outcome, or a decision with its event to apply."""

    job: PendingJob
    outcome: str
    reason: str
    rule: str | None = None
    decision: Decision | None = None
    event: dict | None = None
    change: IncidentChange | None = None  # with `event`: the incident action to apply


class IncidentMoved(Exception):
    """Phase 2 found the incident changed since phase 1 read it: decide the job again."""


class DecidedElsewhere(Exception):
    """Phase 2 found the job decided already (`gateway ingest`, another processor): its
    savepoint is undone and nothing is recorded twice."""


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
        # the last `process_pending` took every job that was pending when it looked: the next
        # call would find nothing new unless a commit came after (which wakes the worker again)
        self.drained = False

    def reconfigure(
        self,
        services: Mapping[str, ServiceRuntime],
        pagerduty: PagerDutySettings,
        *,
        regex_timeout: float,
        notifier: HelpdeskNotifier | None,
    ) -> None:
        """A new configuration generation; call between batches (on the processing thread)."""
        self.services, self.pagerduty = services, pagerduty
        self.regex_timeout, self.notifier = regex_timeout, notifier

    def process_pending(self, batch: int = 200) -> list[Processed]:
        """Decide up to `batch` pending jobs; returns their outcomes.

        Parsing, rules and themes (the CPU work) run before the write transaction, so the spool
        writer is never kept waiting for them; the short transaction then applies every decision.
        """
        jobs = self.store.pending_jobs(batch, BATCH_BYTES)
        drained = _took_all(jobs, batch)
        outcomes: list[Processed] = []
        for _ in range(DECIDE_ROUNDS):
            if not jobs:
                break
            decided, jobs = self._decide(jobs)
            outcomes.extend(decided)
        if jobs:
            log.info("%d job(s) raced another writer; they stay pending for now", len(jobs))
        self.drained = drained and not jobs
        return outcomes

    def process_backlog(self, max_batches: int) -> bool:
        """Batches until the backlog is empty (True) or `max_batches` ran (False). A batch that
        took every pending job ends it: no second query only to find nothing left."""
        return any(not self.process_pending() or self.drained for _ in range(max_batches))

    def _decide(self, jobs: list[PendingJob]) -> tuple[list[Processed], list[PendingJob]]:
        """Both phases for `jobs`: (what was decided, the jobs to decide again)."""
        ahead: dict[tuple[str, str], Incident | None] = {}  # incidents as this batch leaves them
        parsed: dict[int, ParsedMail] = {}  # a mail to several services is parsed once
        verdicts = [self._evaluate_safely(job, ahead, parsed) for job in jobs]
        outcomes: list[Processed] = []
        again: list[PendingJob] = []
        with self.store.transaction():
            for verdict in verdicts:
                try:
                    outcome = self._record_safely(verdict)
                except IncidentMoved:
                    again.append(verdict.job)
                    continue
                if outcome is not None:
                    outcomes.append(outcome)
        if log.isEnabledFor(logging.INFO):  # the line's text and fields are built only if shown
            for outcome in outcomes:
                log.info("%s", outcome.log_line(), extra=outcome.log_fields())
        if self.on_outbox and any(o.queued for o in outcomes):
            self.on_outbox()
        return outcomes, again

    def process_all(self) -> list[Processed]:
        outcomes: list[Processed] = []
        while batch := self.process_pending():
            outcomes.extend(batch)
        return outcomes

    # -- phase 1: no database writes ---------------------------------------------------------

    def _evaluate_safely(
        self,
        job: PendingJob,
        ahead: dict[tuple[str, str], Incident | None],
        parsed: dict[int, ParsedMail],
    ) -> Verdict:
        """A bug or bad input quarantines one job; it never blocks the rest of the batch."""
        try:
            return self._evaluate(job, ahead, parsed)
        except Exception as exc:
            log.exception("message=%d job=%d: internal error, quarantined", job.message, job.id)
            return Verdict(job, Outcome.QUARANTINED, f"internal error: {type(exc).__name__}: {exc}")

    def _evaluate(
        self,
        job: PendingJob,
        ahead: dict[tuple[str, str], Incident | None],
        parsed: dict[int, ParsedMail],
    ) -> Verdict:
        runtime = self.services.get(job.service)
        if runtime is None:
            return Verdict(job, Outcome.QUARANTINED, f"service {job.service!r} is not configured")
        refusal = sender_refusal(runtime.settings, job.raw, job.mail_from)
        if refusal is not None:
            return Verdict(job, Outcome.SENDER_REFUSED, refusal)
        mail = parsed.get(job.message)
        if mail is None:  # ParsedMail is frozen: one parse serves every service of the message
            mail = parsed[job.message] = parse_message(job.raw, job.mail_from)
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
        change = self._change(job, runtime, decision, mail.message_id, ahead)
        return Verdict(
            job, change.outcome, decision.reason, decision=decision, event=event, change=change
        )

    def _change(
        self,
        job: PendingJob,
        runtime: ServiceRuntime,
        decision: Decision,
        case_message_id: str,
        ahead: dict[tuple[str, str], Incident | None],
    ) -> IncidentChange:
        """The incident after the action, and the helpdesk mail it causes, rendered here."""
        key = decision.incident_key
        assert key is not None
        slot = (job.service, key)
        basis = ahead[slot] if slot in ahead else self.store.incident(job.service, key)
        changed, outcome = incidents.apply_action(
            basis,
            service=job.service,
            key=key,
            action=decision.action,
            now=self.clock(),
            summary=decision.summary,
            message=job.message,
            case_message_id=case_message_id,
        )
        notification = None
        notify = runtime.settings.notify
        if changed is not None and notify is not None and self.notifier is not None:
            notification = self.notifier.render(notify, outcome, changed)
        ahead[slot] = basis if changed is None else changed
        return IncidentChange(basis, changed, outcome, notification)

    # -- phase 2: inside the write transaction ------------------------------------------------

    def _record_safely(self, verdict: Verdict) -> Processed | None:
        """None if the job was decided elsewhere; IncidentMoved if it must be decided again."""
        job = verdict.job
        try:
            with self.store.savepoint():
                if verdict.change is None:
                    return self._finish(
                        job,
                        verdict.outcome,
                        verdict.reason,
                        rule=verdict.rule,
                        decision=verdict.decision,
                        only_once=True,
                    )
                return self._act(verdict)
        except DecidedElsewhere:
            return None  # another processor (e.g. `gateway ingest`) decided it first
        except IncidentMoved:
            raise
        except Exception as exc:
            log.exception("message=%d job=%d: internal error, quarantined", job.message, job.id)
            return self._finish(
                job, Outcome.QUARANTINED, f"internal error: {type(exc).__name__}: {exc}"
            )

    def _act(self, verdict: Verdict) -> Processed:
        job, decision, event, change = verdict.job, verdict.decision, verdict.event, verdict.change
        assert decision is not None and event is not None and change is not None
        assert decision.incident_key is not None
        if self.store.incident(job.service, decision.incident_key) != change.basis:
            raise IncidentMoved(job.id)  # before any write: the job simply stays pending
        queued = False
        if change.changed is not None:
            self.store.save_incident(change.changed)
            if change.notification is not None:
                queued = notifications.queue(self.store, change.notification, job.id) is not None
        runtime = self.services[job.service]
        queued = self._queue_event(job, runtime, event) or queued
        return self._finish(
            job,
            change.outcome,
            decision.reason,
            decision=decision,
            event=event,
            queued=queued,
            only_once=True,
        )

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
            order_key = pagerduty_order_key(job.service, key)
            self.store.add_outbox("pagerduty", job.service, order_key, event, job.id)
            return True
        self.store.log_event(
            "would_send",
            service=job.service,
            message=job.message,
            incident_key=key,
            detail=f"no routing_key: {event['event_action']} not sent",
        )
        log.info(
            "message=%d job=%d: service %s has no routing_key; would send %s",
            job.message,
            job.id,
            job.service,
            json.dumps(event),
        )
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
        only_once: bool = False,
    ) -> Processed:
        """Record the decision. `only_once` (inside the job's savepoint): DecidedElsewhere if
        the job is no longer pending, so the savepoint undoes this job's other writes."""
        fields: dict = {"rule": rule}
        if decision is not None:
            fields = {
                "rule": decision.rule,
                "action": decision.action,
                "incident_key": decision.incident_key,
                "summary": decision.summary,
                "severity": decision.severity,
                "details": dict(decision.details),
                "trace": [_trace_row(step) for step in decision.trace],
            }
        recorded = self.store.finish_job(job.id, outcome=outcome, reason=reason, **fields)
        if only_once and not recorded:
            raise DecidedElsewhere(job.id)
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


def _took_all(jobs: list[PendingJob], limit: int) -> bool:
    """Whether `pending_jobs(limit, BATCH_BYTES)` returned every pending job: fewer than the
    limit and, since it cuts only once `BATCH_BYTES` are reached, fewer bytes. A job without its
    bytes (purged) makes the size unknown: then assume more."""
    if len(jobs) >= limit:
        return False
    size = 0
    for job in jobs:
        if not job.raw:
            return False
        size += len(job.raw)
    return size < BATCH_BYTES


_TRACE_FIELDS = tuple(field.name for field in dataclasses.fields(TraceStep))


def _trace_row(step: TraceStep) -> dict[str, object]:
    """What `dataclasses.asdict` gives for a flat record, without its deep copy per value."""
    return {name: getattr(step, name) for name in _TRACE_FIELDS}


def load_services(
    services: tuple[ServiceSettings, ...], *, files: FileSnapshot | None = None
) -> dict[str, ServiceRuntime]:
    """Compile every service's rule files; RuleError lists all problems of all services."""
    runtimes: dict[str, ServiceRuntime] = {}
    problems = []
    for settings in services:
        try:
            ruleset = load_ruleset(list(settings.rules), files=files)
            runtimes[settings.name] = ServiceRuntime(settings, ruleset)
        except RuleError as exc:
            problems.extend(exc.problems)
    if problems:
        raise RuleError(list(dict.fromkeys(problems)))  # a file shared by services: once
    return runtimes


def build_processor(
    config: Config,
    store: DecisionStore,
    services: Mapping[str, ServiceRuntime],
    *,
    on_outbox: Callable[[], None] | None = None,
    files: FileSnapshot | None = None,
) -> Processor:
    """A Processor set up from the config (regex timeout, helpdesk notifications).

    `files`: the generation's recorded files, so themes compile from the validated bytes.
    ThemeError if a service wants notifications and the themes are broken.
    """
    return Processor(
        store,
        services,
        config.pagerduty,
        regex_timeout=config.gateway.regex_timeout_seconds,
        on_outbox=on_outbox,
        notifier=build_helpdesk_notifier(config, files=files),
    )
