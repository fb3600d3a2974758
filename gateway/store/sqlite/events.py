"""The event log: duplicates, would-send records, IMAP and notification failures."""

from __future__ import annotations

import time
from typing import Any

from gateway.store.sqlite.connection import Connection


class EventQueries(Connection):
    def log_event(
        self,
        kind: str,
        *,
        service: str = "",
        message: int | None = None,
        incident_key: str | None = None,
        detail: str = "",
    ) -> None:
        self._event(kind, service, message, incident_key, detail, time.time())

    def _event(
        self, kind: str, service: str, message: int | None, key: str | None, detail: str, at: float
    ) -> None:
        self.conn.execute(
            "INSERT INTO events (at, kind, service, message, incident_key, detail) VALUES (?,?,?,?,?,?)",
            (at, kind, service, message, key, detail),
        )

    def events(self, *, message: int | None = None, limit: int = 200) -> list[dict[str, Any]]:
        where, args = ("WHERE message = ?", [message]) if message is not None else ("", [])
        return list(
            self.db.query(f"SELECT * FROM events {where} ORDER BY id DESC LIMIT ?", [*args, limit])
        )
