"""The records that cross the store's boundary: what intake, processor, outbox and the web
read and write. Plain frozen dataclasses, so a PostgreSQL backend returns the same types."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

OPEN_STATES = ("triggered", "acknowledged")


@dataclass(frozen=True)
class IncomingMail:
    """Raw mail as an intake (SMTP, IMAP, CLI) hands it over, before it is durable."""

    raw: bytes | bytearray  # the listener hands over its read buffer as it is
    source: str  # 'smtp', 'imap:<account>', 'cli'
    services: tuple[str, ...]
    fingerprint: str  # duplicate-detection key: Message-ID + body hash, or a hash of the raw bytes
    message_id: str = ""
    mail_from: str | None = None  # envelope sender; '' is the null sender of bounces
    rcpt_tos: tuple[str, ...] = ()
    peer: str = ""


@dataclass(frozen=True)
class Accepted:
    """The durable outcome of accepting one mail: its spool id and whether it was a duplicate."""

    id: int
    duplicate_of: int | None


@dataclass(frozen=True)
class PendingJob:
    """One (message, service) pair waiting for a decision."""

    id: int
    message: int
    service: str
    raw: bytes
    mail_from: str | None
    source: str
    received_at: float


@dataclass(frozen=True)
class JobDecision:
    """What a job's decision records on it (`DecisionStore.finish_jobs`)."""

    job: int
    outcome: str
    reason: str
    rule: str | None = None
    action: str | None = None
    incident_key: str | None = None
    summary: str | None = None
    severity: str | None = None
    details: dict[str, Any] | None = None
    trace: list[dict[str, Any]] | None = None

    def stored(self, decided_at: float) -> tuple[Any, ...]:
        """The jobs columns outcome .. decided_at, then the id, as both backends write them."""
        return (
            self.outcome,
            self.reason,
            self.rule,
            self.action,
            self.incident_key,
            self.summary,
            self.severity,
            json.dumps(self.details or {}),
            json.dumps(self.trace or []),
            decided_at,
            self.job,
        )


