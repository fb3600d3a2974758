"""The only module that reads imapclient's internals, checked against its version.

    private member                 used for                       why no public way exists
    IMAPClient._imap               new-mail announcements         imapclient returns untagged
      .untagged_responses          (`* n EXISTS`) that arrived    responses only from NOOP,
      ["EXISTS"]                   inside another command's       IDLE and SELECT; for every
                                   answer (SEARCH, FETCH, STORE)  other command they are left
                                                                  in imaplib's stash
    IMAPClient._imap.file          bytes imaplib's buffered       idle_check() polls the socket,
      (io.BufferedReader)          reader took in together with   which no longer has them; no
                                   IDLE's "+ idling"              call reports buffered input

Why it matters: a server reports new mail once. Dovecot syncs a mailbox at the end of a
command, so a message that lands while our SEARCH runs is missing from its result and announced
in its tail (`announced_new_mail` lets the cycle search again); and mail that landed just
before IDLE is announced in the same packet as "+ idling", which imaplib reads whole
(`unread_input` tells the poller to end that IDLE at once). Either way the IDLE that follows
never mentions the message again, and it would wait for the next keepalive cycle.

`check_imapclient_version` runs at import; tests/test_imap.py fails if a release changes
either member (a real Dovecot announces mail in both ways, and each must be seen).
"""

from __future__ import annotations

import re
from importlib.metadata import version

from imapclient import IMAPClient

SUPPORTED_RANGE = ((3, 0, 0), (5, 0, 0))  # read in 3.0.1 and 4.1.0
SUPPORTED_TEXT = "imapclient>=3.0,<5"


class UnsupportedImapclientError(ImportError):
    """The installed imapclient is outside the range whose internals were checked."""


def check_imapclient_version(installed: str) -> None:
    numbers = tuple(int(n) for n in re.findall(r"\d+", installed)[:3])
    low, high = SUPPORTED_RANGE
    if not low <= numbers < high:
        raise UnsupportedImapclientError(
            f"imapclient {installed} is not supported: install {SUPPORTED_TEXT}"
        )


def announced_new_mail(client: IMAPClient) -> bool:
    """True if the server announced new mail since the last call; clears the announcement."""
    stash = client._imap.untagged_responses
    return stash.pop("EXISTS", None) is not None


def unread_input(client: IMAPClient) -> bool:
    """True if imaplib's reader already holds bytes it has not parsed (poll() cannot see them).

    `peek` returns what is buffered; with an empty buffer it tries one read, made non-blocking
    here so the check never waits.
    """
    reader = client._imap.file
    sock = client.socket()
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return bool(reader.peek(1))
    except OSError:  # nothing to read (TLS says so with an error), or the link is gone
        return False
    finally:
        sock.settimeout(timeout)


check_imapclient_version(version("imapclient"))
