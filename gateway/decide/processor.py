"""Spool -> parse -> rules -> incident mirror -> outbox, one transaction per batch.

A job (message, service) is decided exactly once: its decision, the incident change and the
outbox item are committed together with the job's state, so a crash before the commit simply
repeats the work and a crash after it never repeats it.

Each batch runs in two phases. Phase 1 (`evaluation.py`) does all the CPU work without holding
the write lock: parsing, rules, the incident change (computed from a read of the incident,
carried forward through the batch so two jobs of one key see each other) and the helpdesk
notification's theme, which needs that change. Phase 2 (`recording.py`), the short write
transaction, re-reads each incident under the lock: if it is still what phase 1 read, the
prepared change, event and mail are inserted; if another writer (`gateway ingest`, a job that
failed earlier in the batch) changed it meanwhile, the job is left pending and decided again
from the new state. This module runs the batches; the records passing between the phases are
in `verdicts.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from gateway.config import DEFAULT_INSTALLATION_ID, Config, PagerDutySettings, ServiceSettings
from gateway.config_time import HeartbeatSettings
from gateway.decide.authenticity import DnsBudget
from gateway.decide.evaluation import EvaluationSteps
from gateway.decide.heartbeat_duties import HeartbeatDuties
from gateway.decide.notifications import HelpdeskNotifier, build_helpdesk_notifier
from gateway.decide.pagerduty_side import PagerDutySide
from gateway.decide.recording import RecordingSteps
from gateway.decide.verdicts import Processed, ServiceRuntime
from gateway.errors import RuleError
from gateway.files import FileSnapshot
from gateway.mail.authenticity import DnsTxtResolver, TxtResolver
from gateway.mail.parse import ParsedMail
from gateway.rules import load_ruleset
from gateway.schedules import MaintenanceWindow, Schedule
from gateway.store import DecisionStore, Incident, PendingJob

log = logging.getLogger(__name__)

# rounds per `process_pending` for jobs whose incident changed between the phases
DECIDE_ROUNDS = 3
AUTH_RETRY_FORGET = 3600.0  # seconds past its time after which an untouched retry is dropped
# seconds of DNS waiting per batch; then the batch's remaining `verify` jobs wait for the next
DNS_BUDGET_SECONDS = 5.0
# mail per batch, about (`DecisionStore.pending_jobs`): a backlog of big mails never loads at once
BATCH_BYTES = 16 * 1024 * 1024


class Processor(HeartbeatDuties, EvaluationSteps, RecordingSteps):
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
        verdicts = self._evaluate_batch(jobs, ahead, parsed)
        verdicts = [v for v in verdicts if v.retry_at is None]
        with self.store.transaction():
            outcomes, again = self._record_batch(verdicts)
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
