"""IMAP intake: fetch notification mail from a mailbox into the same spool SMTP feeds.

Each ``[[imap]]`` account runs in its own thread (imapclient is synchronous). One fetch cycle:

    SEARCH UID last+1:*  ->  FETCH RFC822.SIZE  ->  FETCH BODY.PEEK[] (batches)
        ->  spool commit  ->  after-action (seen | delete | move)  ->  save (UIDVALIDITY, last UID)

The source message is touched only after its bytes are durable, and the position is saved only
after the after-action, so a crash anywhere re-fetches at worst; the spool's duplicate detection
(Message-ID + body hash) turns the re-fetch into a recorded duplicate, never a second action.
Messages are selected by UID position, not by flags: a human reading the mailbox (setting \\Seen)
must not hide an alert from the gateway.

Between cycles the connection IDLEs when the server supports it (re-issued at most every
`_IDLE_RENEW_SECONDS`), otherwise it polls every ``poll_seconds``. Any connection failure ends
the session; the thread reconnects with exponential backoff and jitter.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imapclient import SEEN, IMAPClient, SocketTimeout
from imapclient.exceptions import LoginError

from gateway.backoff import Backoff
from gateway.config import ImapSettings
from gateway.errors import GatewayError
from gateway.intake import spool as intake
from gateway.store import Accepted, ImapStore, IncomingMail, Store, open_store

log = logging.getLogger(__name__)

_IDLE_RENEW_SECONDS = 600.0  # servers drop IDLE clients after ~30 min; RFC 2177 says renew < 29
_IDLE_SLICE_SECONDS = 1.0  # idle_check granularity: bounds how long stop() waits
_DEAD_EMPTY_BURST = 5  # this many instant, empty idle_checks in a row mean the socket hit EOF
_BATCH_MESSAGES = 200  # BODY.PEEK[] fetched (and committed) per round trip ...
_BATCH_BYTES = 16 * 1024 * 1024  # ... bounded by size so memory stays small
_TIMEOUT = SocketTimeout(connect=15.0, read=120.0)
_COMMIT_TIMEOUT = 120.0  # waiting longer for the spool means something is badly wrong
_TOKEN_COMMAND_TIMEOUT = 30.0


class ImapError(GatewayError):
    """The IMAP session failed; the poller reconnects with backoff."""


class ImapAuthError(ImapError):
    """The server refused our credentials, or no OAuth2 token could be obtained."""


@dataclass
class CycleResult:
    """What one fetch cycle did (for `gateway imap-once` and logs)."""

    accepted: int = 0
    duplicates: int = 0
    oversize: int = 0


# -- connecting -----------------------------------------------------------------------------


def connect(settings: ImapSettings) -> IMAPClient:
    """Open the connection (tls | starttls | none) and log in; the caller closes it."""
    context = _ssl_context(settings) if settings.security != "none" else None
    tls = settings.security == "tls"
    client = IMAPClient(
        settings.host,
        settings.port,
        ssl=tls,
        ssl_context=context if tls else None,
        timeout=_TIMEOUT,
    )
    try:
        if settings.security == "starttls":
            client.starttls(context)
        _keepalive(client)
        login(client, settings)
    except BaseException:
        close(client)
        raise
    return client


def _ssl_context(settings: ImapSettings) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if not settings.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _keepalive(client: IMAPClient) -> None:
    """TCP keepalive: a silently dropped connection (NAT, firewall) surfaces within minutes."""
    sock = client.socket()
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 20)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)


def login(client: IMAPClient, settings: ImapSettings) -> None:
    """LOGIN with the password, else AUTHENTICATE XOAUTH2 with a fresh token."""
    try:
        if settings.password is not None:
            client.login(settings.username, settings.password)
        else:
            client.oauth2_login(settings.username, oauth2_token(settings))
    except LoginError as exc:
        raise ImapAuthError(
            f"authentication failed for {settings.username}: {_text(exc)}"
        ) from None


def oauth2_token(settings: ImapSettings) -> str:
    """The configured token, or the output of ``oauth2_token_command``.

    The command runs on every (re)connect, because access tokens expire within the hour; a
    helper such as `oauth2ms` or `gcloud auth print-access-token` refreshes it.
    """
    if settings.oauth2_token:
        return settings.oauth2_token
    command = settings.oauth2_token_command or ""
    try:
        result = subprocess.run(
            command,
            shell=True,
            capture_output=True,
            text=True,
            timeout=_TOKEN_COMMAND_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImapAuthError(f"oauth2_token_command failed: {exc}") from None
    token = result.stdout.strip().splitlines()[0].strip() if result.stdout.strip() else ""
    if result.returncode != 0 or not token:
        detail = result.stderr.strip()[:200] or f"exit status {result.returncode}, no token printed"
        raise ImapAuthError(f"oauth2_token_command failed: {detail}")
    return token


def close(client: IMAPClient) -> None:
    """LOGOUT politely; if that fails the socket is closed anyway."""
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            client.shutdown()


def _text(exc: BaseException) -> str:
    text = str(exc)
    return text[2:-1] if text.startswith(("b'", 'b"')) else text


# -- one folder: the fetch cycle -------------------------------------------------------------


AcceptFn = Callable[[list[IncomingMail]], list[Accepted]]


class FolderSync:
    """The fetch -> accept -> after-action -> advance cycle for one (account, folder)."""

    def __init__(self, settings: ImapSettings, store: ImapStore, accept: AcceptFn) -> None:
        self.settings = settings
        self.store = store
        self.accept = accept
        self.uidvalidity = 0
        self.last_uid = 0
        self.move_supported = False
        self.uidplus = False

    def open(self, client: IMAPClient) -> None:
        """SELECT the folder and load our position; a new UIDVALIDITY means a full rescan."""
        s = self.settings
        self.move_supported = client.has_capability("MOVE")
        self.uidplus = client.has_capability("UIDPLUS")
        if s.after.startswith("move:") and not client.folder_exists(s.after[5:]):
            log.info("imap %s: creating folder %r for processed mail", s.name, s.after[5:])
            client.create_folder(s.after[5:])
        selected = client.select_folder(s.folder)
        self.uidvalidity = int(selected[b"UIDVALIDITY"])
        stored = self.store.imap_position(s.name, s.folder)
        if stored is not None and stored[0] == self.uidvalidity:
            self.last_uid = stored[1]
            return
        self.last_uid = 0
        self.store.save_imap_position(s.name, s.folder, self.uidvalidity, 0)
        if stored is None:
            return
        log.warning(
            "imap %s: UIDVALIDITY of %r changed (%d -> %d): rescanning the whole folder;"
            " messages seen before are recorded as duplicates, not acted on twice",
            s.name, s.folder, stored[0], self.uidvalidity,
        )  # fmt: skip

    def run(self, client: IMAPClient, stopping: Callable[[], bool] = lambda: False) -> CycleResult:
        """Process everything after our position; repeat until a search finds nothing new."""
        result = CycleResult()
        while not stopping():
            uids = self.new_uids(client)
            if not uids:
                break
            for chunk in _chunks(uids, _BATCH_MESSAGES):
                sizes = self.sizes(client, chunk)
                for batch in _by_size(chunk, sizes, _BATCH_BYTES):
                    if stopping():
                        return result
                    self.process(client, batch, sizes, result)
        self.store.mark_imap_success(self.settings.name, self.settings.folder)
        return result

    def new_uids(self, client: IMAPClient) -> list[int]:
        # "UID n:*" always matches the highest UID, even when it is below n: filter.
        found = client.search(["UID", f"{self.last_uid + 1}:*"])
        return sorted(uid for uid in found if uid > self.last_uid)

    def sizes(self, client: IMAPClient, uids: list[int]) -> dict[int, int]:
        """RFC822.SIZE first, so an oversized message is never downloaded."""
        data = client.fetch(uids, ["RFC822.SIZE"])
        return {uid: int(item.get(b"RFC822.SIZE", 0)) for uid, item in data.items()}

    def process(
        self, client: IMAPClient, batch: list[int], sizes: dict[int, int], result: CycleResult
    ) -> None:
        """Fetch, commit, then (only then) apply the after-action and advance the position."""
        limit = self.settings.max_message_bytes
        wanted = [uid for uid in batch if uid in sizes and sizes[uid] <= limit]
        for uid in batch:
            if uid in sizes and sizes[uid] > limit:
                self.report_oversize(uid, sizes[uid])
                result.oversize += 1
        bodies = client.fetch(wanted, ["BODY.PEEK[]"]) if wanted else {}
        fetched = [uid for uid in wanted if bodies.get(uid, {}).get(b"BODY[]") is not None]
        mails = [self.incoming(bodies[uid][b"BODY[]"]) for uid in fetched]
        if mails:
            for accepted in self.accept(mails):
                result.accepted += 1
                result.duplicates += accepted.duplicate_of is not None
            self.apply_after(client, fetched)
        self.last_uid = max(batch)
        self.store.save_imap_position(
            self.settings.name, self.settings.folder, self.uidvalidity, self.last_uid
        )

    def incoming(self, raw: bytes) -> IncomingMail:
        s = self.settings
        return intake.incoming(
            raw, source=f"imap:{s.name}", services=(s.service,), peer=f"{s.host}:{s.port}"
        )

    def report_oversize(self, uid: int, size: int) -> None:
        """Left in place and reported once: the position moves past it, so it is not refetched."""
        s = self.settings
        detail = (
            f"imap {s.name}: message UID {uid} in {s.folder!r} is {size} bytes, over"
            f" max_message_bytes ({s.max_message_bytes}); left in the mailbox, not processed"
        )
        log.warning("%s", detail)
        self.store.log_event("imap_oversize", service=s.service, detail=detail)

    def apply_after(self, client: IMAPClient, uids: list[int]) -> None:
        after = self.settings.after
        if after == "seen":
            client.add_flags(uids, [SEEN], silent=True)
        elif after == "delete":
            client.delete_messages(uids, silent=True)
            self.expunge(client, uids)
        else:
            self.move(client, uids, after[len("move:") :])

    def move(self, client: IMAPClient, uids: list[int], folder: str) -> None:
        if self.move_supported:
            client.move(uids, folder)
            return
        client.copy(uids, folder)
        client.delete_messages(uids, silent=True)
        self.expunge(client, uids)

    def expunge(self, client: IMAPClient, uids: list[int]) -> None:
        # Plain EXPUNGE would also remove messages a human flagged \Deleted: avoid it if we can.
        if self.uidplus:
            client.uid_expunge(uids)
        else:
            client.expunge()


def _chunks(uids: list[int], size: int) -> Iterator[list[int]]:
    # UID lists stay short: some servers limit command lines to 8 KB.
    for start in range(0, len(uids), size):
        yield uids[start : start + size]


def _by_size(uids: list[int], sizes: dict[int, int], max_bytes: int) -> Iterator[list[int]]:
    """Split so one batch of bodies in memory stays under `max_bytes` (oversized ones count 0)."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if batch and total + size > max_bytes:
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield batch


