"""IMAP intake: fetch notification mail from a mailbox into the same spool SMTP feeds.

    connection.py  connect (tls | starttls | none), login (password | XOAUTH2), timeouts, close
    sync.py        one folder's fetch cycle: search, sizes, bodies, accept with the position
    failures.py    messages that could not be read: owed, retried with backoff, reported
    after.py       the after-action (seen | delete | move) and its unfinished mark
    poller.py      one account's thread: IDLE or polling, keepalive, reconnects, health
    compat.py      the one reach into imapclient's internals, version-checked

What it promises: a message is marked, moved or deleted only after its bytes are committed, and
the folder's position is saved in that same commit; the position never passes a message that
was not accepted, reported oversize, or recorded as owed; a silent server is noticed within 2.5
keepalive intervals.
"""

from __future__ import annotations

from imapclient import IMAPClient

from gateway.backoff import Backoff
from gateway.intake.imap.connection import (
    ImapAuthError,
    ImapError,
    close,
    connect,
    login,
    oauth2_token,
    timeouts,
)
from gateway.intake.imap.failures import UnreadablePolicy
from gateway.intake.imap.poller import ImapPoller
from gateway.intake.imap.sync import CycleResult, FolderSync, run_once

__all__ = [
    "Backoff",
    "CycleResult",
    "FolderSync",
    "IMAPClient",
    "ImapAuthError",
    "ImapError",
    "ImapPoller",
    "UnreadablePolicy",
    "close",
    "connect",
    "login",
    "oauth2_token",
    "run_once",
    "timeouts",
]
