"""The long-running poller: one account in its own thread (imapclient is synchronous).

    connect -> open the folder -> fetch cycle -> IDLE (or poll) -> fetch cycle -> ...

Keepalive: IDLE is ended and re-issued every ``keepalive_seconds`` (in polling mode a NOOP is
sent as often), and every socket read is bounded by the timeouts of `connection.timeouts`, so a
server that stops answering (frozen, or a dead link) is noticed within 2.5 keepalive intervals.
The account is then unhealthy (`healthy`, read by /healthz and the status page) until a fetch
cycle succeeds again, and the thread reconnects with exponential backoff and jitter.

`stop()` never cuts a batch: it wakes IDLE and the waits at once, but a fetch cycle in progress
finishes its batch (commit, then after-action) first.
"""

from __future__ import annotations

import concurrent.futures
import logging
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imapclient import IMAPClient

from gateway.backoff import Backoff
from gateway.config import ImapSettings
from gateway.intake import spool as intake
from gateway.intake.imap import compat
from gateway.intake.imap.connection import (
    ImapAuthError,
    ImapError,
    close,
    connect,
    describe,
    interrupt,
)
from gateway.intake.imap.failures import UnreadablePolicy
from gateway.intake.imap.sync import FolderSync
from gateway.store import (
    Accepted,
    ImapPosition,
    ImapStore,
    IncomingMail,
    Turn,
    exclusive_turn,
    open_store,
)

log = logging.getLogger("gateway.intake.imap")

_IDLE_SLICE_SECONDS = 0.5  # idle_check granularity
_DEAD_EMPTY_BURST = 5  # this many instant, empty idle_checks in a row mean the socket hit EOF
_COMMIT_TIMEOUT = 120.0  # waiting longer for the spool means something is badly wrong
TURN_RETRY_SECONDS = 5.0  # a standby node asks for the account's turn this often
STANDBY = "standby: another node polls this account"
_STOP_FORCE_SECONDS = 2.0  # after stop()'s timeout: how long to wait once the socket is cut


