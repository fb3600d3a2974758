"""What each consumer needs of the store: one `Protocol` per consumer, the backend's contract.

A backend (SQLite in `gateway.store.sqlite`; PostgreSQL next) implements every protocol in one
class; each consumer names only the protocol it uses, so the interface a backend must honour is
exactly the union below, and `tests/store_contract/` checks the promises for every backend.

    SpoolStore     accept, undecided_jobs          intake/spool.py (SpoolWriter), `gateway ingest`
    DecisionStore  jobs, incidents, outbox writes  decide/ (recording, notifications, outgoing_mail)
    OutboxStore    due / claim / record / next     delivery/outbox.py (Dispatcher)
    ImapStore      positions, owed UIDs, success   intake/imap/ (FolderSync, ImapPoller)
    PagerDutyWebhookStore  webhook deliveries      web/pagerduty_webhook.py
    ReportStore    listings, metrics, retention,   web/status.py, web/metrics.py, cli, replay,
                   status page data                runtime/retention.py
    Store          all of them, plus close()       what `open_store` returns, for the wiring

A store object belongs to one thread. Methods that write commit on their own unless they run
inside ``with store.transaction():``, which makes everything in it one atomic commit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from gateway.store.records import (
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
from gateway.store.requeue import Requeued

Row = tuple[str, tuple[str, ...], float]  # (metric, label values, value)


class EventLog(Protocol):
    """The event log: what happened besides decisions (duplicates, would-send, failures)."""

    def log_event(
        self,
        kind: str,
        *,
        service: str = "",
        message: int | None = None,
        incident_key: str | None = None,
        detail: str = "",
    ) -> None: ...


class SpoolStore(Protocol):
    """Acceptance: the commit an SMTP 250, an IMAP after-action and `ingest`'s exit 0 wait for."""

    def accept(
        self, mails: Sequence[IncomingMail], positions: Sequence[ImapPosition] = ()
    ) -> list[Accepted]:
        """Durably store a batch in one commit (group commit); one job per (mail, service).

        A mail whose fingerprint every one of its services already has is recorded as a
        duplicate (`Accepted.duplicate_of`), its bytes dropped, and no job is created for it.
        `positions` (IMAP folders the batch came from) are saved in the same commit.
        """
        ...

    def undecided_jobs(self) -> int:
        """How many accepted jobs wait for a decision: what SMTP intake pacing watches."""
        ...


class HeartbeatStore(Protocol):
    """Expected mail (`[[heartbeat]]`): when each was last seen and whether it is missing."""

    def mail_heartbeats(self) -> list[HeartbeatState]:
        """Every heartbeat's state, by name."""
        ...

    def save_mail_heartbeat(self, state: HeartbeatState) -> None:
        """Insert or replace the state of `state.name`."""
        ...


