"""Acceptance: a batch of mails in one FULL-synchronous commit, duplicates recorded as such."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from gateway.node import this_node
from gateway.store.records import Accepted, ImapPosition, IncomingMail
from gateway.store.sqlite.imap import ImapQueries


class SpoolQueries(ImapQueries):
    def accept(
        self, mails: Sequence[IncomingMail], positions: Sequence[ImapPosition] = ()
    ) -> list[Accepted]:
        """Durably store a batch of mails in one FULL-synchronous commit (group commit), with
        the IMAP positions it moves to: a crash keeps both or neither."""
        now = time.time()
        results: list[Accepted] = []
        with self.transaction():
            for mail in mails:
                results.append(self._accept_one(mail, now))
            for position in positions:
                self._advance_imap(position)
        return results

    def undecided_jobs(self) -> int:
        return int(
            self.conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'pending'").fetchone()[0]
        )

    def _accept_one(self, mail: IncomingMail, now: float) -> Accepted:
        cursor = self.conn.execute(
            "INSERT INTO messages (received_at, source, peer, mail_from, rcpt_tos, message_id,"
            " fingerprint, size, raw, duplicate_of, node) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                now,
                mail.source,
                mail.peer,
                mail.mail_from,
                json.dumps(list(mail.rcpt_tos)),
                mail.message_id,
                mail.fingerprint,
                len(mail.raw),
                mail.raw,
                None,
                this_node(),
            ),
        )
        message = cursor.lastrowid
        assert message is not None
        new_jobs = 0
        for service in mail.services:
            inserted = self.conn.execute(
                "INSERT OR IGNORE INTO jobs (message, service, fingerprint) VALUES (?,?,?)",
                (message, service, mail.fingerprint),
            )
            new_jobs += inserted.rowcount
        original = self._original(mail) if new_jobs == 0 else None
        if original is not None:
            # Every service already has this mail: keep the record, drop the copy of the bytes.
            self.conn.execute(
                "UPDATE messages SET raw = NULL, duplicate_of = ? WHERE id = ?", (original, message)
            )
            self._event("duplicate", "", message, None, f"duplicate of message {original}", now)
            return Accepted(message, original)
        return Accepted(message, None)

    def _original(self, mail: IncomingMail) -> int | None:
        """The message that first brought this mail to (the first of) its services."""
        for service in mail.services:
            row = self.conn.execute(
                "SELECT message FROM jobs WHERE service = ? AND fingerprint = ?",
                (service, mail.fingerprint),
            ).fetchone()
            if row:
                return row[0]
        return None
