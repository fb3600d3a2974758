"""A mail's Subject and From from its first bytes, for listings of many messages.

Listings read only the head of each stored mail (`ReportStore.list_jobs`); parsing just the
header block keeps `gateway messages --all` fast on a large spool while decoding exactly as
the rules see it (`parse_message`: encoded words, bad charsets, never raising).
"""

from __future__ import annotations

import re

from gateway.mail.parse import parse_message

_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")


def subject_and_from(head: bytes) -> tuple[str, str]:
    """The decoded Subject and From header of a mail whose first bytes are `head`; '' for
    what is missing (a header cut off by the end of `head` comes out shortened)."""
    end = _END_OF_HEADERS.search(head)
    mail = parse_message(head[: end.end()] if end else head)
    return mail.subject, mail.from_
