"""Retention: delete stored mail, decisions and events older than `retention_days`.

What is still needed stays whatever its age: mail with a pending job, the last message of an
open incident, anything whose outbox item is pending or dead, pending and dead outbox items,
open incidents. Deleting runs in small batches so SMTP acceptance never waits long for the
write lock; the service runs it hourly, `gateway purge` on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from gateway.errors import StoreError
from gateway.store import ReportStore, StoreThread

log = logging.getLogger(__name__)

DAY = 86400.0
INTERVAL_SECONDS = 3600.0
FIRST_RUN_DELAY = 60.0  # let start-up (and a backlog of pending jobs) settle first
KINDS = ("messages", "jobs", "events", "outbox", "incidents")


def cutoff(retention_days: int, now: float | None = None) -> float:
    return (time.time() if now is None else now) - retention_days * DAY


def plan(store: ReportStore, retention_days: int, now: float | None = None) -> dict[str, int]:
    """What a purge would delete now; changes nothing."""
    return store.purge_plan(cutoff(retention_days, now))


def purge(
    store: ReportStore, retention_days: int, now: float | None = None, batch: int = 1000
) -> dict[str, int]:
    """Delete batch after batch until nothing old is left; returns the totals per kind."""
    limit = cutoff(retention_days, now)
    totals = dict.fromkeys(KINDS, 0)
    while True:
        counts = store.purge(limit, batch)
        for kind, n in counts.items():
            totals[kind] = totals.get(kind, 0) + n
        if not any(counts.values()):
            return totals


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{counts.get(kind, 0)} {kind}" for kind in KINDS)


async def run_schedule(
    store: StoreThread,
    retention_days: Callable[[], int],
    stop: asyncio.Event,
    *,
    interval: float = INTERVAL_SECONDS,
    first_delay: float = FIRST_RUN_DELAY,
) -> None:
    """Purge every `interval`; `retention_days()` is read each time so a reload applies."""
    delay = first_delay
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return
        delay = interval
        days = retention_days()
        if days <= 0:
            continue  # 0 = keep everything
        try:
            counts = await store.call(lambda s, d=days: purge(s, d))
        except StoreError as exc:  # the database is away: one line, no trace
            log.warning("retention: store unavailable; retrying in %.0f s: %s", interval, exc)
            continue
        except Exception:
            log.exception("retention: purge failed; retrying in %.0f s", interval)
            continue
        if any(counts.values()):
            log.info("retention (%d days): purged %s", days, describe(counts))
