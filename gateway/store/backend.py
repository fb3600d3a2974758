"""Opening the configured backend: the one place that knows which backends exist."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.errors import StoreError
from gateway.store.protocols import Store


def open_store(
    location: str | os.PathLike[str],
    *,
    timeout: float = 30.0,
    eager: bool = False,
    durable: bool = True,
    read_only: bool = False,
) -> Store:
    """A new connection to the store at `location`, for use by one thread.

    A file path opens SQLite (the embedded default). `timeout` bounds the wait for the write
    lock; `durable=False` trades the flush of each commit for speed where a power cut may lose
    the last commits harmlessly; `eager` polls for the write lock instead of backing off (the
    spool writer, whose commit an SMTP client waits on). A backend may ignore these hints.
    `read_only` never creates, migrates or writes anything, so listings work with read access
    alone (another user, a read-only state directory); it raises `StoreMissing` when there is
    no store yet and `StoreError` when it cannot be read.
    """
    _refuse_urls(location)
    from gateway.store.sqlite import SQLiteStore

    return SQLiteStore(
        Path(location), timeout=timeout, eager=eager, durable=durable, read_only=read_only
    )


def verify_store(location: str | os.PathLike[str]) -> str:
    """StoreError (saying what to do) unless the store is healthy, or absent and creatable;
    else one line on what was found. What `serve` and `gateway check` run once at start.
    SQLite: the directory takes files, the database is writable, its header is SQLite's and
    `PRAGMA quick_check` passes; every connection also refuses an empty or non-SQLite file."""
    _refuse_urls(location)
    from gateway.store.sqlite.integrity import verify

    return verify(Path(location))


def _refuse_urls(location: str | os.PathLike[str]) -> None:
    if isinstance(location, str) and "://" in location:
        scheme = location.partition("://")[0]
        raise StoreError(f"unsupported store URL {scheme}://...: only SQLite files for now")