class DecisionStore(EventLog, HeartbeatStore, Protocol):
    """Deciding pending jobs: the decision, incident change and outbox items commit together."""

    def transaction(self, *, durable: bool = True) -> AbstractContextManager[None]:
        """One atomic commit; nested calls join the outer one. `durable=False` may skip the
        flush to disk for bookkeeping whose loss in a power cut is harmless."""
        ...

    def savepoint(self) -> AbstractContextManager[None]:
        """Inside `transaction()`: an exception undoes only the writes made inside it."""
        ...

    def pending_jobs(self, limit: int = 100, max_bytes: int = 16 * 1024 * 1024) -> list[PendingJob]:
        """The oldest pending jobs in acceptance order: at most `limit`, and about `max_bytes`
        of mail (always at least one)."""
        ...

    def finish_job(self, decision: JobDecision) -> bool:
        """Record the decision; False if the job was already decided (never decide twice)."""
        ...

    def finish_jobs(self, decisions: Sequence[JobDecision]) -> set[int]:
        """Record a batch's decisions at once; the ids of the jobs recorded (one decided
        already, or held by another decider right now, is left as it is and out of the set)."""
        ...

    def incident(self, service: str, key: str) -> Incident | None:
        """Inside a transaction, the (service, key) stays locked until the commit."""
        ...

    def lock_incidents(self, slots: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Incident]:
        """Inside a transaction: lock all these (service, key) pairs until the commit, in one
        order every decider follows (so two never deadlock on each other), then read them:
        `incident` for a whole batch, in two statements instead of two per job."""
        ...

    def incidents_of(self, slots: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Incident]:
        """The incidents of these (service, key) pairs that exist, in one query: a batch's
        decisions read them all at once (no lock: recording reads each again under it)."""
        ...

    def save_incident(self, incident: Incident) -> None:
        """Insert or replace the incident of (service, incident_key)."""
        ...

    def save_incidents(self, incidents: Sequence[Incident]) -> None:
        """`save_incident` for several (service, key) pairs, each once, in one statement on
        PostgreSQL: a batch's incidents as the batch leaves them."""
        ...

    def add_outbox(
        self,
        kind: str,
        service: str,
        order_key: str,
        payload: dict[str, Any],
        job: int | None,
        priority: int = 1,
    ) -> int:
        """Queue an item (due now) behind the pending items of its `order_key`; its id.
        Priority 0 heads are claimed before priority 1 heads (new cases first in a storm)."""
        ...

    def key_outbox(self, order_key: str, since: float, limit: int = 20) -> list[OutboxItem]:
        """The newest items (pending, dead, done) of one order key created at or after
        `since`, newest first."""
        ...

    def coalesce_outbox(self, item: int, payload: dict[str, Any]) -> bool:
        """Replace the payload of `item` if it is pending and unclaimed, and make it priority
        1 (its key repeats: a storm; quiet new cases go first); False otherwise."""
        ...

    def note_coalesced(
        self, service: str, key: str, at: float, details: dict[str, Any], count: int = 1
    ) -> None:
        """Count `count` absorbed repeat triggers on the incident, with when the last came and
        its details (`save_incident` keeps these, and resets them when the incident opens
        again)."""
        ...

    # -- PagerDuty-side events (Webhooks v3), decided like jobs --

    def pending_pagerduty_events(self, limit: int = 100) -> list[PagerDutyEvent]:
        """Stored webhook deliveries not decided yet, oldest first."""
        ...

    def finish_pagerduty_event(
        self,
        event: int,
        *,
        outcome: str,
        service: str = "",
        detail: str = "",
        incident_key: str = "",
    ) -> bool:
        """Record what deciding it did (and the incident's key, which notes do not carry);
        False if it was decided already."""
        ...

    def incidents_with_key(self, key: str) -> list[Incident]:
        """Every service's incident with this dedup key, most recently seen first."""
        ...

    def incident_by_pagerduty_id(self, pd_id: str) -> Incident | None:
        """The incident a webhook named by PagerDuty's incident id (notes carry no key)."""
        ...


class PagerDutyWebhookStore(Protocol):
    """Receiving Webhooks v3: the delivery is durable before PagerDuty gets its 2xx."""

    def add_pagerduty_event(
        self,
        *,
        body: str,
        received_at: float,
        webhook_id: str | None = None,
        event_id: str | None = None,
        event_type: str = "",
        incident_key: str = "",
        pd_incident: str = "",
    ) -> int | None:
        """Store one delivery (pending) in its own commit; None if a delivery with the same
        `webhook_id` or `event_id` was stored before (a redelivery acts once)."""
        ...


