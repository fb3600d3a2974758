"""Accept raw mail into the durable spool: shared by SMTP, IMAP and `gateway ingest`.

A mail is *accepted* only when `Store.accept` has committed it. The `SpoolWriter` owns the one
writing connection for acceptance and commits whatever has queued up while the previous commit
was running in one transaction (group commit), so many concurrent SMTP sessions share each
fsync instead of paying one each. An IMAP batch is one request carrying its folder's new
position, which commits in the same transaction as the batch's mail. The same connection
answers SMTP pacing's question (how many jobs wait for a decision) between commits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import StoreError
from gateway.mail.fingerprint import fingerprint
from gateway.store import Accepted, ImapPosition, IncomingMail, SpoolStore, open_store

log = logging.getLogger(__name__)


def incoming(
    raw: bytes | bytearray,
    *,
    source: str,
    services: tuple[str, ...],
    mail_from: str | None = None,
    rcpt_tos: tuple[str, ...] = (),
    peer: str = "",
    trace_length: int = 0,
) -> IncomingMail:
    """Wrap raw bytes with their duplicate-detection fingerprint.

    Message-ID plus body hash identifies a redelivery (RFC 5321 §6.1); without a Message-ID only
    byte-identical copies count as duplicates, so two different mails are never merged. The
    first `trace_length` bytes (our own Received: header) never count: a redelivery gets a new
    one.
    """
    message_id, body_hash = fingerprint(raw, trace_length)
    if message_id:
        key = f"id:{message_id}|{body_hash}"
    else:
        key = "raw:" + hashlib.sha256(memoryview(raw)[trace_length:]).hexdigest()
    return IncomingMail(
        raw=raw,
        source=source,
        services=services,
        fingerprint=key,
        message_id=message_id,
        mail_from=mail_from,
        rcpt_tos=rcpt_tos,
        peer=peer,
    )


@dataclass(frozen=True)
class _Request:
    """One caller's mail: a single SMTP/ingest mail (its future gets its `Accepted`), or an
    IMAP batch with its positions (its future gets the list)."""

    mails: tuple[IncomingMail, ...]
    future: concurrent.futures.Future[Any]
    positions: tuple[ImapPosition, ...] = ()
    single: bool = True

    def resolve(self, results: list[Accepted]) -> None:
        if not self.future.done():  # a caller that gave up still had its mail committed
            self.future.set_result(results[0] if self.single else results)


@dataclass(frozen=True)
class _Count:
    """Pacing's question, answered on the writer's connection after the batch queued with it."""

    future: concurrent.futures.Future[int]


class SpoolWriter:
    """One thread, one connection, batched commits; callers wait on a future per mail."""

    def __init__(self, db_path: str | Path, *, max_batch: int = 512) -> None:
        self._db_path = db_path
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Request | _Count | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._listeners: list[Callable[[], None]] = []
        self._ready = threading.Event()
        self._open_error: BaseException | None = None

    def on_commit(self, listener: Callable[[], None]) -> None:
        """Call `listener` (from the writer thread) after every commit, e.g. to wake a worker."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._open_error is not None:
            raise self._open_error

    def stop(self) -> None:
        """Commit what is queued, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def submit(self, mail: IncomingMail) -> concurrent.futures.Future[Accepted]:
        future: concurrent.futures.Future[Accepted] = concurrent.futures.Future()
        self._queue.put(_Request((mail,), future))
        return future

    def submit_batch(
        self, mails: Sequence[IncomingMail], positions: Sequence[ImapPosition] = ()
    ) -> concurrent.futures.Future[list[Accepted]]:
        """Accept `mails` and save `positions` in one commit (an IMAP batch)."""
        future: concurrent.futures.Future[list[Accepted]] = concurrent.futures.Future()
        self._queue.put(_Request(tuple(mails), future, tuple(positions), single=False))
        return future

    def accept(self, mail: IncomingMail) -> asyncio.Future[Accepted]:
        """Awaitable from the event loop. A plain future, not a coroutine: the SMTP handler
        shields it as it is, with no task (and no extra loop iteration) per mail."""
        return asyncio.wrap_future(self.submit(mail))

    def undecided(self) -> asyncio.Future[int]:
        """Awaitable count of the jobs waiting for a decision (`SpoolStore.undecided_jobs`)."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._queue.put(_Count(future))
        return asyncio.wrap_future(future)

    def _run(self) -> None:
        try:
            store = open_store(self._db_path, eager=True)
        except BaseException as exc:
            self._open_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                batch, counts, stopping = self._next_batch()
                if batch:
                    self._commit(store, batch)
                if counts:
                    _answer(store, counts)
                if stopping:
                    return
        finally:
            store.close()

    def _next_batch(self) -> tuple[list[_Request], list[_Count], bool]:
        """What queued up meanwhile (at least one item): mail to commit, counts to answer."""
        batch: list[_Request] = []
        counts: list[_Count] = []
        item = self._queue.get()
        while item is not None:
            if isinstance(item, _Count):
                counts.append(item)
            else:
                batch.append(item)
            if len(batch) >= self._max_batch:
                return batch, counts, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, counts, False
        return batch, counts, True

    def _commit(self, store: SpoolStore, batch: list[_Request]) -> None:
        mails = [mail for request in batch for mail in request.mails]
        positions = [position for request in batch for position in request.positions]
        try:
            results = store.accept(mails, positions)
        except StoreError as exc:
            log.error("spool commit of %d message(s) failed: %s", len(batch), exc)
            _fail(batch, exc)
            return
        except Exception as exc:  # never leave a caller waiting forever
            log.exception("unexpected spool failure")
            _fail(batch, StoreError(f"internal error: {exc}"))
            return
        start = 0
        for request in batch:
            request.resolve(results[start : start + len(request.mails)])
            start += len(request.mails)
        for listener in self._listeners:
            listener()


def _answer(store: SpoolStore, counts: list[_Count]) -> None:
    try:
        result: int | BaseException = store.undecided_jobs()
    except Exception as exc:  # StoreError or worse: pacing then lets mail through
        result = exc
    for count in counts:
        if not count.future.set_running_or_notify_cancel():
            continue  # its asker gave up waiting
        if isinstance(result, BaseException):
            count.future.set_exception(result)
        else:
            count.future.set_result(result)


def _fail(batch: list[_Request], exc: BaseException) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(exc)
