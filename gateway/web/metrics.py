"""Prometheus metrics for `/metrics`.

The processor runs in a child process and one-shot commands (`gateway ingest`) write the same
database, so in-process counters would miss most of the work. Instead every scrape reads the
store: counters are row counts plus what retention already deleted (`metric_offsets`), so they
only ever go up. Live state of this process (SMTP sessions, IMAP pollers, reloads) is read
from the running objects. The latency histogram (acceptance -> decision, from the jobs' stored
timestamps) is fed from jobs decided since this process started, like any per-process metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.errors import Problem
from gateway.node import this_node
from gateway.outcomes import Outcome
from gateway.store import ReportStore, StormState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

Row = tuple[str, tuple[str, ...], float]

# store name -> (metric name, help, label names); all counters
COUNTERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "accepted": ("gateway_messages_accepted", "Mails durably accepted (spooled)", ()),
    "duplicates": ("gateway_messages_duplicate", "Redeliveries recognised as duplicates", ()),
    "decisions": (
        "gateway_decisions",
        "Jobs decided, by service and outcome",
        ("service", "outcome"),
    ),
    "rule_matches": ("gateway_rule_matches", "Jobs decided by each rule", ("service", "rule")),
    "outbox_done": ("gateway_events_sent", "Outbox items delivered", ("kind",)),
    "outbox_retries": ("gateway_events_retried", "Failed attempts scheduled again", ("kind",)),
    "webhooks_received": (
        "gateway_webhooks_received",
        "PagerDuty webhook deliveries stored (a redelivery counts once)",
        (),
    ),
    "webhooks_decided": (
        "gateway_webhooks_decided",
        "PagerDuty webhook deliveries decided, by outcome",
        ("outcome",),
    ),
}
GAUGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "outbox_depth": ("gateway_outbox_depth", "Outbox items waiting for delivery", ("kind",)),
    "outbox_dead": ("gateway_outbox_dead_letters", "Dead letters waiting for retry", ("kind",)),
    "jobs_pending": ("gateway_jobs_pending", "Spooled jobs not decided yet", ()),
    "incidents_open": ("gateway_incidents_open", "Triggered or acknowledged", ("service",)),
    # IMAP messages that could not be read: all owed ones, and those reported as unreadable
    "imap_failing": (
        "gateway_imap_messages_failing",
        "Unread IMAP messages being retried",
        ("account",),
    ),
    # storm state per service: the PagerDuty queue, what the rate limit holds back, repeats
    "storm_queued": ("gateway_storm_queued", "PagerDuty events pending", ("service",)),
    "storm_throttled": (
        "gateway_storm_throttled",
        "PagerDuty events due but held back by the rate limit",
        ("service",),
    ),
    "storm_coalesced": (
        "gateway_storm_coalesced",
        "Repeat triggers absorbed into an earlier event, over open incidents",
        ("service",),
    ),
    "storm_oldest_age": (
        "gateway_storm_oldest_pending_age_seconds",
        "Age of the oldest pending PagerDuty event",
        ("service",),
    ),
    "imap_unreadable": (
        "gateway_imap_messages_unreadable",
        "Reported unreadable IMAP messages",
        ("account",),
    ),
}


@dataclass
class Snapshot:
    """What one scrape read from the store (in the store's thread)."""

    totals: list[Row]
    gauges: list[Row]
    latencies: list[tuple[int, float]]
    taken_at: float = field(default_factory=time.time)
    webhooks: tuple[int, float | None] = (0, None)  # pending deliveries, the oldest's arrival


# What the web side reads of the running parts. Protocols, because those parts are built by
# later stages (runtime) or may move within intake; the web never imports them.


class SmtpState(Protocol):
    """The SMTP listener (`gateway.intake.smtp_listener.SmtpListener`)."""

    @property
    def bound(self) -> list[tuple[str, int]]: ...
    @property
    def closing(self) -> bool: ...
    @property
    def active_sessions(self) -> int: ...
    @property
    def refusal_counts(self) -> Mapping[str, int]: ...
    @property
    def pacing_counts(self) -> Mapping[str, float]: ...


class AccountName(Protocol):
    @property
    def name(self) -> str: ...


class PollerState(Protocol):
    """One IMAP account's poller (`gateway.intake.imap.ImapPoller`)."""

    @property
    def settings(self) -> AccountName: ...
    @property
    def state(self) -> str: ...
    @property
    def last_success(self) -> float | None: ...
    @property
    def errors(self) -> int: ...
    @property
    def healthy(self) -> bool: ...


class RefusalState(Protocol):
    """A refused reload (`gateway.runtime.reload.Refusal`)."""

    @property
    def at(self) -> float: ...
    @property
    def reason(self) -> str: ...
    @property
    def problems(self) -> Sequence[Problem]: ...


class ReloadState(Protocol):
    """The reloader (`gateway.runtime.reload.Reloader`)."""

    @property
    def reloads(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def generation(self) -> int: ...
    @property
    def last_refusal(self) -> RefusalState | None: ...


class WorkerState(Protocol):
    """The worker child's handle (`gateway.runtime.worker.WorkerProcess`)."""

    @property
    def restarts(self) -> int: ...


@dataclass
class LiveState:
    """This process's running parts, read at scrape time (all optional)."""

    smtp: SmtpState | None = None
    imap: Sequence[PollerState] = ()
    reloader: ReloadState | None = None
    worker: WorkerState | None = None


class GatewayMetrics:
    """One registry per service; `render(snapshot, live)` returns the exposition text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.latency = Histogram(
            "gateway_processing_latency_seconds",
            "Acceptance to decision, jobs decided since this process started",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.last_job: int | None = None  # None: not initialised (skip history before start)
        self._families: list[Metric] = []
        self.registry.register(_Families(lambda: self._families))

    def read(self, store: ReportStore) -> Snapshot:
        """Run in the store's thread: totals, gauges and newly decided jobs' latencies, all
        from one snapshot (an item delivered between two reads was counted as still pending
        and as delivered in the same scrape)."""
        with store.read_snapshot():
            if self.last_job is None:
                self.last_job = store.last_decided_job()
            latencies = store.decided_latencies(self.last_job)
            now = time.time()
            gauges = store.metric_gauges() + storm_rows(store.storm_state(now), now)
            return Snapshot(
                store.metric_totals(), gauges, latencies, now, webhooks=store.webhook_stats()
            )

    def render(self, snapshot: Snapshot, live: LiveState) -> bytes:
        for job, seconds in snapshot.latencies:
            self.latency.observe(max(0.0, seconds or 0.0))
            self.last_job = max(self.last_job or 0, job)
        self._families = [
            *store_families(snapshot),
            *self._live_families(live),
        ]
        return generate_latest(_NodeLabelled(self.registry, this_node()))

    def _live_families(self, live: LiveState) -> Iterable[Metric]:
        if live.smtp is not None:
            up = 0 if live.smtp.closing or not live.smtp.bound else 1
            yield _gauge("gateway_smtp_up", "SMTP listener is accepting connections", (), up)
            yield _gauge(
                "gateway_smtp_sessions", "SMTP sessions open now", (), live.smtp.active_sessions
            )
            refusals = CounterMetricFamily(
                "gateway_smtp_refusals",
                "SMTP connections and AUTH attempts refused by a limit, by reason",
                labels=("reason",),
            )
            for reason, count in live.smtp.refusal_counts.items():
                refusals.add_metric((reason,), count)
            yield refusals
            yield from _pacing_families(live.smtp.pacing_counts)
        yield from self._imap_families(live.imap)
        if live.reloader is not None:
            reloads = CounterMetricFamily(
                "gateway_reloads", "Configuration reloads", labels=("result",)
            )
            reloads.add_metric(("ok",), live.reloader.reloads)
            reloads.add_metric(("refused",), live.reloader.refused)
            yield reloads
            yield _gauge(
                "gateway_config_generation",
                "Configuration generation running (1 at start, +1 per accepted reload)",
                (),
                live.reloader.generation,
            )
        if live.worker is not None:
            restarts = CounterMetricFamily(
                "gateway_processor_restarts", "Processor child restarts after a crash"
            )
            restarts.add_metric((), live.worker.restarts)
            yield restarts

    def _imap_families(self, pollers: Sequence[PollerState]) -> Iterable[Metric]:
        if not pollers:
            return
        up = GaugeMetricFamily("gateway_imap_up", "Mailbox connected", labels=("account",))
        last = GaugeMetricFamily(
            "gateway_imap_last_success_timestamp_seconds",
            "End of the last completed fetch cycle",
            labels=("account",),
        )
        errors = CounterMetricFamily(
            "gateway_imap_errors", "Failed connections or fetch cycles", labels=("account",)
        )
        for poller in pollers:
            name = poller.settings.name
            up.add_metric((name,), 1 if poller.state in ("idle", "polling") else 0)
            if poller.last_success is not None:
                last.add_metric((name,), poller.last_success)
            errors.add_metric((name,), poller.errors)
        yield from (up, last, errors)


def storm_rows(states: Sequence[StormState], now: float) -> list[Row]:
    """The storm figures of each service with PagerDuty events pending or repeats absorbed."""
    rows: list[Row] = []
    for state in states:
        labels = (state.service,)
        rows += [
            ("storm_queued", labels, state.queued),
            ("storm_throttled", labels, state.throttled),
            ("storm_coalesced", labels, state.coalesced),
            ("storm_oldest_age", labels, state.oldest_age(now)),
        ]
    return rows


def store_families(snapshot: Snapshot) -> list[Metric]:
    """Counter and gauge families from the store's rows (labels as the store returned them)."""
    families: dict[str, Metric] = {}
    for key, (name, doc, labels) in COUNTERS.items():
        families[key] = CounterMetricFamily(name, doc, labels=labels)
    for key, (name, doc, labels) in GAUGES.items():
        families[key] = GaugeMetricFamily(name, doc, labels=labels)
    oldest = GaugeMetricFamily(
        "gateway_outbox_oldest_age_seconds", "Age of the oldest pending item", labels=("kind",)
    )
    unmatched = CounterMetricFamily(
        "gateway_messages_unmatched", "Jobs no rule matched", labels=("service",)
    )
    quarantined = CounterMetricFamily(
        "gateway_messages_quarantined", "Jobs kept for a failure", labels=("service",)
    )
    filtered = CounterMetricFamily(
        "gateway_messages_filtered", "Jobs a [filter] stopped (kept)", labels=("service",)
    )
    totals = list(snapshot.totals)
    seen = {(metric, labels) for metric, labels, _ in totals}
    services = sorted({labels[0] for metric, labels, _ in totals if metric == "decisions"})
    for metric in ("outbox_done", "outbox_retries"):  # zeros, so alerts have a series to watch
        if (metric, ("pagerduty",)) not in seen:
            totals.append((metric, ("pagerduty",), 0))
    for service in services:
        for outcome in (Outcome.UNMATCHED, Outcome.QUARANTINED, Outcome.FILTERED):
            if ("decisions", (service, outcome)) not in seen:
                totals.append(("decisions", (service, outcome), 0))
    for metric, labels, value in totals:
        if metric in families:
            families[metric].add_metric(labels, value)
        if metric == "decisions" and labels[1] == Outcome.UNMATCHED:
            unmatched.add_metric(labels[:1], value)
        if metric == "decisions" and labels[1] == Outcome.QUARANTINED:
            quarantined.add_metric(labels[:1], value)
        if metric == "decisions" and labels[1] == Outcome.FILTERED:
            filtered.add_metric(labels[:1], value)
    gauges = list(snapshot.gauges)
    kinds = {labels for metric, labels, _ in gauges if metric == "outbox_depth"}
    if ("pagerduty",) not in kinds:
        gauges += [("outbox_depth", ("pagerduty",), 0), ("outbox_dead", ("pagerduty",), 0)]
    for metric, labels, value in gauges:
        if metric == "outbox_oldest_created":
            oldest.add_metric(labels, max(0.0, snapshot.taken_at - value))
        elif metric in families:
            families[metric].add_metric(labels, value)
    return [*families.values(), oldest, unmatched, quarantined, filtered, *webhook_gauges(snapshot)]


def webhook_gauges(snapshot: Snapshot) -> list[Metric]:
    """PagerDuty webhook deliveries waiting for the worker's decision, and the oldest's age."""
    pending, oldest = snapshot.webhooks
    age = max(0.0, snapshot.taken_at - oldest) if oldest is not None else 0.0
    return [
        _gauge(
            "gateway_webhooks_pending", "PagerDuty webhook deliveries not decided yet", (), pending
        ),
        _gauge(
            "gateway_webhooks_oldest_pending_age_seconds",
            "Age of the oldest undecided PagerDuty webhook delivery (0: none)",
            (),
            age,
        ),
    ]


def _gauge(name: str, doc: str, labels: tuple[str, ...], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    family.add_metric((), value)
    return family


class _NodeLabelled:
    """Every sample with a `node` label: which gateway node answered the scrape (several can
    share one PostgreSQL store; the store's counters and gauges are then the whole cluster's,
    the live ones this node's)."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.registry, self.node = registry, node

    def collect(self) -> Iterable[Metric]:
        for family in self.registry.collect():
            family.samples = [
                sample._replace(labels={**sample.labels, "node": self.node})
                for sample in family.samples
            ]
            yield family


class _Families:
    """A collector yielding the families built for the current scrape."""

    def __init__(self, families: Callable[[], list[Metric]]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return list(self.families())


def _pacing_families(counts: Mapping[str, float]) -> Iterable[Metric]:
    """`[smtp] in_flow_backlog`: how often and how long new mail waited for decisions."""
    for name, key, text in (
        ("gateway_smtp_paced", "paced", "SMTP transactions that waited for decisions to catch up"),
        ("gateway_smtp_paced_seconds", "waited_seconds", "Seconds SMTP transactions waited"),
        (
            "gateway_smtp_pacing_timeouts",
            "timed_out",
            "Pacing waits that ran out with no decision (pacing then paused)",
        ),
    ):
        yield CounterMetricFamily(name, text, value=counts.get(key, 0))
