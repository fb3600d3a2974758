"""`allowed_senders` at decision time, for mail from every intake.

SMTP already refuses a disallowed envelope sender at RCPT (550 5.7.1). What it cannot see there
is the header From, and IMAP and `gateway ingest` have no SMTP dialogue at all, so the processor
asks `sender_refusal` before the rules run. A mail that fails is kept and visible with the
outcome `sender_not_allowed` and a reason naming the address and the check; it is not acted on.

Per service, `allowed_senders_check` says what must match:

* `envelope` (the default): the envelope sender. That is MAIL FROM for SMTP (and
  `gateway ingest --sender`); for IMAP, and ingest without `--sender`, it is the top
  `Return-Path:` header, the one the mailbox's receiving server wrote;
* `header`: the one address of the `From:` header;
* `both`: each of them.

Addresses are parsed strictly (`gateway.mail.addresses`): anything that is not exactly one plain
address, such as `"x@evil.example"@trusted.example` or two From addresses, is refused.
"""

from __future__ import annotations

from gateway.config import ServiceSettings
from gateway.mail.addresses import (
    envelope_address,
    header_address,
    header_values,
    sender_matches,
)

SHOWN_CHARS = 200  # of an unparsable header value, in the reason


def sender_refusal(
    settings: ServiceSettings, raw: bytes | bytearray, mail_from: str | None
) -> str | None:
    """Why this mail's sender is not allowed to reach the service, or None if it is.

    `mail_from` is the envelope sender as the intake recorded it ('' for the null sender of a
    bounce), None when the intake had none (IMAP): then the Return-Path header stands for it.
    """
    patterns = settings.allowed_senders
    if not patterns:
        return None
    check = settings.allowed_senders_check
    headers = header_values(raw, ("from", "return-path"))
    problem = None
    if check in ("envelope", "both"):
        problem = _envelope_problem(headers["return-path"], mail_from, patterns)
    if problem is None and check in ("header", "both"):
        problem = _header_problem(headers["from"], patterns)
    if problem is None:
        return None
    return f'sender not allowed (allowed_senders_check = "{check}"): {problem}'


def _envelope_problem(
    return_paths: list[str], mail_from: str | None, patterns: tuple[str, ...]
) -> str | None:
    if mail_from is not None:
        path, origin = mail_from, "MAIL FROM"
    else:
        paths = return_paths
        if not paths:
            return "no Return-Path header, so the envelope sender is unknown"
        path, origin = paths[0], "Return-Path"
    address = envelope_address(path)
    if address is None:
        return f"envelope sender {_shown(path)} ({origin}) is not one plain address"
    if not sender_matches(address, patterns):
        return f"envelope sender <{address}> ({origin}) matches no allowed_senders pattern"
    return None


def _header_problem(values: list[str], patterns: tuple[str, ...]) -> str | None:
    if not values:
        return "no From header"
    address = header_address(values)
    if address is None:
        return f"header From {_shown(', '.join(values))} is not one plain address"
    if not sender_matches(address, patterns):
        return f"header From <{address}> matches no allowed_senders pattern"
    return None


def _shown(value: str) -> str:
    """A sender's own text, quoted with control characters escaped, and cut short."""
    cut = value[:SHOWN_CHARS] + ("..." if len(value) > SHOWN_CHARS else "")
    return repr(cut)
