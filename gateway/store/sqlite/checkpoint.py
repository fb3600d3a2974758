"""Background WAL checkpoints, so no commit (an SMTP 250) pays for copying the WAL back."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger(__name__)


class Checkpointer:
    """Keeps the WAL short with PASSIVE checkpoints on a thread of its own.

    A passive checkpoint never takes the write lock, so no writer waits for it; the database
    file's fsync happens here instead of inside somebody's commit.
    """

    def __init__(self, db_path: Path, interval: float = 1.0) -> None:
        self._db_path = db_path
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        conn = sqlite3.connect(str(self._db_path), timeout=5.0, isolation_level=None)
        try:
            while not self._stop.wait(self._interval):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:  # busy or I/O trouble: the next round retries
                    log.debug("background checkpoint failed: %s", exc)
        finally:
            conn.close()
