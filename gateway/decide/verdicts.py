"""What one decision carries from phase 1 (evaluation) to phase 2 (recording) and back out.

The records of `Processor`'s two phases, apart so that each phase's module, the replay and the
reload read them without importing the processor itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import ServiceSettings
from gateway.decide.notifications import Notification
from gateway.outcomes import Outcome
from gateway.rules import Decision, Ruleset
from gateway.store import Incident, PendingJob


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


def non_action_outcome(decision: Decision) -> Outcome:
    """The outcome of a decision that sends nothing: filtered, unmatched or discarded."""
    if decision.filtered:
        return Outcome.FILTERED
    return Outcome.UNMATCHED if decision.unmatched else Outcome.DISCARDED