def run_once(settings: ImapSettings, store: Store) -> CycleResult:
    """One connect / fetch / disconnect cycle (``gateway imap-once`` for cron)."""
    client = connect(settings)
    try:
        sync = FolderSync(settings, store, store.accept)
        sync.open(client)
        return sync.run(client)
    finally:
        close(client)


# -- the long-running poller -----------------------------------------------------------------


class ImapPoller:
    """One account in its own thread: connect, sync, IDLE or poll, reconnect with backoff.

    `state` (connecting | idle | polling | error: ... | stopped) and `last_success` (time of the
    last completed fetch cycle; at least every `_IDLE_RENEW_SECONDS` in IDLE mode) are for health.
    """

    def __init__(
        self,
        settings: ImapSettings,
        spool: intake.SpoolWriter,
        db_path: Path,
        *,
        backoff: Backoff | None = None,
        idle_renew_seconds: float = _IDLE_RENEW_SECONDS,
        connect_fn: Callable[[ImapSettings], IMAPClient] = connect,
    ) -> None:
        self.settings = settings
        self.state = "stopped"
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.attempts = 0  # connection attempts (tests watch the backoff with it)
        self.errors = 0  # failed sessions (connect, login or fetch), for metrics
        self._spool = spool
        self._db_path = db_path
        self._backoff = backoff or Backoff()
        self._idle_renew = idle_renew_seconds
        self._connect = connect_fn
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._client: IMAPClient | None = None
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name=f"imap-{settings.name}", daemon=True)

    def start(self) -> None:
        self._set_state("starting")
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Interrupt IDLE, a wait or a blocked read, and join the thread (blocking)."""
        self._stop.set()
        with self._lock:
            client = self._client
        if client is not None:
            _interrupt(client)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning(
                    "imap %s: poller did not stop within %.0f s", self.settings.name, timeout
                )

    # -- thread body ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            store = open_store(self._db_path)
        except Exception as exc:
            self._set_state(f"error: cannot open the database: {exc}")
            log.error(
                "imap %s: cannot open the database, poller not running: %s", self.settings.name, exc
            )
            return
        try:
            while not self._stop.is_set():
                try:
                    self._session(store)
                except Exception as exc:
                    if self._stop.is_set():
                        break
                    self._failed(exc)
        finally:
            store.close()
            self._set_state("stopped")

    def _session(self, store: ImapStore) -> None:
        if not self._failures:  # while failing, the state keeps saying why
            self._set_state("connecting")
        self.attempts += 1
        client = self._connect(self.settings)
        with self._lock:
            self._client = client
        try:
            if self._stop.is_set():
                return
            sync = FolderSync(self.settings, store, self._accept)
            sync.open(client)
            use_idle = self.settings.idle and client.has_capability("IDLE")
            if self.settings.idle and not use_idle:
                log.info("imap %s: server has no IDLE, polling instead", self.settings.name)
            self._cycle(sync, client)
            self._set_state("idle" if use_idle else "polling")
            while not self._stop.is_set():
                if use_idle:
                    self._idle(client)
                elif self._stop.wait(self.settings.poll_seconds):
                    break
                if not self._stop.is_set():
                    self._cycle(sync, client)
        finally:
            with self._lock:
                self._client = None
            close(client)

    def _cycle(self, sync: FolderSync, client: IMAPClient) -> None:
        result = sync.run(client, self._stop.is_set)
        self.last_success = time.time()
        if self._failures:
            log.info(
                "imap %s: connected again after %d failure(s)", self.settings.name, self._failures
            )
        self._failures, self.last_error = 0, None
        if result.accepted or result.oversize:
            log.info(
                "imap %s: accepted %d message(s) (%d duplicate), %d left in place as too big",
                self.settings.name, result.accepted, result.duplicates, result.oversize,
            )  # fmt: skip

    def _accept(self, mails: list[IncomingMail]) -> list[Accepted]:
        """Submit the whole batch first so the spool commits it in one group commit."""
        futures = [self._spool.submit(mail) for mail in mails]
        try:
            return [future.result(_COMMIT_TIMEOUT) for future in futures]
        except concurrent.futures.TimeoutError:
            raise ImapError("spool commit timed out; will re-fetch") from None

    def _idle(self, client: IMAPClient) -> None:
        """IDLE until new mail is announced, the renewal time passes, or stop() is called."""
        client.idle()
        deadline = time.monotonic() + self._idle_renew
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

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self.errors += 1
        reason = _describe(exc)
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


def _has(responses: list[Any], word: bytes) -> bool:
    return any(word in (r[:2] if isinstance(r, tuple) else ()) for r in responses)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ImapError):
        return str(exc)
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return f"TLS error: {exc}"
    if isinstance(exc, OSError):
        return f"connection failed: {exc.strerror or exc}"
    return f"{type(exc).__name__}: {_text(exc)}"


def _interrupt(client: IMAPClient) -> None:
    """Wake a thread blocked on the socket: shut down the TCP socket underneath (also for TLS)."""
    with contextlib.suppress(Exception):
        sock = client.socket()
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