class ImapPoller:
    """One account in its own thread: connect, sync, IDLE or poll, reconnect with backoff.

    `state` (starting | connecting | idle | polling | error: ... | stopped), `healthy` and
    `last_success` (end of the last completed fetch cycle, at least every keepalive interval)
    are for health and metrics.
    """

    def __init__(
        self,
        settings: ImapSettings,
        spool: intake.SpoolWriter,
        db_path: str | Path,
        *,
        backoff: Backoff | None = None,
        unreadable: UnreadablePolicy | None = None,
        connect_fn: Callable[[ImapSettings], IMAPClient] = connect,
    ) -> None:
        self.settings = settings
        self.state = "stopped"
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.attempts = 0  # connection attempts (tests watch the backoff with it)
        self.errors = 0  # failed sessions (connect, login, keepalive or fetch), for metrics
        self._spool = spool
        self._db_path = db_path
        self._backoff = backoff or Backoff()
        self._unreadable = unreadable or UnreadablePolicy()
        self._connect = connect_fn
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._client: IMAPClient | None = None
        self._cycling = False  # a fetch cycle is running: stop() lets it finish its batch
        self._failures = 0
        self._suspects: set[int] = set()  # UIDs to fetch one at a time (see FolderSync)
        self._thread = threading.Thread(target=self._run, name=f"imap-{settings.name}", daemon=True)

    @property
    def healthy(self) -> bool:
        """False from a failed session (lost connection, unanswered keepalive, refused login)
        until a fetch cycle succeeds again."""
        return self._failures == 0 and self.state != "stopped"

    def start(self) -> None:
        self._set_state("starting")
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Wake IDLE, a wait or a backoff at once; let a batch in progress finish (up to
        `timeout`), then cut the connection and join the thread (blocking)."""
        with self._lock:
            self._stop.set()
            client = None if self._cycling else self._client
        if client is not None:
            interrupt(client)  # between cycles: nothing is in flight
        if not self._thread.is_alive():
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                client = self._client
            if client is not None:
                interrupt(client)  # a silent server: the batch's commit holds what it owes
            self._thread.join(_STOP_FORCE_SECONDS)
        if self._thread.is_alive():
            log.warning("imap %s: poller did not stop within %.0f s", self.settings.name, timeout)

    # -- thread body ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            store = open_store(self._db_path)
        except Exception as exc:
            self._failures += 1
            self._set_state(f"error: cannot open the database: {exc}")
            log.error(
                "imap %s: cannot open the database, poller not running: %s", self.settings.name, exc
            )
            return
        # nodes sharing a PostgreSQL store take turns: one polls the account at a time
        turn = exclusive_turn(self._db_path, f"imap:{self.settings.name}")
        try:
            while not self._stop.is_set():
                try:
                    if turn is not None and not turn.acquire():
                        self._stand_by()
                        continue
                    self._session(store, turn)
                except Exception as exc:
                    if self._stop.is_set():
                        break
                    self._failed(exc)
        finally:
            if turn is not None:
                turn.release()
            store.close()
            self._set_state("stopped")

    def _stand_by(self) -> None:
        """Another node holds the account's turn: its poller reports the mailbox's health."""
        self._failures = 0
        self.last_success = time.time()
        self._set_state(STANDBY)
        self._stop.wait(TURN_RETRY_SECONDS)

    def _session(self, store: ImapStore, turn: Turn | None = None) -> None:
        if not self._failures:  # while failing, the state keeps saying why
            self._set_state("connecting")
        self.attempts += 1
        client = self._connect(self.settings)
        with self._lock:
            self._client = client
        polite = False
        try:
            if self._stop.is_set():
                polite = True
                return
            sync = FolderSync(
                self.settings, store, self._accept,
                unreadable=self._unreadable, suspects=self._suspects,
            )  # fmt: skip
            if not self._begin_work():
                polite = True
                return
            try:
                sync.open(client)  # may finish an after-action: as much a batch as a cycle
            finally:
                self._end_work()
            use_idle = self.settings.idle and client.has_capability("IDLE")
            if self.settings.idle and not use_idle:
                log.info("imap %s: server has no IDLE, polling instead", self.settings.name)
            self._cycle(sync, client)
            while not self._stop.is_set():
                if turn is not None and not turn.held():
                    log.warning(
                        "imap %s: lost the account's turn; polling stops", self.settings.name
                    )
                    polite = True
                    return
                self._set_state("idle" if use_idle else "polling")
                retry_at = sync.owed.next_due()  # an owed message due again ends the wait early
                if use_idle:
                    self._idle(client, retry_at)
                else:
                    self._poll_wait(client, retry_at)
                self._cycle(sync, client)
            polite = True
        finally:
            with self._lock:
                self._client = None
            close(client, polite=polite)

    def _begin_work(self) -> bool:
        """Mark a cycle as running, so stop() lets it finish; False once stop() was called."""
        with self._lock:
            if self._stop.is_set():
                return False
            self._cycling = True
            return True

    def _end_work(self) -> None:
        with self._lock:
            self._cycling = False

    def _cycle(self, sync: FolderSync, client: IMAPClient) -> None:
        if not self._begin_work():
            return
        try:
            result = sync.run(client, self._stop.is_set)
        finally:
            self._end_work()
        self.last_success = time.time()
        if self._failures:
            log.info(
                "imap %s: connected again after %d failure(s)", self.settings.name, self._failures
            )
        self._failures, self.last_error = 0, None
        if result.accepted or result.oversize or result.failed or result.vanished:
            log.info(
                "imap %s: accepted %d message(s) (%d duplicate), %d left in place as too big,"
                " %d unreadable for now, %d vanished",
                self.settings.name, result.accepted, result.duplicates, result.oversize,
                result.failed, result.vanished,
            )  # fmt: skip

    def _accept(
        self, mails: list[IncomingMail], positions: Sequence[ImapPosition]
    ) -> list[Accepted]:
        """The whole batch and its folder position go to the spool as one request: one commit."""
        future = self._spool.submit_batch(mails, positions)
        try:
            return future.result(_COMMIT_TIMEOUT)
        except concurrent.futures.TimeoutError:
            raise ImapError("spool commit timed out; will re-fetch") from None

    # -- waiting for mail, and keepalive -----------------------------------------------------

    def _idle(self, client: IMAPClient, until: float | None = None) -> None:
        """IDLE until new mail is announced, the keepalive interval passes, the wall-clock time
        `until` comes, or stop() is called. Ending IDLE is the keepalive: a server that does
        not answer DONE is gone."""
        client.idle()
        deadline = time.monotonic() + _wait_seconds(self.settings.keepalive_seconds, until)
        if compat.unread_input(client):  # mail announced with "+ idling": idle_check misses it
            deadline = 0.0
        instant_empties = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            responses = client.idle_check(timeout=_IDLE_SLICE_SECONDS)
            if responses:
                instant_empties = 0
                if _has(responses, b"BYE"):
                    raise ImapError("server closed the connection (BYE)")
                if _has(responses, b"EXISTS"):
                    break
            elif time.monotonic() - started < _IDLE_SLICE_SECONDS / 10:
                # poll() said readable but nothing came: EOF. imapclient then returns [] at once
                # forever, so a burst of these means the link is dead.
                instant_empties += 1
                if instant_empties >= _DEAD_EMPTY_BURST:
                    raise ImapError("connection lost during IDLE (idle_check returns at once)")
            else:
                instant_empties = 0
        try:
            client.idle_done()
        except Exception:
            if not self._stop.is_set():  # stop() shut the socket down under us: expected
                raise

    def _poll_wait(self, client: IMAPClient, until: float | None = None) -> None:
        """Wait `poll_seconds` (or until the wall-clock time `until`), with a NOOP every
        keepalive interval (it also announces mail)."""
        s = self.settings
        deadline = time.monotonic() + _wait_seconds(s.poll_seconds, until)
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stop.wait(min(remaining, s.keepalive_seconds)):
                return
            if time.monotonic() < deadline and _has(client.noop()[1], b"EXISTS"):
                return

    # -- failures ----------------------------------------------------------------------------

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self.errors += 1
        reason = describe(exc, self.settings)
        delay = self._backoff.delay(self._failures)
        self._set_state(f"error: {reason} (retry in {delay:.1f} s)", quiet=True)
        if reason != self.last_error:
            # Bad credentials need the operator; a dropped connection is routine.
            level = (
                logging.ERROR if isinstance(exc, ImapAuthError | ssl.SSLError) else logging.WARNING
            )
            log.log(
                level,
                "imap %s: %s; retrying with backoff (next attempt in %.1f s)",
                self.settings.name, reason, delay,
            )  # fmt: skip
        else:
            log.debug(
                "imap %s: still failing (%s), attempt %d",
                self.settings.name,
                reason,
                self._failures,
            )
        self.last_error = reason
        self._stop.wait(delay)

    def _set_state(self, state: str, *, quiet: bool = False) -> None:
        if state != self.state:
            self.state = state
            log.log(
                logging.DEBUG if quiet else logging.INFO, "imap %s: %s", self.settings.name, state
            )


def _wait_seconds(longest: float, until: float | None) -> float:
    """`longest`, or less if the wall-clock time `until` comes sooner."""
    return longest if until is None else max(0.0, min(longest, until - time.time()))


def _has(responses: list[Any], word: bytes) -> bool:
    return any(word in (r[:2] if isinstance(r, tuple) else ()) for r in responses)
