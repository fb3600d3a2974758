"""The store: spool, jobs and decisions, incidents, outbox, event log. The only SQL is in here.

Consumers use the protocol they need (`gateway.store.protocols`, one per consumer) and the
record types (`gateway.store.records`); `open_store` opens the configured backend, so nothing
outside this package knows which database it talks to. SQLite (`gateway.store.sqlite`) is the
embedded backend; a PostgreSQL backend implements the same protocols and passes the same
contract tests (`tests/store_contract/`).

A store object belongs to one thread. Writes that must be atomic together run inside
``with store.transaction():``; asyncio code goes through `StoreThread`.
"""

from __future__ import annotations

from gateway.store.backend import (
    copy_store,
    exclusive_turn,
    listen_for_work,
    migrate_store,
    open_store,
    verify_store,
)
from gateway.store.protocols import (
    DecisionStore,
    EventLog,
    HeartbeatStore,
    ImapStore,
    OutboxStore,
    PagerDutyWebhookStore,
    ReportStore,
    SpoolStore,
    Store,
    Turn,
)
from gateway.store.records import (
    OPEN_STATES,
    REDELIVERED,
    Accepted,
    HeartbeatState,
    ImapFailure,
    ImapPosition,
    Incident,
    IncomingMail,
    JobDecision,
    JobHistory,
    JobRecord,
    ListedJob,
    MessageRecord,
    MinuteCount,
    MinuteLatency,
    OutboxAttempt,
    OutboxEntry,
    OutboxItem,
    OutboxResult,
    PagerDutyEvent,
    PendingJob,
    StormState,
)
from gateway.store.requeue import Refusal, Requeued
from gateway.store.thread import StoreThread

__all__ = [
    "OPEN_STATES",
    "REDELIVERED",
    "Accepted",
    "DecisionStore",
    "EventLog",
    "HeartbeatState",
    "HeartbeatStore",
    "ImapFailure",
    "ImapPosition",
    "ImapStore",
    "Incident",
    "IncomingMail",
    "JobDecision",
    "JobHistory",
    "JobRecord",
    "ListedJob",
    "MessageRecord",
    "MinuteCount",
    "MinuteLatency",
    "OutboxAttempt",
    "OutboxEntry",
    "OutboxItem",
    "OutboxResult",
    "OutboxStore",
    "PagerDutyEvent",
    "PagerDutyWebhookStore",
    "PendingJob",
    "Refusal",
    "ReportStore",
    "Requeued",
    "SpoolStore",
    "Store",
    "StoreThread",
    "StormState",
    "Turn",
    "copy_store",
    "exclusive_turn",
    "listen_for_work",
    "migrate_store",
    "open_store",
    "verify_store",
]
