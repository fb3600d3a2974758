"""Test helpers for the store: records to feed it, and totals production code does not need."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

from gateway.store import Incident, IncomingMail, ReportStore, Store, listen_for_work, open_store
from tests.conftest import wait_until


class Backend:
    """Opens connections to one database; closes them all at the end of the test."""

    def __init__(self, name: str, location: str | os.PathLike[str]) -> None:
        self.name = name
        self.location = location
        self._opened: list[Store] = []

    def open(self, **hints: object) -> Store:
        store = open_store(self.location, **hints)  # type: ignore[arg-type]
        self._opened.append(store)
        return store

    def close(self) -> None:
        for store in self._opened:
            store.close()
        if self.name == "postgresql":  # its pool would keep a connection to a finished test's DB
            from gateway.store.postgres.connection import close_pool

            close_pool(str(self.location))


def set_schema_version(backend: Backend, version: int) -> None:
    """Stamp the database with another schema version (as a newer gateway would leave it)."""
    if backend.name == "postgresql":
        import psycopg

        with psycopg.connect(str(backend.location)) as conn:
            conn.execute("UPDATE gateway_schema SET version = %s", (version,))
    else:
        import sqlite3

        conn = sqlite3.connect(str(backend.location))
        try:
            conn.execute(f"PRAGMA user_version = {int(version)}")
        finally:
            conn.close()


def mail(
    fingerprint: str, services: tuple[str, ...] = ("helpdesk",), raw: bytes = b"x", **fields: Any
) -> IncomingMail:
    return IncomingMail(
        raw=raw, source="test", services=services, fingerprint=fingerprint, **fields
    )


def incident(key: str, state: str = "triggered", *, at: float = 1000.0, **fields: Any) -> Incident:
    """An incident of service 'helpdesk' first and last seen `at`."""
    values: dict[str, Any] = {
        "service": "helpdesk",
        "incident_key": key,
        "state": state,
        "summary": key,
        "trigger_count": 1,
        "acknowledge_count": 0,
        "resolve_count": int(state == "resolved"),
        "times_opened": 1,
        "first_seen": at,
        "last_seen": at,
        "opened_at": at,
        "resolved_at": at if state == "resolved" else None,
        "last_message": None,
        "case_message_id": "",
    }
    return Incident(**(values | fields))


def counts(store: ReportStore) -> dict[str, int]:
    """Totals: messages, duplicates, and jobs per outcome ('pending' for undecided ones).

    Read through the metrics queries, so it works on every backend; they also count what
    retention purged, which is the same as counting rows in tests that do not purge.
    """
    totals = {"messages": 0, "duplicates": 0}
    for metric, labels, value in store.metric_totals():
        if metric == "accepted":
            totals["messages"] += int(value)
        elif metric == "duplicates":
            totals["duplicates"] += int(value)
        elif metric == "decisions":
            key = f"jobs.{labels[1]}"
            totals[key] = totals.get(key, 0) + int(value)
    for metric, _labels, value in store.metric_gauges():
        if metric == "jobs_pending" and value:
            totals["jobs.pending"] = int(value)
    return totals


@contextlib.contextmanager
def other_node_listening(
    url: str, node: str = "other"
) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Another node's LISTEN wake-ups (PostgreSQL): (jobs, outbox) events, set by each wake
    after this point (the one every connection gives is cleared first)."""
    jobs, outbox = threading.Event(), threading.Event()
    listener = listen_for_work(url, jobs.set, outbox.set, node)
    assert listener is not None
    listener.start()
    try:
        wait_until(lambda: listener.listening.is_set(), message="never listened")  # type: ignore[attr-defined]
        jobs.clear(), outbox.clear()
        yield jobs, outbox
    finally:
        listener.stop()
