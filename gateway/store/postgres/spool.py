"""Acceptance on PostgreSQL: a batch in one synchronous commit; duplicates found by the jobs'
UNIQUE (service, fingerprint) constraint, so they are found across nodes too."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from gateway.node import this_node
from gateway.store.postgres.imap import ImapQueries
from gateway.store.postgres.wakeups import notify_jobs
from gateway.store.records import Accepted, ImapPosition, IncomingMail


class SpoolQueries(ImapQueries):
    def accept(
        self, mails: Sequence[IncomingMail], positions: Sequence[ImapPosition] = ()
    ) -> list[Accepted]:
        now = time.time()
        with self.transaction():
            results = [self._accept_one(mail, now) for mail in mails]
            for position in positions:
                self._advance_imap(position)
            if any(r.duplicate_of is None for r in results):
                with self._connection() as conn:
                    notify_jobs(conn)  # delivered with the commit: every node's worker wakes
        return results

    def undecided_jobs(self) -> int:
        row = self._row("SELECT COUNT(*) FROM jobs WHERE state = 'pending'")
        return int(row[0]) if row else 0

    def _accept_one(self, mail: IncomingMail, now: float) -> Accepted:
        row = self._row(
            "INSERT INTO messages (received_at, source, peer, mail_from, rcpt_tos, message_id,"
            " fingerprint, size, raw, node) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id",
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
                this_node(),
            ),
        )
        assert row is not None
        message = int(row[0])
        new_jobs = 0
        for service in mail.services:
            # Another node inserting the same (service, fingerprint) makes this wait for its
            # commit, then do nothing: the constraint decides, never a read-then-write.
            new_jobs += self._exec(
                "INSERT INTO jobs (message, service, fingerprint) VALUES (%s,%s,%s)"
                " ON CONFLICT (service, fingerprint) DO NOTHING",
                (message, service, mail.fingerprint),
            )
        original = self._original(mail) if new_jobs == 0 else None
        if original is not None:
            self._exec(
                "UPDATE messages SET raw = NULL, duplicate_of = %s WHERE id = %s",
                (original, message),
            )
            self._event("duplicate", "", message, None, f"duplicate of message {original}", now)
            return Accepted(message, original)
        return Accepted(message, None)

    def _original(self, mail: IncomingMail) -> int | None:
        for service in mail.services:
            row = self._row(
                "SELECT message FROM jobs WHERE service = %s AND fingerprint = %s",
                (service, mail.fingerprint),
            )
            if row:
                return int(row[0])
        return None
