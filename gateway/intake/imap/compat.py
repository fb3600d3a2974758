"""The only module that reads imapclient's internals, checked against its version.

    private member                 used for                       why no public way exists
    IMAPClient._imap               new-mail announcements         imapclient returns untagged
      .untagged_responses          (`* n EXISTS`) that arrived    responses only from NOOP,
      ["EXISTS"]                   inside another command's       IDLE and SELECT; for every
                                   answer (SEARCH, FETCH, STORE)  other command they are left
                                                                  in imaplib's stash

Why it matters: a server reports new mail once. Dovecot syncs a mailbox at the end of a
command, so a message that lands while our SEARCH runs is missing from its result and announced
in its tail; the IDLE that follows never mentions it again, and the message would wait for the
next keepalive cycle. `announced_new_mail` lets the fetch cycle search again instead.

`check_imapclient_version` runs at import; tests/test_imap.py fails if a release changes the
member (a real Dovecot announces mail during a command and the stash must show it).
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


check_imapclient_version(version("imapclient"))
