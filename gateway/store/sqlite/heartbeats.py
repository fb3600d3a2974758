"""Expected mail (`[[heartbeat]]`): one row per configured name, written by the processor.

Standard SQL only (an upsert by `ON CONFLICT`), so the PostgreSQL backend can use the same text.
"""

from __future__ import annotations

from gateway.store.records import HeartbeatState
from gateway.store.sqlite.connection import Connection

HEARTBEAT_FIELDS = (
    "name",
    "service",
    "watched_since",
    "last_seen",
    "last_message",
    "missing_since",
)
_COLUMNS = ", ".join(HEARTBEAT_FIELDS)
_UPDATES = ", ".join(f"{f} = excluded.{f}" for f in HEARTBEAT_FIELDS[1:])


class HeartbeatQueries(Connection):
    def mail_heartbeats(self) -> list[HeartbeatState]:
        rows = self.conn.execute(f"SELECT {_COLUMNS} FROM mail_heartbeats ORDER BY name")
        return [HeartbeatState(*row) for row in rows.fetchall()]

    def save_mail_heartbeat(self, state: HeartbeatState) -> None:
        with self.transaction():
            self.conn.execute(
                f"INSERT INTO mail_heartbeats ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
                f" ON CONFLICT (name) DO UPDATE SET {_UPDATES}",
                tuple(getattr(state, f) for f in HEARTBEAT_FIELDS),
            )