class OutboxStore(Protocol):
    """Delivering outbox items: per order key only the oldest pending item is ever due."""

    def due_outbox(
        self, now: float, limit: int = 100, kind: str | None = None, exclude: Sequence[int] = ()
    ) -> list[OutboxItem]:
        """The oldest pending item of each order key, if it is due at `now`, changing nothing.
        `exclude`d items also hold back the rest of their key."""
        ...

    def take_send_slot(self, key: str, interval: float) -> bool:
        """A rate limit shared by every worker of the store (every node, on PostgreSQL): True,
        and `key`'s next slot moved `interval` seconds on, if its slot is free now on the
        store's clock; False while it is taken. Called inside a claim's transaction, so a
        claim that rolls back gives its slots back. `key` names a hash, never a routing key."""
        ...

    def claim_outbox(
        self,
        now: float,
        limit: int,
        kind: str | None,
        lease_seconds: float,
        exclude: Sequence[int] = (),
        owner: str = "",
        admit: Callable[[list[OutboxItem]], list[OutboxItem]] | None = None,
    ) -> list[OutboxItem]:
        """Take due items for `lease_seconds`: nobody else (process or host) gets them until
        the lease runs out or a result is recorded. `owner` names the claiming worker.
        `admit` (a rate limit) chooses among the due heads, in claim order, inside the claim."""
        ...

    def renew_outbox_leases(self, items: Sequence[int], owner: str, until: float) -> int:
        """Extend `owner`'s claims on `items` that are still pending and its own to `until`
        (an attempt that outlives its lease is never claimed by another worker)."""
        ...

    def outbox_lease_owners(self, kind: str | None = None) -> list[str]:
        """The workers holding claims on pending items (of `kind`)."""
        ...

    def release_outbox_leases(self, owner: str, now: float) -> int:
        """Make the items a worker known to be dead (`owner`) had claimed due again at `now`."""
        ...

    def record_outbox(self, results: Sequence[OutboxResult], owner: str = "") -> None:
        """Apply attempts' results in one commit: done, dead (with the response), or pending
        again at `next_attempt_at`; each counts one attempt. With `owner`, only to items that
        worker still holds: once its lease ran out and another worker (node) claimed the item,
        a late result is not applied (that worker's own attempt decides it)."""
        ...

    def record_and_claim_outbox(
        self,
        results: Sequence[OutboxResult],
        now: float,
        limit: int,
        kind: str | None,
        lease_seconds: float,
        exclude: Sequence[int] = (),
        owner: str = "",
        admit: Callable[[list[OutboxItem]], list[OutboxItem]] | None = None,
    ) -> list[OutboxItem]:
        """One delivery round in one transaction: `record_outbox(results, owner)`, then
        `claim_outbox(...)`, which already sees them (a recorded head's next item is
        claimable). All or nothing: if it fails, nothing is recorded and nothing claimed."""
        ...

    def next_outbox_due(self, kind: str | None = None) -> float | None:
        """When the earliest head of a key (the oldest pending item of its order key) becomes
        due (None: nothing pending); items behind a head wait for it, not for a time."""
        ...


class ImapStore(EventLog, Protocol):
    """Where each IMAP folder stands, so nothing is fetched into the spool twice or skipped.

    The position itself advances only with an acceptance commit (`SpoolStore.accept`); a UID
    that could not be read is owed (`record_imap_failure`) before the position passes it."""

    def imap_position(self, account: str, folder: str) -> tuple[int, int] | None:
        """(UIDVALIDITY, last processed UID), or None if the folder was never polled."""
        ...

    def save_imap_position(
        self, account: str, folder: str, uidvalidity: int, last_uid: int
    ) -> None:
        """Set the position outright, with no after-action due; a new UIDVALIDITY also forgets
        what the old one owed."""
        ...

    def mark_imap_success(self, account: str, folder: str, at: float | None = None) -> None:
        """Record a completed fetch cycle (health: when did this mailbox last answer?)."""
        ...

    def imap_unfinished(self, account: str, folder: str) -> list[int]:
        """Accepted UIDs whose after-action was not confirmed (a crash or drop came between)."""
        ...

    def imap_after_done(self, account: str, folder: str) -> None:
        """The after-action of the unfinished UIDs is applied: forget them."""
        ...

    def imap_owed(self, account: str, folder: str) -> list[ImapFailure]:
        """The UIDs of a folder that could not be read yet (when each is due again, ...)."""
        ...

    def record_imap_failure(
        self, account: str, folder: str, uid: int, error: str, retry_at: float
    ) -> int:
        """Owe `uid` (or count one more failure of it), due again at `retry_at`; the number of
        failures so far."""
        ...

    def report_imap_failure(
        self, account: str, folder: str, uid: int, *, service: str, detail: str
    ) -> None:
        """Mark an owed UID reported and log an `imap_unreadable` event, in one commit."""
        ...

    def forget_imap_failure(
        self, account: str, folder: str, uid: int, *, service: str, detail: str
    ) -> None:
        """The UID vanished from the mailbox unread: owe it no more and log `imap_vanished`."""
        ...


