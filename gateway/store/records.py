"""The records that cross the store's boundary: what intake, processor, outbox and the web
read and write. Plain frozen dataclasses, so a PostgreSQL backend returns the same types."""

from __future__ import annotations

from dataclasses import dataclass
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

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES


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

    def in_flight(self, now: float) -> bool:
        """Claimed by a worker whose lease still runs: it may be on the wire right now."""
        return self.state == "pending" and bool(self.lease_owner) and self.next_attempt_at > now

    def describe(self) -> str:
        """A few words for people: a PagerDuty event's action and key, or a mail's subject."""
        if "event_action" in self.payload:
            return f"{self.payload['event_action']} {self.payload.get('dedup_key', '')}"[:80]
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
