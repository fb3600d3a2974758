"""The health checks behind `/healthz` and the status page, each with a sentence in words.

Health fails whenever paging is impaired, not only when a process is down: mail waiting for
its decision, events waiting for PagerDuty, a recent dead letter, a worker crashing in a
loop, delivery switched off (local mode), a mailbox that failed or went silent, a refused
reload. The checks are pure functions of what was read (`StoreFacts`, the live parts, the
`[web]` thresholds), so each condition is testable without a server.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config import ServiceSettings, WebSettings
from gateway.delivery.paging import local_mode_notice, local_services
from gateway.store import ReportStore
from gateway.web.metrics import PollerState, RefusalState, SmtpState
from gateway.web.words import ago, duration, when


@dataclass
class Check:
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)
    words: str = ""  # what it means, for a person: shown on the page, listed in `reasons`

    def as_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class StoreFacts:
    """What the checks read from the store, in one visit to its thread."""

    heartbeat: float
    outbox_pending: int
    outbox_oldest: float | None
    oldest_job: float | None
    dead_letters: int
    newest_dead: float | None
    webhooks_pending: int = 0  # PagerDuty webhook deliveries not decided yet
    webhooks_oldest: float | None = None  # when the oldest of them arrived


def read_facts(store: ReportStore) -> StoreFacts:
    """Run in the store's thread: a real commit first, then the levels."""
    heartbeat = store.heartbeat()
    pending, oldest = store.outbox_stats()
    dead, newest = store.dead_letter_stats()
    webhooks, oldest_webhook = store.webhook_stats()
    return StoreFacts(
        heartbeat,
        pending,
        oldest,
        store.oldest_pending_job(),
        dead,
        newest,
        webhooks,
        oldest_webhook,
    )


class RestartHistory:
    """When the worker was seen restarting (its supervisor only counts): fed by sampling."""

    def __init__(self) -> None:
        self.seen = 0
        self.times: deque[float] = deque(maxlen=100)

    def observe(self, restarts: int, now: float | None = None) -> None:
        at = time.time() if now is None else now
        for _ in range(min(restarts - self.seen, self.times.maxlen or 0)):
            self.times.append(at)
        self.seen = max(self.seen, restarts)

    def within(self, window: float, now: float) -> int:
        return sum(1 for at in self.times if now - at <= window)


# -- the checks --------------------------------------------------------------------------------


def smtp_check(smtp: SmtpState | None) -> Check:
    if smtp is None:
        return Check(False, {"error": "not started"}, "the SMTP listener is not running")
    bound = [f"{h}:{p}" for h, p in smtp.bound]
    if smtp.closing or not bound:
        return Check(False, {"listening": bound}, "the SMTP listener is shutting down")
    words = f"accepting mail on {', '.join(bound)}"
    paced = int(smtp.pacing_counts.get("paced", 0))
    if paced:  # [smtp] in_flow_backlog: not a fault, but worth knowing
        waited = smtp.pacing_counts.get("waited_seconds", 0.0)
        words += (
            f"; {paced} transactions waited for decisions to catch up since start"
            f" ({waited:.1f} s in all)"
        )
    return Check(True, {"listening": bound, "paced": paced}, words)


def store_check(facts: StoreFacts | None, error: str) -> Check:
    if facts is None:
        return Check(False, {"error": error}, f"the database does not take commits: {error}")
    return Check(True, {"heartbeat": facts.heartbeat}, "the database takes commits")


def processing_check(facts: StoreFacts | None, settings: WebSettings, now: float) -> Check:
    limit = settings.job_max_age_seconds
    if facts is None:
        return _unknown("mail waiting for a decision", limit)
    age = now - facts.oldest_job if facts.oldest_job else 0.0
    detail = {"oldest_pending_age_seconds": round(age, 1), "max_age_seconds": limit}
    if age > limit:
        words = (
            f"a mail has waited {duration(age)} for its decision (limit {duration(limit)}): "
            "the worker is not deciding mail"
        )
        return Check(False, detail, words)
    if facts.oldest_job:
        return Check(True, detail, f"deciding mail; the oldest waiting arrived {duration(age)} ago")
    return Check(True, detail, "every accepted mail is decided")


def webhook_check(facts: StoreFacts | None, settings: WebSettings, now: float) -> Check:
    """PagerDuty's webhooks are stored before their 2xx and decided by the worker: while one
    waits, the mirror and the helpdesk do not know what PagerDuty said."""
    limit = settings.webhook_max_age_seconds
    if facts is None:
        return _unknown("PagerDuty webhooks waiting for a decision", limit)
    age = now - facts.webhooks_oldest if facts.webhooks_oldest else 0.0
    detail = {
        "pending": facts.webhooks_pending,
        "oldest_pending_age_seconds": round(age, 1),
        "max_age_seconds": limit,
    }
    if age > limit:
        words = (
            f"{facts.webhooks_pending} PagerDuty webhook(s) waiting for their decision, the "
            f"oldest for {duration(age)} (limit {duration(limit)}): the worker is not deciding "
            "them, so the incident mirror and the helpdesk miss what PagerDuty said"
        )
        return Check(False, detail, words)
    if facts.webhooks_pending:
        words = (
            f"deciding PagerDuty webhooks; {facts.webhooks_pending} waiting, the oldest "
            f"arrived {duration(age)} ago"
        )
        return Check(True, detail, words)
    return Check(True, detail, "every PagerDuty webhook is decided")