@dataclass(frozen=True)
class Incident:
    service: str
    incident_key: str
    state: str
    summary: str
    trigger_count: int
    acknowledge_count: int
    resolve_count: int
    times_opened: int
    first_seen: float
    last_seen: float
    opened_at: float | None
    resolved_at: float | None
    last_message: int | None
    case_message_id: str
    # Repeat triggers absorbed by the outbox since the incident (last) opened: kept by the store
    # beside the mirror (`save_incident` leaves them alone), so not part of its equality.
    coalesced: int = field(default=0, compare=False)
    coalesced_at: float | None = field(default=None, compare=False)
    latest_details: str = field(default="", compare=False)  # JSON: the newest repeat's details
    # two-way with PagerDuty (all optional, so older rows and callers keep working)
    routing_key: str = ""  # the routing key that opened it: its later events use it
    pd_id: str = ""  # PagerDuty's incident id, from a webhook (or a REST lookup)
    pd_url: str = ""  # its html_url
    pd_status: str = ""  # what PagerDuty last said: triggered | acknowledged | resolved
    assignees: str = ""  # names, ", "-joined
    priority: str = ""
    urgency: str = ""
    changed_by: str = ""  # 'pagerduty' when the last state change came from a webhook
    case_fields: str = "{}"  # JSON: subject, from, message_id, details of the trigger mail

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def case(self) -> dict[str, Any]:
        """The trigger mail's case fields (subject, from, message_id, details), decoded."""
        try:
            value = json.loads(self.case_fields or "{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class OutboxItem:
    id: int
    kind: str  # 'pagerduty' | 'mail'
    service: str
    order_key: str
    payload: dict[str, Any]
    state: str
    attempts: int
    created_at: float
    next_attempt_at: float  # while claimed (lease_owner set): when the claim runs out
    last_error: str
    response: str
    lease_owner: str = ""  # the worker ("host:pid") that claimed it; '' when not claimed
    requeued_at: float | None = None  # when a dead letter was last re-queued
    delivered_by: str = ""  # the node that recorded its last attempt ('' before any)
    priority: int = 1  # 0: a trigger that opens an incident, claimed ahead of busy keys

    def in_flight(self, now: float) -> bool:
        """Claimed by a worker whose lease still runs: it may be on the wire right now."""
        return self.state == "pending" and bool(self.lease_owner) and self.next_attempt_at > now

    def describe(self) -> str:
        """A few words for people: a PagerDuty event's action and key, or a mail's subject."""
        if "event_action" in self.payload:
            return f"{self.payload['event_action']} {self.payload.get('dedup_key', '')}"[:80]
        if self.kind == "pagerduty_rest":
            return f"{self.payload.get('action')} {self.payload.get('incident_key', '')}"[:80]
        return f"mail {self.payload.get('subject', '')}"[:80]


@dataclass(frozen=True)
class OutboxResult:
    """The result of one delivery attempt: done, dead, or pending again (retry at a time)."""

    id: int
    state: str  # 'done' | 'dead' | 'pending'
    response: str = ""
    error: str = ""
    next_attempt_at: float | None = None


@dataclass(frozen=True)
class JobRecord:
    """A decided (or pending) job, for listings and the status page."""

    id: int
    message: int
    service: str
    state: str
    outcome: str | None
    rule: str | None
    action: str | None
    incident_key: str | None
    summary: str | None
    reason: str | None
    received_at: float
    source: str


@dataclass(frozen=True)
class ListedJob:
    """A job as `gateway messages` lists it, with its mail's envelope sender and first bytes
    (enough for Subject and From, without loading whole mails)."""

    job: JobRecord
    mail_from: str | None
    head: bytes


# -- what the status page reads (reports) -------------------------------------------------------

REDELIVERED = "redelivered"  # `mail_minutes`' outcome for a copy recognised as a duplicate


@dataclass(frozen=True)
class MinuteCount:
    """Mails received in one minute (`minute`: its start, Unix time) with one outcome."""

    minute: float
    outcome: str  # a job's outcome, 'pending', or REDELIVERED
    count: int


@dataclass(frozen=True)
class MinuteLatency:
    """PagerDuty deliveries of mail received in one minute: end of DATA -> 2xx, in seconds."""

    minute: float
    deliveries: int
    p50: float
    p99: float


@dataclass(frozen=True)
class OutboxAttempt:
    """One delivery attempt of an outbox item and its answer, or an operator's re-queue."""

    item: int
    at: float
    attempt: int
    state: str  # 'done' | 'dead' | 'pending' (failed, retried later) | 'requeued'
    error: str
    response: str


@dataclass(frozen=True)
class MessageRecord:
    """One accepted mail as stored (its id is the one `250 ... queued as N` gave)."""

    id: int
    received_at: float
    source: str
    peer: str
    mail_from: str | None
    rcpt_tos: tuple[str, ...]
    message_id: str
    size: int
    duplicate_of: int | None
    jobs: tuple[int, ...]  # one per service it was accepted for; none for a duplicate
    node: str = ""  # the gateway node that accepted it (several may share a store)


@dataclass(frozen=True)
class JobHistory:
    """A job with when it was decided and the first bytes of its mail (for its subject)."""

    job: JobRecord
    decided_at: float | None
    head: bytes


@dataclass(frozen=True)
class ImapPosition:
    """Where an IMAP folder stands after a batch, committed in the batch's own acceptance commit
    so that no crash can separate "accepted" from "position saved"."""

    account: str
    folder: str
    uidvalidity: int
    last_uid: int  # every UID up to it is accepted, reported oversize, or owed (an ImapFailure)
    resolved: tuple[int, ...] = ()  # owed UIDs this batch accepted or reported: owed no more
    unfinished: tuple[int, ...] = ()  # accepted UIDs whose after-action (seen/move) is still due


@dataclass(frozen=True)
class ImapFailure:
    """A message the gateway could not read yet: retried with backoff, reported after a few
    failures, forgotten only once it is accepted or has vanished from the mailbox."""

    account: str
    folder: str
    uid: int
    attempts: int
    first_failed_at: float
    last_failed_at: float
    next_attempt_at: float
    error: str
    reported_at: float | None  # when it was reported as unreadable (None: still retrying quietly)


@dataclass(frozen=True)
class OutboxEntry:
    """An outbox item with the decision that queued it (None for mail sent by POST /notify)."""

    item: OutboxItem
    job: int | None
    message: int | None


@dataclass(frozen=True)
class HeartbeatState:
    """Where one `[[heartbeat]]` (expected mail) stands; it survives restarts.

    The deadline counts from `last_seen`, or from `watched_since` (when the gateway first
    watched for it) until a first mail arrives; `missing_since` is set while the gateway's own
    `heartbeat:<name>` incident is open."""

    name: str
    service: str
    watched_since: float
    last_seen: float | None = None
    last_message: int | None = None
    missing_since: float | None = None


@dataclass(frozen=True)
class PagerDutyEvent:
    """One Webhooks v3 delivery as stored before its 2xx, and what deciding it did."""

    id: int
    received_at: float
    webhook_id: str | None
    event_id: str | None
    event_type: str
    incident_key: str
    pd_incident: str
    service: str  # the gateway service whose incident it changed ('' if none)
    state: str  # 'pending' | 'done'
    outcome: str  # e.g. 'mirrored', 'notified', 'unknown_key', 'discarded', 'duplicate'
    detail: str
    body: str  # the raw JSON body, as received

    @property
    def event(self) -> dict[str, Any]:
        """The `event` object of the body ({} if the body is not what PagerDuty sends)."""
        try:
            value = json.loads(self.body).get("event")
        except (ValueError, AttributeError):
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class StormState:
    """One service's PagerDuty queue as an operator watches a storm."""

    service: str
    queued: int  # pending events (waiting, retrying or in flight)
    throttled: int  # due at the head of their key but not claimed: held back by the rate limit
    coalesced: int  # repeat triggers absorbed into an earlier event, over its open incidents
    oldest_pending: float | None  # created_at of the oldest pending event

    def oldest_age(self, now: float) -> float:
        return 0.0 if self.oldest_pending is None else max(0.0, now - self.oldest_pending)