class ReportStore(HeartbeatStore, Protocol):
    """What operators read and do: status page, /healthz, /metrics, CLI listings and retry,
    replay, retention."""

    def heartbeat(self, name: str = "healthz") -> float:
        """Commit one tiny write and return its time: the store still takes commits."""
        ...

    def read_snapshot(self) -> AbstractContextManager[None]:
        """The reads inside see one state of the database, however many statements they take:
        a report's numbers add up (an item is counted delivered or pending, never both or
        neither) while mail is decided and delivered meanwhile. Inside a transaction: that."""
        ...

    def outbox_stats(self) -> tuple[int, float | None]:
        """(pending count, created_at of the oldest pending item)."""
        ...

    def storm_state(self, now: float) -> list[StormState]:
        """Per service with PagerDuty events pending or repeats absorbed on open incidents:
        queued, throttled (due heads not claimed at `now`), coalesced, oldest pending."""
        ...

    def metric_totals(self) -> list[Row]:
        """Counters (accepted, duplicates, decisions, rule_matches, outbox_done,
        outbox_retries), monotonic across retention purges."""
        ...

    def metric_gauges(self) -> list[Row]:
        """Levels: outbox depth/dead/oldest per kind, pending jobs, open incidents, IMAP
        messages owed (failing) and reported unreadable per account."""
        ...

    def decided_latencies(self, after_job: int, limit: int = 5000) -> list[tuple[int, float]]:
        """(job id, seconds from acceptance to decision) of jobs decided after `after_job`."""
        ...

    def last_decided_job(self) -> int: ...

    def recent_jobs(
        self,
        limit: int = 50,
        head_bytes: int = 16384,
        *,
        outcomes: Sequence[str] | None = None,
        service: str | None = None,
    ) -> list[tuple[JobRecord, bytes]]:
        """Newest jobs first, with the first `head_bytes` of their mail; optionally only
        those with one of `outcomes` ('pending' for undecided jobs) and of `service`."""
        ...

    def jobs(self, *, outcomes: Sequence[str] | None = None, limit: int = 100) -> list[JobRecord]:
        """Newest jobs first, optionally only those with one of `outcomes`."""
        ...

    def list_jobs(
        self,
        *,
        outcomes: Sequence[str] | None = None,
        service: str | None = None,
        before_job: int | None = None,
        limit: int = 100,
        head_bytes: int = 16384,
    ) -> list[ListedJob]:
        """Newest jobs first, each with the first `head_bytes` of its mail; only those with one
        of `outcomes` ('pending': not decided yet) and of `service`; only jobs older than
        `before_job` (the next page of a listing)."""
        ...

    def count_jobs(
        self, *, outcomes: Sequence[str] | None = None, service: str | None = None
    ) -> int:
        """How many jobs `list_jobs` would list with no limit."""
        ...

    def known_services(self) -> list[str]:
        """Every service name the stored jobs and incidents mention, sorted."""
        ...

    def job_detail(self, job: int) -> dict[str, Any] | None:
        """Every column of a job, with `details` and `trace` decoded."""
        ...

    def raw_message(self, message: int) -> bytes | None:
        """The stored bytes (None once purged, or for a duplicate's copy)."""
        ...

    def incidents(
        self, *, open_only: bool = False, limit: int = 1000, service: str | None = None
    ) -> list[Incident]:
        """Most recently seen first; only those of `service` if given."""
        ...

    def count_incidents(self, *, open_only: bool = False, service: str | None = None) -> int:
        """How many incidents `incidents` would list with no limit."""
        ...

    def events(self, *, message: int | None = None, limit: int = 200) -> list[dict[str, Any]]:
        """Newest first; only those of `message` if given."""
        ...

    def outbox(
        self, states: Sequence[str] = ("pending", "dead"), limit: int = 1000
    ) -> list[OutboxItem]:
        """Items in `states`, oldest first."""
        ...

    def imap_failures(self) -> list[ImapFailure]:
        """Every owed IMAP message (unreadable so far), oldest failure first."""
        ...

    def requeue_outbox(self, item: int | None = None) -> int:
        """Put dead letters (one, or all with None) back in the queue; returns how many.
        Applies `retry_outbox`'s order rule (refused items are not counted)."""
        ...

    def outbox_item(self, item: int) -> OutboxItem | None: ...

    def retry_outbox(self, item: int | None = None, *, force: bool = False) -> Requeued:
        """Re-queue dead letters (one, or every one with None) ahead of their key's waiting
        items, keeping `created_at` (`requeued_at` restarts the give-up clock). An item whose
        key has a later item delivered or in flight is refused with the reason, unless
        `force` (then listed in `forced`); see `gateway.store.requeue`."""
        ...

    def expedite_outbox(self, now: float, kind: str | None = None) -> int:
        """Make every pending item waiting for a retry due at `now`; items in flight keep
        their claim. How many were moved up."""
        ...

    def replay_candidates(self, since: float, limit: int = 100_000) -> list[dict[str, Any]]:
        """Decided jobs of mail received since `since` whose raw bytes are still stored."""
        ...

    def purge_plan(self, cutoff: float) -> dict[str, int]:
        """What `purge(cutoff)` would delete, changing nothing."""
        ...

    def purge(self, cutoff: float, batch: int = 1000) -> dict[str, int]:
        """Delete one batch of rows older than `cutoff`; call until it returns all zeros.
        Kept whatever their age: what pending jobs, open incidents and pending or dead outbox
        items still need."""
        ...

    # -- health and the status page (gateway.web) --

    def oldest_pending_job(self) -> float | None:
        """When the oldest mail still waiting for its decision was accepted (None: none)."""
        ...

    def dead_letter_stats(self) -> tuple[int, float | None]:
        """(dead letters, when the newest of them became dead)."""
        ...

    def mail_minutes(self, since: float) -> list[MinuteCount]:
        """Mails received since `since`, counted per minute of receipt and outcome: each job
        counts with its outcome ('pending' while undecided), each redelivered copy as
        `REDELIVERED`. Costs the rows of the window, not of the table."""
        ...

    def delivery_minutes(self, since: float) -> list[MinuteLatency]:
        """Per minute of receipt since `since`: PagerDuty events delivered for that mail and
        the nearest-rank p50/p99 of acceptance -> recorded 2xx."""
        ...

    def incident(self, service: str, key: str) -> Incident | None: ...

    def message(self, message: int) -> MessageRecord | None:
        """A stored mail's envelope and its jobs (the id `queued as N` named)."""
        ...

    def incident_jobs(
        self, service: str, key: str, limit: int = 200, head_bytes: int = 16384
    ) -> list[JobHistory]:
        """The newest jobs decided with this incident key, newest first."""
        ...

    def outbox_of_keys(
        self, order_keys: Sequence[str], since: float = 0.0, limit: int = 200
    ) -> list[OutboxItem]:
        """The newest items (any state) of these order keys created at or after `since`."""
        ...

    def outbox_of_job(self, job: int) -> list[OutboxItem]:
        """The items one decision queued, oldest first."""
        ...

    def outbox_entry(self, item: int) -> OutboxEntry | None:
        """One item in any state, with the job and message that queued it."""
        ...

    def outbox_attempts(self, items: Sequence[int]) -> list[OutboxAttempt]:
        """Each recorded attempt of these items (result, error, answer) and each re-queue
        ('requeued'), in the order they happened."""
        ...

    def pagerduty_events(
        self, *, incident_key: str | None = None, limit: int = 100, outcome: str | None = None
    ) -> list[PagerDutyEvent]:
        """Webhook deliveries, newest first; only those of `incident_key` and of `outcome`
        ('pending': not decided yet) if given."""
        ...

    def count_pagerduty_events(self, *, outcome: str | None = None) -> int:
        """How many webhook deliveries are stored (of `outcome` if given, as above)."""
        ...

    def webhook_stats(self) -> tuple[int, float | None]:
        """(webhook deliveries not decided yet, when the oldest of them was received)."""
        ...


class Background(Protocol):
    """A backend's own helper thread (PostgreSQL: LISTEN for other nodes' commits)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Turn(Protocol):
    """A job only one node may do at a time (polling one IMAP account)."""

    def acquire(self) -> bool:
        """Take it without waiting: True if this node holds it now, False while another node
        does; StoreError when the store cannot be asked."""
        ...

    def held(self) -> bool:
        """Still this node's (checked before each round of work)."""
        ...

    def others_delivering(self, node: str) -> bool:
        """Whether a worker of a node other than `node` is connected to the store now, and
        the other nodes' recent delivery attempts went through."""
        ...

    def release(self) -> None: ...


class Store(
    SpoolStore,
    DecisionStore,
    OutboxStore,
    ImapStore,
    ReportStore,
    PagerDutyWebhookStore,
    Protocol,
):
    """A whole backend, as `open_store` returns it: for the code that wires consumers up."""

    def close(self) -> None: ...
