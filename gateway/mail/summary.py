"""A mail's Subject and From from its first bytes, for listings of many messages.

Listings read only the head of each stored mail (`ReportStore.list_jobs`) and need two headers
of it: finding just those two and decoding them with the parser's own `clean_header`
(encoded words, 8-bit guesses, NUL and line breaks removed) shows them as the rules see
them, at a fraction of a full parse (`gateway messages --all` on a large spool).
"""

from __future__ import annotations

import re

from gateway.mail.headers import Defects, clean_header

# a header line and its continuation lines (RFC 5322 folding), name captured
_FIELD = re.compile(r"^(subject|from)[ \t]*:(.*(?:\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def subject_and_from(head: bytes) -> tuple[str, str]:
    """The decoded Subject and From header of a mail whose first bytes are `head`; '' for
    what is missing (a header cut off by the end of `head` comes out shortened)."""
    lines = head.replace(b"\r\n", b"\n").replace(b"\r", b"\n")  # CR-only mail exists too
    end = lines.find(b"\n\n")
    text = (lines[:end] if end >= 0 else lines).decode("ascii", "surrogateescape")
    found: dict[str, str] = {}
    for match in _FIELD.finditer(text):
        found.setdefault(match.group(1).lower(), match.group(2))
        if len(found) == 2:
            break
    defects = Defects()  # what went wrong decoding is the rules' business, not a listing's
    subject, sender = (clean_header(found.get(n, ""), defects, n) for n in ("subject", "from"))
    return subject, sender
