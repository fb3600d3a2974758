"""Expected mail (`[[heartbeat]]`) on PostgreSQL: one row per configured name, upserted."""

from __future__ import annotations

from gateway.store.postgres.connection import Connection
from gateway.store.records import HeartbeatState
from gateway.store.sqlite.heartbeats import HEARTBEAT_FIELDS

_COLUMNS = ", ".join(HEARTBEAT_FIELDS)
_UPDATES = ", ".join(f"{f} = excluded.{f}" for f in HEARTBEAT_FIELDS[1:])


class HeartbeatQueries(Connection):
    def mail_heartbeats(self) -> list[HeartbeatState]:
        rows = self._rows(f"SELECT {_COLUMNS} FROM mail_heartbeats ORDER BY name")
        return [HeartbeatState(*row) for row in rows]

    def save_mail_heartbeat(self, state: HeartbeatState) -> None:
        """One upsert: two nodes saving the same name never fail on the primary key."""
        placeholders = ", ".join(["%s"] * len(HEARTBEAT_FIELDS))
        self._exec(
            f"INSERT INTO mail_heartbeats ({_COLUMNS}) VALUES ({placeholders})"
            f" ON CONFLICT (name) DO UPDATE SET {_UPDATES}",
            tuple(getattr(state, f) for f in HEARTBEAT_FIELDS),
        )
