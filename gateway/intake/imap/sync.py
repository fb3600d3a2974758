"""One folder's fetch cycle: find what is new or owed, fetch it, accept it, then act on it.

    SEARCH UID last+1:*  (+ owed UIDs due again)  ->  FETCH RFC822.SIZE  ->  FETCH BODY.PEEK[]
        ->  one commit: the batch's mail + the folder's new position  ->  after-action

Every UID the position passes is accepted, reported oversize, or owed (`failures.OwedMail`):
a FETCH that fails for one message is retried one message at a time, so the others are still
taken, and the failing one is retried with backoff and reported. The source message is touched
only after its commit, and that commit also records the after-action as unfinished until the
server confirms it (`after.AfterAction`), so a crash at any point neither loses mail nor
fetches it twice. Messages are selected by UID position, not by flags: a human reading the
mailbox (setting \\Seen) must not hide an alert from the gateway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from imapclient import IMAPClient

from gateway.config import ImapSettings
from gateway.intake import spool as intake
from gateway.intake.imap import compat
from gateway.intake.imap.after import AfterAction
from gateway.intake.imap.connection import close, connect, connection_lost, describe
from gateway.intake.imap.failures import OwedMail, UnreadablePolicy
from gateway.store import Accepted, ImapPosition, ImapStore, IncomingMail, Store

log = logging.getLogger("gateway.intake.imap")  # one logger for the whole account's story

_BATCH_MESSAGES = 200  # BODY.PEEK[] fetched (and committed) per round trip ...
_BATCH_BYTES = 16 * 1024 * 1024  # ... bounded by size so memory stays small

AcceptFn = Callable[[list[IncomingMail], Sequence[ImapPosition]], list[Accepted]]


@dataclass
class CycleResult:
    """What one fetch cycle did (for `gateway imap-once` and logs)."""

    accepted: int = 0
    duplicates: int = 0
    oversize: int = 0
    failed: int = 0  # could not be read this time: owed, retried later
    vanished: int = 0  # gone from the mailbox before they could be read


class FolderSync:
    """The fetch -> accept (with the position) -> after-action cycle for one (account, folder).

    `suspects`: UIDs to fetch one at a time, because a FETCH of several of them cost the
    connection; the poller keeps the set across reconnects.
    """

    def __init__(
        self,
        settings: ImapSettings,
        store: ImapStore,
        accept: AcceptFn,
        *,
        unreadable: UnreadablePolicy | None = None,
        suspects: set[int] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.accept = accept
        self.owed = OwedMail(settings, store, unreadable or UnreadablePolicy())
        self.suspects = suspects if suspects is not None else set()
        self.uidvalidity = 0
        self.last_uid = 0
        self.after: AfterAction | None = None
        self.after_pending = False  # the last commit marked an after-action as unfinished

    # -- opening -----------------------------------------------------------------------------

    def open(self, client: IMAPClient) -> None:
        """SELECT the folder, load our position (a new UIDVALIDITY means a full rescan) and
        finish the after-action a lost connection left unfinished."""
        s = self.settings
        self.after = AfterAction(s, client)
        target = self.after.target
        if target and not client.folder_exists(target):
            log.info("imap %s: creating folder %r for processed mail", s.name, target)
            client.create_folder(target)
        selected = client.select_folder(s.folder)
        self.uidvalidity = int(selected[b"UIDVALIDITY"])
        self.load_position()
        self.owed.load()
        self.finish_after(client, self.store.imap_unfinished(s.name, s.folder), unfinished=True)
        compat.announced_new_mail(client)  # SELECT's count: the first search covers it

    def load_position(self) -> None:
        s = self.settings
        stored = self.store.imap_position(s.name, s.folder)
        if stored is not None and stored[0] == self.uidvalidity:
            self.last_uid = stored[1]
            return
        self.last_uid = 0
        self.suspects.clear()
        self.store.save_imap_position(s.name, s.folder, self.uidvalidity, 0)
        if stored is None:
            return
        log.warning(
            "imap %s: UIDVALIDITY of %r changed (%d -> %d): rescanning the whole folder;"
            " messages seen before are recorded as duplicates, not acted on twice",
            s.name, s.folder, stored[0], self.uidvalidity,
        )  # fmt: skip

    # -- the cycle ---------------------------------------------------------------------------

    def run(self, client: IMAPClient, stopping: Callable[[], bool] = lambda: False) -> CycleResult:
        """Take everything after our position, then what is owed and due (last: a message
        that costs the connection must not starve new mail); repeat until a search finds
        nothing new and the server announced nothing meanwhile."""
        result = CycleResult()
        completed = self.take_all(client, stopping, result)
        if self.after_pending:  # the last batch's after-action is applied: clear its mark
            self.store.imap_after_done(self.settings.name, self.settings.folder)
            self.after_pending = False
        if completed:
            self.store.mark_imap_success(self.settings.name, self.settings.folder)
        return result

    def take_all(
        self, client: IMAPClient, stopping: Callable[[], bool], result: CycleResult
    ) -> bool:
        """The cycle's loop; False if `stopping` ended it early (between batches)."""
        retry = self.owed.due(time.time())  # each owed UID is tried at most once per cycle
        while not stopping():
            compat.announced_new_mail(client)  # mail announced before this search: it finds it
            todo = self.new_uids(client)
            if not todo and compat.announced_new_mail(client):  # announced in the search's answer
                continue
            if not todo:
                todo, retry = retry, []
            if not todo:
                return True
            for chunk in _chunks(todo, _BATCH_MESSAGES):
                if stopping():
                    return False
                self.take(client, chunk, result)
        return False

    def new_uids(self, client: IMAPClient) -> list[int]:
        # "UID n:*" always matches the highest UID, even when it is below n: filter.
        # Owed UIDs above the position (the connection died before it could pass them) come
        # only through `run`'s retry list, after the new mail, when their backoff allows.
        found = client.search(["UID", f"{self.last_uid + 1}:*"])
        return sorted(uid for uid in found if uid > self.last_uid and uid not in self.owed)

    def take(self, client: IMAPClient, chunk: list[int], result: CycleResult) -> None:
        """Sizes first (an oversized message is never downloaded), then bodies in batches."""
        if len(chunk) > 1 and self.suspects.intersection(chunk):
            for uid in chunk:
                self.take(client, [uid], result)
            return
        answers, errors = self.fetch(client, chunk, "RFC822.SIZE")
        sizes = {uid: size for uid, a in answers.items() if (size := _size(a)) is not None}
        for batch in _by_size(chunk, sizes, _BATCH_BYTES):
            self.process(client, batch, sizes, errors, result)

    def process(
        self,
        client: IMAPClient,
        batch: list[int],
        sizes: dict[int, int],
        errors: dict[int, str],
        result: CycleResult,
    ) -> None:
        """Fetch, commit with the position, then (only then) apply the after-action."""
        limit = self.settings.max_message_bytes
        oversize = [uid for uid in batch if sizes.get(uid, 0) > limit]
        for uid in oversize:
            self.report_oversize(uid, sizes[uid])
        wanted = [uid for uid in batch if uid in sizes and uid not in oversize]
        bodies, body_errors = self.fetch(client, wanted, "BODY.PEEK[]")
        fetched = [uid for uid in wanted if _body(bodies, uid) is not None]
        unread = [uid for uid in batch if uid not in fetched and uid not in oversize]
        self.owe(client, unread, {**errors, **body_errors}, result)
        mails = [self.incoming(_body(bodies, uid) or b"") for uid in fetched]
        resolved = [uid for uid in [*fetched, *oversize] if uid in self.owed]
        position = ImapPosition(
            self.settings.name, self.settings.folder, self.uidvalidity,
            max(self.last_uid, *batch), tuple(resolved), tuple(fetched),
        )  # fmt: skip
        if mails or resolved or position.last_uid != self.last_uid:
            for accepted in self.accept(mails, (position,)):
                result.accepted += 1
                result.duplicates += accepted.duplicate_of is not None
            self.last_uid = position.last_uid
            self.after_pending = bool(fetched)  # this commit replaced the previous mark
        self.owed.resolved(resolved)
        self.suspects.difference_update(batch)
        result.oversize += len(oversize)
        self.finish_after(client, fetched)

    def fetch(
        self, client: IMAPClient, uids: list[int], item: str
    ) -> tuple[dict[int, Any], dict[int, str]]:
        """The server's answer per UID, and why each UID that failed on its own failed.

        A FETCH of several UIDs that fails is retried one UID at a time, so one bad message
        spoils nothing else; if it also cost the connection, the UIDs become suspects for the
        next session. A failing single UID that cost the connection is owed before re-raising.
        """
        if not uids:
            return {}, {}
        try:
            return client.fetch(uids, [item]), {}
        except (IMAPClient.Error, OSError) as exc:
            reason = describe(exc, self.settings)
            if len(uids) == 1:
                if connection_lost(exc):
                    self.owed.failed(uids[0], reason)
                    self.suspects.discard(uids[0])
                    raise
                return {}, {uids[0]: reason}
            if connection_lost(exc):
                self.suspects.update(uids)
                raise
        answers: dict[int, Any] = {}
        errors: dict[int, str] = {}
        for uid in uids:
            one, why = self.fetch(client, [uid], item)
            answers.update(one)
            errors.update(why)
        return answers, errors

    def owe(
        self, client: IMAPClient, uids: list[int], errors: dict[int, str], result: CycleResult
    ) -> None:
        """UIDs the server gave no answer for: gone (reported), or owed and retried later."""
        silent = [uid for uid in uids if uid not in errors]
        present = self.existing(client, silent)
        for uid in uids:
            if uid in errors or uid in present:
                self.owed.failed(uid, errors.get(uid, "the server's FETCH answer left it out"))
                result.failed += 1
            else:
                self.owed.vanished(uid)
                result.vanished += 1

    def existing(self, client: IMAPClient, uids: list[int]) -> set[int]:
        """Which of `uids` the folder still has (all of them, if the server will not say)."""
        if not uids:
            return set()
        try:
            return set(client.search(["UID", ",".join(map(str, uids))]))
        except IMAPClient.Error as exc:
            if connection_lost(exc):
                raise
            return set(uids)

    def finish_after(
        self, client: IMAPClient, uids: list[int], *, unfinished: bool = False
    ) -> None:
        """Apply the after-action. A refusal (NO) is logged and recorded once, never retried
        forever: the mail itself is safe. The unfinished mark is cleared here for what a lost
        connection left (`unfinished`); a batch's own mark is replaced by the next batch's
        commit and cleared at the end of the cycle (one write per cycle, not per batch)."""
        if not uids:
            return
        s = self.settings
        if unfinished:
            log.info(
                "imap %s: applying after = %r to %d message(s) accepted before the connection"
                " was lost", s.name, s.after, len(uids),
            )  # fmt: skip
        assert self.after is not None
        try:
            self.after.apply(client, uids)
        except IMAPClient.Error as exc:
            if connection_lost(exc):
                raise
            detail = f"imap {s.name}: after = {s.after!r} refused for UIDs {uids}: {exc}"
            log.error("%s; the messages are accepted and stay in %r", detail, s.folder)
            self.store.log_event("imap_after_failed", service=s.service, detail=detail)
        if unfinished:
            self.store.imap_after_done(s.name, s.folder)

    def incoming(self, raw: bytes) -> IncomingMail:
        s = self.settings
        return intake.incoming(
            raw, source=f"imap:{s.name}", services=(s.service,), peer=f"{s.host}:{s.port}"
        )

    def report_oversize(self, uid: int, size: int) -> None:
        """Left in place and reported once: the position moves past it, so it is not refetched."""
        s = self.settings
        detail = (
            f"imap {s.name}: message UID {uid} in {s.folder!r} is {size} bytes, over"
            f" max_message_bytes ({s.max_message_bytes}); left in the mailbox, not processed"
        )
        log.warning("%s", detail)
        self.store.log_event("imap_oversize", service=s.service, detail=detail)


