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

from gateway.config import DEFAULT_INSTALLATION_ID, Config, PagerDutySettings, ServiceSettings
from gateway.config_time import HeartbeatSettings
from gateway.decide import incidents, notifications, rest_actions
from gateway.decide.authenticity import DnsBudget, check_authenticity, with_auth_fields
from gateway.decide.events import build_event, pagerduty_order_key
from gateway.decide.heartbeat_duties import HeartbeatDuties
from gateway.decide.maintenance import active_window, during_maintenance
from gateway.decide.notifications import HelpdeskNotifier, Notification, build_helpdesk_notifier
from gateway.decide.pagerduty_side import PagerDutySide
from gateway.decide.senders import sender_refusal
from gateway.errors import RuleError, RuleEvaluationError
from gateway.files import FileSnapshot
from gateway.mail.authenticity import DnsTxtResolver, TxtResolver
from gateway.mail.loop_guard import loop_verdict
from gateway.mail.parse import ParsedMail, parse_message
from gateway.outcomes import Outcome
from gateway.rules import Decision, Ruleset, TraceStep, evaluate, load_ruleset
from gateway.schedules import MaintenanceWindow, Schedule
from gateway.store import DecisionStore, Incident, PendingJob

log = logging.getLogger(__name__)

# rounds per `process_pending` for jobs whose incident changed between the phases
DECIDE_ROUNDS = 3
# seconds before each new try of a job whose sender check met a DNS failure; then it is decided
# `unauthenticated` (a DNS failure is never a pass)
AUTH_RETRY_DELAYS = (30.0, 60.0, 300.0, 900.0, 1800.0)
AUTH_RETRY_FORGET = 3600.0  # seconds past its time after which an untouched retry is dropped
# seconds of DNS waiting per batch; then the batch's remaining `verify` jobs wait for the next
DNS_BUDGET_SECONDS = 5.0
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
    retry_at: float | None = None  # not decided: try again at this time (a DNS failure)
    heartbeats: tuple[str, ...] = ()  # the [[heartbeat]]s this mail counts for


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


