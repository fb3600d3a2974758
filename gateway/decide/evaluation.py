"""Phase 1 of a batch: everything about one job that needs no database write.

Sender policy, parsing, the loop guard, sender authenticity, the rules, maintenance windows,
the PagerDuty event, and the incident change (computed from a read of the incident, carried
forward through the batch in `ahead` so two jobs of one key see each other) with the helpdesk
notification it causes, rendered here. The incidents a batch acts on are read in one query,
once the rules named them (`_evaluate_batch`): on PostgreSQL a read per job was a round trip
per job. A mixin of `Processor` (which provides the attributes below), kept apart so each
phase reads on its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from gateway.config import PagerDutySettings
from gateway.decide import incidents
from gateway.decide.authenticity import DnsBudget, check_authenticity, with_auth_fields
from gateway.decide.events import build_event
from gateway.decide.maintenance import active_window, during_maintenance
from gateway.decide.notifications import HelpdeskNotifier
from gateway.decide.senders import sender_refusal
from gateway.decide.verdicts import IncidentChange, ServiceRuntime, Verdict, non_action_outcome
from gateway.errors import RuleEvaluationError, StoreError
from gateway.mail.loop_guard import loop_verdict
from gateway.mail.parse import ParsedMail, parse_message
from gateway.outcomes import Outcome
from gateway.rules import Decision, evaluate
from gateway.schedules import MaintenanceWindow
from gateway.store import DecisionStore, Incident, PendingJob

log = logging.getLogger(__name__)

# seconds before each new try of a job whose sender check met a DNS failure; then it is decided
# `unauthenticated` (a DNS failure is never a pass)
AUTH_RETRY_DELAYS = (30.0, 60.0, 300.0, 900.0, 1800.0)


@dataclass(frozen=True)
class AwaitingIncident:
    """A job's phase 1 up to its incident: what the change needs once the batch's incidents
    are read."""

    job: PendingJob
    runtime: ServiceRuntime
    mail: ParsedMail
    decision: Decision
    event: dict
    reason: str
    heartbeats: tuple[str, ...]

    @property
    def slot(self) -> tuple[str, str]:
        assert self.decision.incident_key is not None
        return (self.job.service, self.decision.incident_key)


class EvaluationSteps:
    """What `Processor` does in phase 1; it provides these attributes."""

    store: DecisionStore
    services: Mapping[str, ServiceRuntime]
    pagerduty: PagerDutySettings
    clock: Callable[[], float]
    regex_timeout: float
    resolver: DnsBudget
    deferred: dict[int, tuple[int, float]]  # job -> (tries, not before)
    postponed: int
    maintenance: tuple[MaintenanceWindow, ...]
    notifier: HelpdeskNotifier | None
    installation_id: str
    expected_mail: Callable[[PendingJob, ParsedMail, str | None], tuple[str, ...]]

    def _evaluate_batch(
        self,
        jobs: list[PendingJob],
        ahead: dict[tuple[str, str], Incident | None],
        parsed: dict[int, ParsedMail],
    ) -> list[Verdict]:
        """Phase 1 for `jobs`, in acceptance order: the rules for each, then the incidents they
        act on (those not already `ahead`) in one read, then each job's change."""
        steps = [self._evaluate_safely(job, parsed) for job in jobs]
        wanted = list(
            dict.fromkeys(
                step.slot
                for step in steps
                if isinstance(step, AwaitingIncident) and step.slot not in ahead
            )
        )
        found = self.store.incidents_of(wanted) if wanted else {}
        ahead.update((slot, found.get(slot)) for slot in wanted)
        return [
            self._complete_safely(step, ahead) if isinstance(step, AwaitingIncident) else step
            for step in steps
        ]

    def _evaluate_safely(
        self, job: PendingJob, parsed: dict[int, ParsedMail]
    ) -> Verdict | AwaitingIncident:
        """A bug or bad input quarantines one job; it never blocks the rest of the batch."""
        try:
            return self._evaluate(job, parsed)
        except StoreError:  # not the mail's fault: the batch stops, its jobs stay pending
            raise
        except Exception as exc:
            return _quarantined(job, exc)

    def _complete_safely(
        self, step: AwaitingIncident, ahead: dict[tuple[str, str], Incident | None]
    ) -> Verdict:
        """The job's incident change (and helpdesk mail); a failure quarantines this job."""
        try:
            change = self._change(step.job, step.runtime, step.decision, step.mail, ahead)
        except StoreError:
            raise
        except Exception as exc:
            return _quarantined(step.job, exc)
        return Verdict(
            step.job,
            change.outcome,
            step.reason,
            decision=step.decision,
            event=step.event,
            change=change,
            heartbeats=step.heartbeats,
        )

    def _evaluate(
        self, job: PendingJob, parsed: dict[int, ParsedMail]
    ) -> Verdict | AwaitingIncident:
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
        return AwaitingIncident(
            job, runtime, mail, decision, event, decision.reason + let_through, seen
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


def _quarantined(job: PendingJob, exc: Exception) -> Verdict:
    log.exception("message=%d job=%d: internal error, quarantined", job.message, job.id)
    return Verdict(job, Outcome.QUARANTINED, f"internal error: {type(exc).__name__}: {exc}")


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
