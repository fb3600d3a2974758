"""Phase 2 of a batch, inside its write transaction: what phase 1 prepared, recorded.

The batch in one savepoint, and job by job in savepoints of their own only if one job fails:
the incident is read again under the lock and the prepared change, event and mail are written
only if it is still what phase 1 saw (else IncidentMoved: the job stays pending and is decided
again); a job decided meanwhile elsewhere undoes its savepoint (DecidedElsewhere). Repeats of
a trigger still queued are coalesced into it, echoes of PagerDuty's own changes are not sent
back. A mixin of `Processor` (which provides the attributes below), kept apart so each phase
reads on its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping

from gateway.config import PagerDutySettings
from gateway.decide import incidents, notifications, rest_actions
from gateway.decide.events import pagerduty_order_key
from gateway.decide.held import BatchIncidents, HeldIncidents, OneByOne
from gateway.decide.verdicts import (
    DecidedElsewhere,
    IncidentChange,
    IncidentMoved,
    Processed,
    ServiceRuntime,
    Verdict,
)
from gateway.errors import StoreUnavailable
from gateway.outcomes import Outcome
from gateway.rules import Decision, TraceStep
from gateway.store import DecisionStore, Incident, JobDecision, PendingJob

log = logging.getLogger(__name__)


class _OneJobFailed(Exception):
    """A job of a batch recorded without savepoints per job failed: record it job by job."""


class RecordingSteps:
    """What `Processor` does in phase 2; it provides these attributes."""

    store: DecisionStore
    services: Mapping[str, ServiceRuntime]
    pagerduty: PagerDutySettings
    clock: Callable[[], float]
    heartbeats_seen: Callable[[PendingJob, tuple[str, ...]], bool]

    # the batch's incidents under this transaction's locks (see `held.py`)
    _incidents: HeldIncidents | None = None
    # the fast path's job decisions, recorded at once at the end of the batch; None: at once
    _unrecorded: list[JobDecision] | None = None

    def _record_batch(self, verdicts: list[Verdict]) -> tuple[list[Processed], list[PendingJob]]:
        """Phase 2 for a batch, inside its transaction: (what was decided, the jobs to decide
        again). Every incident the batch acts on is locked and read first; the whole batch
        then goes in one savepoint, its incidents and its jobs' decisions written at the end,
        a statement each; it nearly always goes through. On PostgreSQL each statement saved is
        a round trip: a lock, a read, a write, a savepoint, its release and a job update per
        job held one decider to ~950 decisions/s. If any job fails, the batch's writes are
        undone and it is recorded again with each job in a savepoint of its own, so only that
        job is quarantined (or left to whoever decided it first)."""
        batch = self._lock_batch([_slot(v) for v in verdicts if v.change is not None])
        try:
            if batch is None:
                raise _OneJobFailed()
            with self.store.savepoint():
                return self._record_fast(verdicts, batch)
        except _OneJobFailed:
            self._incidents, self._unrecorded = OneByOne(self.store), None
            return self._record_each(verdicts, careful=True)
        finally:
            self._incidents = self._unrecorded = None

    def _lock_batch(self, slots: list[tuple[str, str]]) -> BatchIncidents | None:
        """The batch's incidents, locked (in the one order every decider follows) and read in
        a savepoint of their own: the locks then last the whole transaction, the job-by-job
        redo included, which would otherwise take them job by job in another order than a
        second decider (`gateway ingest`) and meet it in a deadlock. None if the database
        refuses a key: the job-by-job redo then fails that job alone."""
        if not slots:  # nothing to lock (unmatched mail, discards): no statement at all
            return BatchIncidents(self.store, slots)
        try:
            with self.store.savepoint():
                return BatchIncidents(self.store, slots)
        except StoreUnavailable:
            raise  # the batch stays pending and is tried again
        except Exception as exc:
            log.warning("locking a batch's incidents failed, recording it job by job: %s", exc)
            return None

    def _record_fast(
        self, verdicts: list[Verdict], batch: BatchIncidents
    ) -> tuple[list[Processed], list[PendingJob]]:
        """The batch without a savepoint per job; _OneJobFailed if any job fails, or if a job
        turns out decided already (or held by another decider) when the decisions are written."""
        unrecorded: list[JobDecision] = []
        self._incidents, self._unrecorded = batch, unrecorded
        decided = self._record_each(verdicts, careful=False)
        try:
            batch.write()  # a heartbeat may have written some already (`_record`)
            recorded = self.store.finish_jobs(unrecorded)
        except Exception as exc:
            raise _OneJobFailed() from exc
        if len(recorded) != len(unrecorded):
            raise _OneJobFailed()
        return decided

    def _record_each(
        self, verdicts: list[Verdict], *, careful: bool
    ) -> tuple[list[Processed], list[PendingJob]]:
        outcomes: list[Processed] = []
        again: list[PendingJob] = []
        for verdict in verdicts:
            try:
                outcome = self._record_safely(verdict) if careful else self._record_or_stop(verdict)
            except IncidentMoved:
                again.append(verdict.job)
                continue
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes, again

    def _record_or_stop(self, verdict: Verdict) -> Processed:
        """Without a savepoint of its own: a job that fails stops the batch (_OneJobFailed),
        whose savepoint then undoes what this job half wrote."""
        try:
            return self._record(verdict)
        except IncidentMoved:
            raise  # raised before the job wrote anything: it simply stays pending
        except Exception as exc:
            raise _OneJobFailed(verdict.job.id) from exc

    def _record_safely(self, verdict: Verdict) -> Processed | None:
        """None if the job was decided elsewhere; IncidentMoved if it must be decided again."""
        job = verdict.job
        try:
            with self.store.savepoint():
                return self._record(verdict)
        except DecidedElsewhere:
            return None  # another processor (e.g. `gateway ingest`) decided it first
        except (IncidentMoved, StoreUnavailable):
            raise  # not this job's fault: it stays pending (the whole batch, for the store)
        except Exception as exc:
            reason = f"internal error: {type(exc).__name__}: {exc}"
            try:
                done = self._finish(job, Outcome.QUARANTINED, reason, only_once=True)
            except DecidedElsewhere:
                return None  # (and the decision that counts is the other one's)
            log.exception("message=%d job=%d: internal error, quarantined", job.message, job.id)
            return done

    def _record(self, verdict: Verdict) -> Processed:
        job = verdict.job
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
        if verdict.heartbeats and self._incidents is not None:
            # a heartbeat reads and writes its incident in the store: the batch's go first,
            # and the rest of the batch reads and writes each in the store too
            self._incidents.write()
            self._incidents = OneByOne(self.store)
        if self.heartbeats_seen(job, verdict.heartbeats):
            done = dataclasses.replace(done, queued=True)
        return done

    def _act(self, verdict: Verdict) -> Processed:
        job, decision, event, change = verdict.job, verdict.decision, verdict.event, verdict.change
        assert decision is not None and event is not None and change is not None
        held = self._incidents or OneByOne(self.store)
        if held.incident(_slot(verdict)) != change.basis:
            raise IncidentMoved(job.id)  # before any write: the job simply stays pending
        queued = False
        if change.changed is not None:
            held.save(change.changed)
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
        held = self._incidents or OneByOne(self.store)
        held.note_repeat((job.service, incident.incident_key), self.clock(), repeat_details(event))
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
        """Record the decision: at once, or with the batch's (`_record_fast`). `only_once`
        (inside a savepoint): DecidedElsewhere if the job is no longer pending, so the
        savepoint undoes this job's other writes."""
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
        decided = JobDecision(job.id, outcome, reason, **fields)
        if self._unrecorded is not None:
            self._unrecorded.append(decided)  # `_record_fast` writes the batch's at once
        elif not self.store.finish_job(decided) and only_once:
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