def _body(answers: dict[int, Any], uid: int) -> bytes | None:
    body = answers.get(uid, {}).get(b"BODY[]")
    return body if isinstance(body, bytes) else None


def _size(answer: dict[bytes, Any]) -> int | None:
    """RFC822.SIZE as a number; None (the message is owed, not skipped) if it is not one."""
    try:
        return int(answer[b"RFC822.SIZE"])
    except (KeyError, TypeError, ValueError):
        return None


def _chunks(uids: list[int], size: int) -> Iterator[list[int]]:
    # UID lists stay short: some servers limit command lines to 8 KB.
    for start in range(0, len(uids), size):
        yield uids[start : start + size]


def _by_size(uids: list[int], sizes: dict[int, int], max_bytes: int) -> Iterator[list[int]]:
    """Split so one batch of bodies in memory stays under `max_bytes` (oversized ones count 0)."""
    batch: list[int] = []
    total = 0
    for uid in uids:
        size = sizes.get(uid, 0)
        if batch and total + size > max_bytes:
            yield batch
            batch, total = [], 0
        batch.append(uid)
        total += size
    if batch:
        yield batch


def run_once(settings: ImapSettings, store: Store) -> CycleResult:
    """One connect / fetch / disconnect cycle (``gateway imap-once`` for cron)."""
    client = connect(settings)
    try:
        sync = FolderSync(settings, store, store.accept)
        sync.open(client)
        return sync.run(client)
    finally:
        close(client)