class Processor(HeartbeatDuties):
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
        resolver: TxtResolver | None = None,
        maintenance: tuple[MaintenanceWindow, ...] = (),
        heartbeats: tuple[HeartbeatSettings, ...] = (),
        dns_budget: float = DNS_BUDGET_SECONDS,
        installation_id: str = DEFAULT_INSTALLATION_ID,
    ) -> None:
        self.store = store
        self.installation_id = installation_id  # our own mail's X-Gateway-Loop stamp
        self.resolver = DnsBudget(resolver or DnsTxtResolver(), dns_budget, clock)
        self.deferred: dict[int, tuple[int, float]] = {}  # job -> (tries, not before)
        self.postponed = 0  # verify jobs of the current batch left for the next (DNS budget)
        self.notifier = notifier
        self.services = services
        self.pagerduty = pagerduty
        self.regex_timeout = regex_timeout
        self.on_outbox = on_outbox
        self.clock = clock
        self.maintenance = maintenance
        self.heartbeats = heartbeats
        self._heartbeats_checked = float("-inf")
        self.expect_mail(heartbeats)
        self.pagerduty_side = PagerDutySide(store, clock=clock, regex_timeout=regex_timeout)
        self._look_for_webhooks = True  # see `_decide_pagerduty_events`
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
        maintenance: tuple[MaintenanceWindow, ...] = (),
        heartbeats: tuple[HeartbeatSettings, ...] = (),
        installation_id: str = DEFAULT_INSTALLATION_ID,
    ) -> None:
        """A new configuration generation; call between batches (on the processing thread)."""
        self.services, self.pagerduty = services, pagerduty
        self.regex_timeout, self.notifier = regex_timeout, notifier
        self.maintenance, self.heartbeats = maintenance, heartbeats
        self.expect_mail(heartbeats)
        self.installation_id = installation_id
        self._look_for_webhooks = True

    def process_pending(self, batch: int = 200) -> list[Processed]:
        """Decide up to `batch` pending jobs; returns their outcomes.

        Parsing, rules and themes (the CPU work) run before the write transaction, so the spool
        writer is never kept waiting for them; the short transaction then applies every decision.
        """
        self._decide_pagerduty_events()
        self.resolver.new_batch()
        pending = self.store.pending_jobs(batch + len(self.deferred), BATCH_BYTES)
        drained = _took_all(pending, batch + len(self.deferred))
        jobs = self._due(pending, batch)
        outcomes: list[Processed] = []
        self.postponed = 0
        for _ in range(DECIDE_ROUNDS):
            if not jobs:
                break
            decided, jobs = self._decide(jobs)
            outcomes.extend(decided)
        if jobs:
            log.info("%d job(s) raced another writer; they stay pending for now", len(jobs))
        if self.postponed:
            log.info("%d sender check(s) wait for the next batch: DNS was slow", self.postponed)
        # jobs left pending on purpose (a DNS retry later, or the DNS budget) wait for their
        # time or the next wake, not for another look right now
        self.drained = drained and not jobs
        return outcomes

    def _due(self, jobs: list[PendingJob], batch: int) -> list[PendingJob]:
        """The jobs not waiting for a retry. A retry left untouched long after it was due
        belongs to a job decided elsewhere (`gateway ingest`): it is forgotten."""
        now = self.clock()
        stale = now - AUTH_RETRY_FORGET
        self.deferred = {k: v for k, v in self.deferred.items() if v[1] > stale}
        waiting = {k for k, (_, at) in self.deferred.items() if at > now}
        return [job for job in jobs if job.id not in waiting][:batch]

    def _decide_pagerduty_events(self) -> None:
        """Webhook deliveries first: they are few, and a mail judged after them sees what
        PagerDuty said (e.g. an incident resolved there opens anew on the next "new" mail).
        Without a webhook secret nothing new is stored: one look after each (re)configuration
        (and on while it finds some) decides what an earlier configuration stored, and the
        mail hot path is spared a query per batch."""
        if not self._look_for_webhooks:
            return
        services = {n: (r.settings, r.ruleset) for n, r in self.services.items()}
        self.pagerduty_side.regex_timeout = self.regex_timeout
        decided, mailed = self.pagerduty_side.process_pending(services, self.notifier)
        self._look_for_webhooks = bool(self.pagerduty.webhook_secret) or decided > 0
        if mailed and self.on_outbox:
            self.on_outbox()

    def process_backlog(self, max_batches: int) -> bool:
        """Batches until the backlog is empty (True) or `max_batches` ran (False). A batch that
        took every pending job ends it: no second query only to find nothing left."""
        return any(not self.process_pending() or self.drained for _ in range(max_batches))

    def _decide(self, jobs: list[PendingJob]) -> tuple[list[Processed], list[PendingJob]]:
        """Both phases for `jobs`: (what was decided, the jobs to decide again)."""
        ahead: dict[tuple[str, str], Incident | None] = {}  # incidents as this batch leaves them
        parsed: dict[int, ParsedMail] = {}  # a mail to several services is parsed once
        verdicts = [self._evaluate_safely(job, ahead, parsed) for job in jobs]
        verdicts = [v for v in verdicts if v.retry_at is None]
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
        loop = loop_verdict(
            mail, mode=runtime.settings.loop_guard, installation_id=self.installation_id
        )
        if loop.ignored:
            return Verdict(job, Outcome.LOOP_IGNORED, f"loop guard: {loop.describe()}")
        auth_settings = runtime.settings.authentication
        if auth_settings.require == "verify" and self.resolver.exhausted:
            self.postponed += 1  # not a try: the next batch asks DNS again
            return Verdict(job, Outcome.UNAUTHENTICATED, "DNS budget spent", retry_at=0.0)
        auth = check_authenticity(auth_settings, job.raw, self.resolver)
        if auth.refusal is not None:
            return self._unauthenticated(job, auth.refusal, auth.temporary)
        self.deferred.pop(job.id, None)
        mail = with_auth_fields(mail, auth)
        try:
            decision = evaluate(
                runtime.ruleset, mail, regex_timeout=self.regex_timeout, at=job.received_at
            )
        except RuleEvaluationError as exc:
            return Verdict(job, Outcome.QUARANTINED, str(exc), rule=exc.rule)
        seen = self.expected_mail(job, mail, decision.rule)  # [[heartbeat]]s it counts for
        # a notification the service's loop_guard let through: its reason says so
        let_through = f"; loop guard: {loop.describe()}" if loop.signal else ""
        if decision.action == "discard" or decision.incident_key is None:
            outcome = non_action_outcome(decision)
            reason = decision.reason + let_through
            return Verdict(job, outcome, reason, decision=decision, heartbeats=seen)
        window = active_window(self.maintenance, job.service, job.received_at)
        decision, suppressed = during_maintenance(decision, window)
        if suppressed:
            reason = decision.reason + let_through
            return Verdict(job, Outcome.MAINTENANCE, reason, decision=decision, heartbeats=seen)
        event = self._event(runtime, mail, decision)
        change = self._change(job, runtime, decision, mail, ahead)
        return Verdict(
            job,
            change.outcome,
            decision.reason + let_through,
            decision=decision,
            event=event,
            change=change,
            heartbeats=seen,
        )

    def _unauthenticated(self, job: PendingJob, reason: str, temporary: bool) -> Verdict:
        """Kept as `unauthenticated`; after a DNS failure, first tried again a few times."""
        tries = self.deferred.get(job.id, (0, 0.0))[0]
        if temporary and tries < len(AUTH_RETRY_DELAYS):
            retry_at = self.clock() + AUTH_RETRY_DELAYS[tries]
            self.deferred[job.id] = (tries + 1, retry_at)
            log.warning(
                "message=%d job=%d: sender check met a DNS failure; try %d of %d in %.0fs: %s",
                job.message,
                job.id,
                tries + 1,
                len(AUTH_RETRY_DELAYS),
                AUTH_RETRY_DELAYS[tries],
                reason,
            )
            return Verdict(job, Outcome.UNAUTHENTICATED, reason, retry_at=retry_at)
        self.deferred.pop(job.id, None)
        if temporary:
            reason = f"{reason} (DNS still failing after {tries} retries)"
        return Verdict(job, Outcome.UNAUTHENTICATED, reason)

    def _change(
        self,
        job: PendingJob,
        runtime: ServiceRuntime,
        decision: Decision,
        mail: ParsedMail,
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
            case_message_id=mail.message_id,
            routing_key=runtime.settings.routing_key or "",
            case_fields=_case_fields(mail, decision),
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
                    done = self._finish(
                        job,
                        verdict.outcome,
                        verdict.reason,
                        rule=verdict.rule,
                        decision=verdict.decision,
                        only_once=True,
                    )
                else:
                    done = self._act(verdict)
                if self.heartbeats_seen(job, verdict.heartbeats):
                    done = dataclasses.replace(done, queued=True)
                return done
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
        reason = verdict.reason
        if _is_echo(change.basis, decision.action):
            self.store.log_event(
                "echo_suppressed",
                service=job.service,
                message=job.message,
                incident_key=decision.incident_key,
                detail=f"{decision.action} not sent: PagerDuty itself changed the incident",
            )
        else:
            incident = change.changed or change.basis
            absorbed = self._absorb_repeat(job, runtime, change, event)
            if absorbed is not None:
                reason = f"{reason}; coalesced into outbox item {absorbed}"
            else:
                opens = change.outcome
                queued = self._queue_event(job, runtime, event, incident, opens=opens) or queued
        queued = self._queue_rest(job, decision, change) or queued
        return self._finish(
            job,
            change.outcome,
            reason,
            decision=decision,
            event=event,
            queued=queued,
            only_once=True,
        )

    def _absorb_repeat(
        self, job: PendingJob, runtime: ServiceRuntime, change: IncidentChange, event: dict
    ) -> int | None:
        """A repeat trigger of an open incident whose trigger is queued, in flight or was
        accepted adds nothing to send (PagerDuty would dedup it): a still unclaimed trigger
        takes its details, and the incident counts it. The absorbing item's id, or None:
        queue the event (no routing key, or the earlier trigger is a dead letter or gone)."""
        incident = change.changed
        if change.outcome != Outcome.DUPLICATE or incident is None:
            return None
        if not runtime.settings.routing_key:
            return None
        order_key = pagerduty_order_key(job.service, event["dedup_key"])
        since = incident.opened_at or incident.first_seen
        trigger = next(
            (
                item
                for item in self.store.key_outbox(order_key, since)
                if item.payload.get("event_action") == "trigger"
            ),
            None,
        )
        if trigger is None or trigger.state == "dead":
            return None
        if trigger.state == "pending":  # in flight: it keeps what is being sent
            pinned = incidents.pinned_routing_key(event, incident, runtime.settings.routing_key)
            self.store.coalesce_outbox(trigger.id, pinned)
        self.store.note_coalesced(
            job.service, incident.incident_key, self.clock(), repeat_details(event)
        )
        return trigger.id

    def _queue_rest(self, job: PendingJob, decision: Decision, change: IncidentChange) -> bool:
        """The rule's REST actions (priority, urgency, note, assignment) for this incident."""
        assert decision.incident_key is not None
        count = rest_actions.queue_rest_actions(
            self.store,
            decision.rest,
            service=job.service,
            key=decision.incident_key,
            incident=change.changed or change.basis,
            job=job.id,
            enabled=bool(self.pagerduty.api_token),
        )
        return count > 0

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

    def _queue_event(
        self,
        job: PendingJob,
        runtime: ServiceRuntime,
        event: dict,
        incident: Incident | None,
        *,
        opens: str = "",
    ) -> bool:
        """Outbox the event with its incident's routing key, or (embedded default, no routing
        key) record what would be sent. A trigger that opens an incident (`opens` is
        TRIGGERED) is claimed ahead of busy keys."""
        key = event["dedup_key"]
        current = runtime.settings.routing_key
        if current:
            order_key = pagerduty_order_key(job.service, key)
            pinned = incidents.pinned_routing_key(event, incident, current)
            priority = 0 if opens == Outcome.TRIGGERED else 1
            self.store.add_outbox("pagerduty", job.service, order_key, pinned, job.id, priority)
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


def repeat_details(event: dict) -> dict[str, object]:
    """What an absorbed repeat trigger said, as its incident keeps it."""
    payload = event.get("payload") or {}
    return {
        "summary": payload.get("summary", ""),
        "severity": payload.get("severity", ""),
        "custom_details": payload.get("custom_details") or {},
    }


def _case_fields(mail: ParsedMail, decision: Decision) -> str:
    """What the helpdesk's later notifications about this incident may quote of the case."""
    fields = {
        "subject": mail.subject,
        "from": mail.from_,
        "message_id": mail.message_id,
        "key": decision.incident_key,
        "details": dict(decision.details),
    }
    return json.dumps(fields, ensure_ascii=False)


def _is_echo(basis: Incident | None, action: str) -> bool:
    """A mail acknowledging or resolving what PagerDuty already acknowledged or resolved
    (the helpdesk reacting to our own notification): sending it back would be an echo."""
    if basis is None or basis.changed_by != "pagerduty" or action == "trigger":
        return False
    if action == "resolve":
        return basis.state == "resolved"
    return basis.state in ("acknowledged", "resolved")


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


def non_action_outcome(decision: Decision) -> Outcome:
    """The outcome of a decision that sends nothing: filtered, unmatched or discarded."""
    if decision.filtered:
        return Outcome.FILTERED
    return Outcome.UNMATCHED if decision.unmatched else Outcome.DISCARDED


def _trace_row(step: TraceStep) -> dict[str, object]:
    """What `dataclasses.asdict` gives for a flat record, without its deep copy per value."""
    return {name: getattr(step, name) for name in _TRACE_FIELDS}


def load_services(
    services: tuple[ServiceSettings, ...],
    *,
    files: FileSnapshot | None = None,
    schedules: Mapping[str, Schedule] | None = None,
) -> dict[str, ServiceRuntime]:
    """Compile every service's rule files; RuleError lists all problems of all services."""
    runtimes: dict[str, ServiceRuntime] = {}
    problems = []
    for settings in services:
        try:
            ruleset = load_ruleset(list(settings.rules), files=files, schedules=schedules)
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
        maintenance=config.maintenance,
        heartbeats=config.heartbeats,
        installation_id=config.gateway.installation_id,
    )