def _slot(verdict: Verdict) -> tuple[str, str]:
    """The (service, incident key) a verdict with a change acts on."""
    assert verdict.decision is not None and verdict.decision.incident_key is not None
    return verdict.job.service, verdict.decision.incident_key


def repeat_details(event: dict) -> dict[str, object]:
    """What an absorbed repeat trigger said, as its incident keeps it."""
    payload = event.get("payload") or {}
    return {
        "summary": payload.get("summary", ""),
        "severity": payload.get("severity", ""),
        "custom_details": payload.get("custom_details") or {},
    }


def _is_echo(basis: Incident | None, action: str) -> bool:
    """A mail acknowledging or resolving what PagerDuty already acknowledged or resolved
    (the helpdesk reacting to our own notification): sending it back would be an echo."""
    if basis is None or basis.changed_by != "pagerduty" or action == "trigger":
        return False
    if action == "resolve":
        return basis.state == "resolved"
    return basis.state in ("acknowledged", "resolved")


_TRACE_FIELDS = tuple(field.name for field in dataclasses.fields(TraceStep))


def _trace_row(step: TraceStep) -> dict[str, object]:
    """What `dataclasses.asdict` gives for a flat record, without its deep copy per value."""
    return {name: getattr(step, name) for name in _TRACE_FIELDS}
