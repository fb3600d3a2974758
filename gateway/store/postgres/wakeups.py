"""LISTEN/NOTIFY: a commit on any node wakes the decision and delivery workers of every node.

The writes notify inside their own transaction (`notify_jobs`, `notify_outbox`), so the
signal is delivered exactly when the commit is: never before the rows are visible. The
listener holds one connection of its own (not the pool's: LISTEN is session state). A lost
connection is reconnected with backoff and both callbacks run once after (a signal may have
been missed); the workers' own timers (decisions every second, deliveries at the next due
time or within seconds) are the polling fallback meanwhile.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from gateway.store.postgres.connection import CONNECT_TIMEOUT, describe

log = logging.getLogger(__name__)

JOBS_CHANNEL = "gateway_jobs"
OUTBOX_CHANNEL = "gateway_outbox"
WORKER_SESSION = "email-pager-gateway worker "


def notify_jobs(conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"NOTIFY {JOBS_CHANNEL}")


def notify_outbox(conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")


def worker_session(node: str) -> str:
    """The LISTEN session's `application_name`, which tells the other nodes that this node's
    worker is up (`Turn.others_delivering`); PostgreSQL keeps 63 bytes of it."""
    return f"{WORKER_SESSION}{node}".encode()[:63].decode(errors="ignore")


class WakeUps:
    """A thread that LISTENs and calls `on_jobs` / `on_outbox` (from that thread)."""

    def __init__(
        self,
        url: str,
        on_jobs: Callable[[], None],
        on_outbox: Callable[[], None],
        node: str = "",
    ) -> None:
        self._url = url
        self._session = worker_session(node)
        self._callbacks = {JOBS_CHANNEL: on_jobs, OUTBOX_CHANNEL: on_outbox}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pg-listen", daemon=True)
        self.listening = threading.Event()  # set while a LISTEN connection is up (tests)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                self._listen()
                delay = 0.5
            except psycopg.Error as exc:
                self.listening.clear()
                log.warning(
                    "LISTEN on %s lost (%s); polling until it is back", describe(self._url), exc
                )
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def _listen(self) -> None:
        with psycopg.connect(
            self._url,
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT,
            application_name=self._session,
        ) as conn:
            for channel in self._callbacks:
                conn.execute(f"LISTEN {channel}")
            self.listening.set()
            self._wake_all()  # whatever was committed while nobody listened
            while not self._stop.is_set():
                for note in conn.notifies(timeout=1.0):
                    self._callbacks.get(note.channel, _nothing)()
                conn.execute("SELECT 1")  # a dead server shows here, not as silence

    def _wake_all(self) -> None:
        for callback in self._callbacks.values():
            callback()


def _nothing() -> None:
    """An unknown channel."""
