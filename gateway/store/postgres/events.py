"""The event log on PostgreSQL (see `gateway.store.sqlite.events`)."""

from __future__ import annotations

import time
from typing import Any

from gateway.store.postgres.connection import Connection


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
        self._exec(
            "INSERT INTO events (at, kind, service, message, incident_key, detail)"
            " VALUES (%s,%s,%s,%s,%s,%s)",
            (at, kind, service, message, key, detail),
        )

    def events(self, *, message: int | None = None, limit: int = 200) -> list[dict[str, Any]]:
        where, args = ("WHERE message = %s", [message]) if message is not None else ("", [])
        return self._dicts(
            f"SELECT * FROM events {where} ORDER BY id DESC LIMIT %s", [*args, limit]
        )
