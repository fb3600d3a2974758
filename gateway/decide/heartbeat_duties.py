"""The processor's heartbeat duties (`[[heartbeat]]`): look for expected mail that is overdue
and trigger `heartbeat:<name>`; when a mail of the heartbeat's rule is decided, record it and
resolve that incident if it is open. A mixin of `Processor`, kept apart so the decision path
reads on its own; the pure parts are in `gateway.decide.heartbeats`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from gateway.config import PagerDutySettings, ServiceSettings
from gateway.config_time import HeartbeatSettings
from gateway.decide import heartbeats, incidents
from gateway.decide.events import build_event, pagerduty_order_key
from gateway.decide.maintenance import active_window, milder
from gateway.errors import RuleEvaluationError
from gateway.mail.parse import ParsedMail
from gateway.rules import Ruleset
from gateway.rules.evaluate import conditions_match
from gateway.rules.model import Condition
from gateway.schedules import MaintenanceWindow, Schedule
from gateway.store import DecisionStore, HeartbeatState, Incident, PendingJob

log = logging.getLogger(__name__)

HEARTBEAT_CHECK_SECONDS = 1.0  # how often `check_heartbeats` looks for overdue mail


class _Service(Protocol):
    """What is read of a `ServiceRuntime` (processor.py imports this module, not vice versa)."""

    settings: ServiceSettings
    ruleset: Ruleset


class HeartbeatDuties:
    """What `Processor` adds for heartbeats; it provides these attributes."""

    store: DecisionStore
    services: Mapping[str, _Service]
    pagerduty: PagerDutySettings
    clock: Callable[[], float]
    on_outbox: Callable[[], None] | None
    maintenance: tuple[MaintenanceWindow, ...]
    heartbeats: tuple[HeartbeatSettings, ...]
    regex_timeout: float
    _heartbeats_checked: float = float("-inf")
    _expected: dict[str, tuple[Condition, ...]]  # heartbeat name -> its own conditions

    def check_heartbeats(self) -> list[str]:
        """Trigger `heartbeat:<name>` for each expected mail now overdue (at most once a
        second); the names triggered. A suppressing maintenance window of the heartbeat's
        service postpones the trigger until it ends; a downgrading one lowers its severity."""
        now = self.clock()
        if not self.heartbeats or now - self._heartbeats_checked < HEARTBEAT_CHECK_SECONDS:
            return []
        self._heartbeats_checked = now
        states = {s.name: s for s in self.store.mail_heartbeats()}
        due = [b for b in self.heartbeats if self._heartbeat_due(b, states.get(b.name), now)]
        if not due:
            return []
        with self.store.transaction():
            states = {s.name: s for s in self.store.mail_heartbeats()}  # under the lock
            triggered = [b.name for b in due if self._heartbeat_missing(b, states, now)]
        if triggered and self.on_outbox:
            self.on_outbox()
        return triggered

    def _heartbeat_due(
        self, beat: HeartbeatSettings, state: HeartbeatState | None, now: float
    ) -> bool:
        """Whether a write is needed: a first sighting to record, or an overdue heartbeat."""
        if state is None or state.service != beat.service:
            return True  # start watching (again, when it moved to another service)
        if not heartbeats.is_overdue(beat, state, now):
            return False
        window = active_window(self.maintenance, beat.service, now)
        return window is None or window.mode != "suppress"

    def _heartbeat_missing(
        self, beat: HeartbeatSettings, states: Mapping[str, HeartbeatState], now: float
    ) -> bool:
        """Inside the transaction: record a first watch, or trigger; True if it triggered."""
        state = states.get(beat.name)
        if state is None or state.service != beat.service:
            self.store.save_mail_heartbeat(HeartbeatState(beat.name, beat.service, now))
            return False
        if not heartbeats.is_overdue(beat, state, now):
            return False  # another processor saw it or reported it meanwhile
        key = beat.incident_key
        summary = heartbeats.missing_summary(beat.name, state.last_seen)
        changed, _ = incidents.apply_action(
            self.store.incident(beat.service, key),
            service=beat.service,
            key=key,
            action="trigger",
            now=now,
            summary=summary,
            routing_key=self._routing_key(beat.service),
        )
        if changed is not None:
            self.store.save_incident(changed)
        window = active_window(self.maintenance, beat.service, now)
        severity = beat.severity if window is None else milder(beat.severity, window.severity)
        event = build_event(
            action="trigger",
            dedup_key=key,
            summary=summary,
            severity=severity,
            source=self.pagerduty.source,
            component=beat.service,
            rule=f"heartbeat {beat.name}",
            details=heartbeats.missing_details(beat, state),
            client_url=self.pagerduty.client_url,
        )
        self._queue_own_event(beat.service, event, summary, changed)
        self.store.save_mail_heartbeat(dataclasses.replace(state, missing_since=now))
        log.warning("heartbeat %s missing: triggered %s on %s", beat.name, key, beat.service)
        return True

    def expect_mail(self, beats: tuple[HeartbeatSettings, ...]) -> None:
        """Compile the heartbeats' own conditions (validated already by `gateway check`)."""
        schedules: dict[str, Schedule] = {}
        for runtime in self.services.values():
            schedules.update((s.name, s) for s in runtime.ruleset.schedules)
        self._expected = heartbeats.compile_conditions(beats, "", "", schedules)

    def expected_mail(self, job: PendingJob, mail: ParsedMail, rule: str | None) -> tuple[str, ...]:
        """Phase 1: the names of the heartbeats a decided mail counts for: by its rule, or by
        their own conditions (a regex timeout there only means "not this one")."""
        names = [b.name for b in heartbeats.matching(self.heartbeats, job.service, rule)]
        for beat in self.heartbeats:
            conditions = self._expected.get(beat.name)
            if conditions and beat.service == job.service and beat.name not in names:
                try:
                    if conditions_match(
                        conditions,
                        mail,
                        match=beat.match,
                        at=job.received_at,
                        regex_timeout=self.regex_timeout,
                        name=f"heartbeat {beat.name}",
                    ):
                        names.append(beat.name)
                except RuleEvaluationError as exc:
                    log.warning("message=%d: %s", job.message, exc)
        return tuple(names)

    def heartbeats_seen(self, job: PendingJob, names: tuple[str, ...]) -> bool:
        """Phase 2: the mail counts for these heartbeats; a missing one is resolved.
        True if an event was queued."""
        beats = [b for b in self.heartbeats if b.name in names]
        if not beats:
            return False
        states = {s.name: s for s in self.store.mail_heartbeats()}
        queued = False
        for beat in beats:
            state = states.get(beat.name) or HeartbeatState(
                beat.name, beat.service, job.received_at
            )
            if state.missing_since is not None:
                queued = self._heartbeat_back(beat, job) or queued
            last = max(job.received_at, state.last_seen or job.received_at)
            self.store.save_mail_heartbeat(
                dataclasses.replace(
                    state,
                    service=beat.service,
                    last_seen=last,
                    last_message=job.message,
                    missing_since=None,
                )
            )
        return queued

    def _heartbeat_back(self, beat: HeartbeatSettings, job: PendingJob) -> bool:
        """Resolve `heartbeat:<name>`, which this gateway opened when the mail went missing."""
        key = beat.incident_key
        changed, _ = incidents.apply_action(
            self.store.incident(beat.service, key),
            service=beat.service,
            key=key,
            action="resolve",
            now=self.clock(),
            message=job.message,
        )
        if changed is not None:
            self.store.save_incident(changed)
        event = build_event(action="resolve", dedup_key=key)
        log.info("heartbeat %s back (message %d): resolving %s", beat.name, job.message, key)
        why = f"heartbeat {beat.name} is back"
        return self._queue_own_event(beat.service, event, why, changed)

    def _routing_key(self, service: str) -> str:
        runtime = self.services.get(service)
        return (runtime.settings.routing_key or "") if runtime is not None else ""

    def _queue_own_event(
        self, service: str, event: dict, why: str, incident: Incident | None
    ) -> bool:
        """An event the gateway raises itself (no mail behind it): outbox (with the key its
        incident records) or would-send."""
        key = event["dedup_key"]
        current = self._routing_key(service)
        if current:
            order_key = pagerduty_order_key(service, key)
            pinned = incidents.pinned_routing_key(event, incident, current)
            self.store.add_outbox("pagerduty", service, order_key, pinned, None)
            return True
        self.store.log_event(
            "would_send",
            service=service,
            incident_key=key,
            detail=f"no routing_key: {event['event_action']} not sent ({why})",
        )
        return False
