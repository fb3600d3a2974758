"""Messages that could not be read: owed, retried with backoff, reported, never skipped silently.

A UID whose FETCH fails, or that is missing from the server's answer, is *owed*: recorded in
the store before the folder's position may pass it, tried again when its backoff has run out,
and reported (an `imap_unreadable` event, the status page, `/metrics`) after `report_after`
failures. It stops being owed only when it is accepted, or when the server says it no longer
exists (an `imap_vanished` event: someone removed it before the gateway could read it).
Meanwhile the rest of the folder is taken as usual: one bad message blocks nothing else.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from gateway.backoff import Backoff
from gateway.config import ImapSettings
from gateway.store import ImapFailure, ImapStore

log = logging.getLogger("gateway.intake.imap")


@dataclass(frozen=True)
class UnreadablePolicy:
    """How an unreadable message is retried (`backoff` per failure) and when it is reported."""

    backoff: Backoff = field(default_factory=lambda: Backoff(initial=30.0, maximum=3600.0))
    report_after: int = 3


class OwedMail:
    """The owed UIDs of one folder, mirrored from the store (which outlives every session)."""

    def __init__(self, settings: ImapSettings, store: ImapStore, policy: UnreadablePolicy) -> None:
        self.settings = settings
        self.store = store
        self.policy = policy
        self.owed: dict[int, ImapFailure] = {}

    def load(self) -> None:
        s = self.settings
        self.owed = {f.uid: f for f in self.store.imap_owed(s.name, s.folder)}

    def __contains__(self, uid: int) -> bool:
        return uid in self.owed

    def due(self, now: float) -> list[int]:
        """Owed UIDs whose backoff has run out: this cycle tries them again."""
        return sorted(uid for uid, f in self.owed.items() if f.next_attempt_at <= now)

    def next_due(self) -> float | None:
        """When the next owed UID may be tried again (None: nothing owed)."""
        return min((f.next_attempt_at for f in self.owed.values()), default=None)

    def failed(self, uid: int, reason: str) -> None:
        """Owe `uid` (durably, before the position passes it); report it once it keeps failing."""
        s, now = self.settings, time.time()
        known = self.owed.get(uid)
        delay = self.policy.backoff.delay(known.attempts + 1 if known else 1)
        attempts = self.store.record_imap_failure(s.name, s.folder, uid, reason, now + delay)
        self.owed[uid] = ImapFailure(
            s.name, s.folder, uid, attempts, known.first_failed_at if known else now, now,
            now + delay, reason, known.reported_at if known else None,
        )  # fmt: skip
        what = f"imap {s.name}: message UID {uid} in {s.folder!r} could not be read ({reason})"
        if attempts != self.policy.report_after:
            log.warning("%s; attempt %d, next try in %.1f s", what, attempts, delay)
            return
        detail = (
            f"{what}, {attempts} times in a row; it stays in the mailbox and is tried again"
            f" with backoff (next in {delay:.1f} s)"
        )
        log.error("%s", detail)
        self.store.report_imap_failure(s.name, s.folder, uid, service=s.service, detail=detail)

    def vanished(self, uid: int) -> None:
        """The server no longer has `uid`: nothing is left to read, but it is said, not hidden."""
        s = self.settings
        known = self.owed.pop(uid, None)
        tried = f" (it had failed {known.attempts} time(s): {known.error})" if known else ""
        detail = (
            f"imap {s.name}: message UID {uid} in {s.folder!r} disappeared from the mailbox"
            f" before the gateway could read it{tried}"
        )
        log.warning("%s", detail)
        self.store.forget_imap_failure(s.name, s.folder, uid, service=s.service, detail=detail)

    def resolved(self, uids: list[int]) -> None:
        """Accepted (or reported oversize) in a committed batch: owed no more."""
        for uid in uids:
            self.owed.pop(uid, None)