def outbox_check(facts: StoreFacts | None, settings: WebSettings, now: float) -> Check:
    limit = settings.outbox_max_age_seconds
    if facts is None:
        return _unknown("events waiting for delivery", limit)
    age = now - facts.outbox_oldest if facts.outbox_oldest else 0.0
    detail = {
        "pending": facts.outbox_pending,
        "oldest_age_seconds": round(age, 1),
        "max_age_seconds": limit,
    }
    if age > limit:
        words = (
            f"{facts.outbox_pending} event(s) waiting for delivery, the oldest for "
            f"{duration(age)} (limit {duration(limit)}): PagerDuty or the relay is not taking them"
        )
        return Check(False, detail, words)
    if facts.outbox_pending:
        words = f"{facts.outbox_pending} event(s) on their way, the oldest {duration(age)} old"
        return Check(True, detail, words)
    return Check(True, detail, "nothing waiting for delivery")


def dead_letter_check(facts: StoreFacts | None, settings: WebSettings, now: float) -> Check:
    hours = settings.dead_letter_hours
    if facts is None:
        return _unknown("dead letters", hours * 3600)
    age = now - facts.newest_dead if facts.newest_dead else None
    detail = {
        "dead_letters": facts.dead_letters,
        "max_age_hours": hours,
        "newest_age_seconds": None if age is None else round(age, 1),
    }
    if facts.dead_letters and age is not None and age <= hours * 3600:
        words = (
            f"{facts.dead_letters} dead letter(s), the newest {duration(age)} ago: "
            "events that were refused or ran out of retries, NOT delivered "
            "(retry them below or with `gateway outbox retry`)"
        )
        return Check(False, detail, words)
    if facts.dead_letters:
        words = f"{facts.dead_letters} dead letter(s), none in the last {duration(hours * 3600)}"
        return Check(True, detail, words)
    return Check(True, detail, "no dead letters")


def pagerduty_check(services: Sequence[ServiceSettings]) -> Check:
    names = local_services(services)
    detail = {"local_mode_services": names}
    notice = local_mode_notice(services)
    if notice:
        return Check(False, detail, notice)
    return Check(True, detail, "every service has a routing_key")


def worker_check(restarts: RestartHistory, settings: WebSettings, now: float) -> Check:
    window, limit = settings.worker_restart_window_seconds, settings.worker_max_restarts
    recent = restarts.within(window, now)
    detail = {
        "restarts": restarts.seen,
        "recent_restarts": recent,
        "window_seconds": window,
        "max_restarts": limit,
    }
    if recent >= limit:
        words = (
            f"the worker restarted {recent} times in the last {duration(window)}: it is "
            "crashing in a loop and mail is not being decided (see the log)"
        )
        return Check(False, detail, words)
    if recent:
        return Check(True, detail, f"the worker restarted {recent} time(s) recently")
    return Check(True, detail, "the worker is running")


def imap_check(
    pollers: Sequence[PollerState], settings: WebSettings, started: float, now: float
) -> Check:
    limit = settings.imap_max_silence_seconds
    accounts, words, ok = {}, [], True
    for poller in pollers:
        name = poller.settings.name
        since = now - (poller.last_success or started)
        failed = not poller.healthy or poller.state.startswith("error") or poller.state == "stopped"
        fine = since <= limit and not failed
        ok = ok and fine
        accounts[name] = {"ok": fine, "state": poller.state, "last_success": poller.last_success}
        words.append(_mailbox_words(name, poller, failed, since, limit, now))
    return Check(ok, {"accounts": accounts, "max_silence_seconds": limit}, "; ".join(words))


def _mailbox_words(
    name: str, poller: PollerState, failed: bool, since: float, limit: float, now: float
) -> str:
    last = ago(poller.last_success, now)
    if failed:
        return f"mailbox {name} FAILED ({poller.state}); last good fetch {last}"
    if since > limit:
        return (
            f"mailbox {name} is silent: no good fetch for {duration(since)} "
            f"(limit {duration(limit)}), state {poller.state}"
        )
    return f"mailbox {name}: {poller.state}, last good fetch {last}"


def reload_check(refusal: RefusalState | None, generation: int) -> Check:
    if refusal is None:
        return Check(
            True, {"generation": generation}, f"configuration generation {generation} running"
        )
    problems = [str(p) for p in refusal.problems]
    detail = {
        "generation": generation,
        "refused_at": refusal.at,
        "trigger": refusal.reason,
        "problems": problems,
    }
    words = (
        f"the last reload ({refusal.reason}, {when(refusal.at)}) was REFUSED, still running "
        f"generation {generation}: {'; '.join(problems)}"
    )
    return Check(False, detail, words)


def _unknown(what: str, limit: float) -> Check:
    return Check(
        False,
        {"error": "store unavailable", "limit": limit},
        f"{what}: unknown, the database cannot be read",
    )
