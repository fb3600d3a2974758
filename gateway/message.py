"""Raw RFC 5322 bytes -> an immutable parsed view that the rules read.

Never raises on bad input: whatever cannot be decoded is replaced and noted in `defects`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Attachment:
    """An attachment is listed (for display and details), never matched."""

    filename: str
    content_type: str
    size: int


@dataclass(frozen=True)
class ParsedMail:
    """What the rules see of one email. All strings are decoded text, never bytes."""

    subject: str = ""
    from_: str = ""  # decoded From header, e.g. 'Desk <support@desk.example>'
    from_addr: str = ""  # bare address of From, lower-cased
    to: tuple[str, ...] = ()  # bare addresses
    cc: tuple[str, ...] = ()
    message_id: str = ""  # without the angle brackets
    in_reply_to: str = ""
    references: tuple[str, ...] = ()
    date: datetime | None = None
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # lower-case names
    text: str = ""  # text/plain body, else the HTML converted to text
    html: str = ""  # the raw HTML body, if any
    attachments: tuple[Attachment, ...] = ()
    is_auto_reply: bool = False
    is_bounce: bool = False
    loop_reason: str = ""  # why is_auto_reply / is_bounce was set
    defects: tuple[str, ...] = ()

    def header(self, name: str) -> str:
        """First value of a header (case-insensitive), or ''."""
        values = self.headers.get(name.lower(), ())
        return values[0] if values else ""

    def field(self, name: str) -> str:
        """The text of a rule field: subject, body, html, from, to, cc or headers.<Name>."""
        if name.startswith("headers."):
            return "\n".join(self.headers.get(name[len("headers.") :].lower(), ()))
        simple = {
            "subject": self.subject,
            "body": self.text,
            "html": self.html,
            "from": self.from_,
            "to": ", ".join(self.to),
            "cc": ", ".join(self.cc),
        }
        return simple[name]


FIELDS = ("subject", "body", "html", "from", "to", "cc")  # plus headers.<Name>


def parse_message(raw: bytes, envelope_from: str | None = None) -> ParsedMail:
    """Parse raw bytes; `envelope_from` '' (the null sender) marks a bounce."""
    raise NotImplementedError
