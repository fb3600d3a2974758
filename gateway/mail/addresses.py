"""Sender addresses, parsed strictly enough to decide "is this sender allowed?".

`allowed_senders` patterns are matched against one canonical address: the addr-spec without
angle brackets, source route or display name, lower-cased. Anything that is not exactly one
plain address is refused rather than guessed at: a quoted local part that hides another address
(`"x@evil.example"@trusted.example`), several From addresses, a group, or an empty From.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.parser import BytesHeaderParser
from email.policy import compat32, default
from fnmatch import fnmatchcase

from gateway.mail.headers import MAX_HEADER_CHARS, from_surrogates, unfold

# Header fields are looked for in this much of a message: far more than any real header block.
MAX_HEADER_BLOCK = 256 * 1024
# A From longer than one SMTP line (RFC 5321 §4.5.3.1.6) that is not in a plain shape is refused.
MAX_FROM_CHARS = 998

# RFC 5321 dot-string local part and a domain (or address literal); no quoting, no comments.
# Every repetition is unambiguous (labels are separated by a dot that is not optional), so a
# failing match is linear: `(label\.?)+` took seconds for `x@` + 22 letters + `-` and doubled
# with every letter more, on the SMTP event loop.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[^\]\s\\]+\])"
_ADDR_SPEC = re.compile(rf"({_LOCAL})@({_DOMAIN})")
_QUOTED_LOCAL = re.compile(r'"((?:[^"\\\r\n]|\\.)*)"@(.+)')
_SOURCE_ROUTE = re.compile(r"^@[^:]*:")  # <@relay1,@relay2:user@domain> (RFC 5321 §C)
# The common From shapes, `a@b` and `Name <a@b>` with a plain or quoted display name, that the
# email package's full parser (150 us a header) would read the same way.
# (A display name's characters include the blanks around it: no two repetitions overlap.)
_PHRASE = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\- \t]*"
_QUOTED_PHRASE = r'[ \t]*"[^"\\\r\n]*"[ \t]*'
_PLAIN_FROM = re.compile(
    rf"(?:{_PHRASE}|{_QUOTED_PHRASE})<({_LOCAL}@{_DOMAIN})>[ \t]*|[ \t]*({_LOCAL}@{_DOMAIN})[ \t]*"
)
_HEADER_END = re.compile(rb"\r?\n\r?\n")


def envelope_address(path: str) -> str | None:
    """The canonical address of an SMTP reverse-path (`MAIL FROM`) or a Return-Path header.

    '' for the null sender `<>`; None when the path is not one plain address.
    """
    text = path.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if not text:
        return ""
    return canonical(_SOURCE_ROUTE.sub("", text))


def header_address(values: Iterable[str]) -> str | None:
    """The canonical address of a From header; None unless it holds exactly one address."""
    values = [v for v in values if v is not None]
    if len(values) != 1:
        return None
    plain = _PLAIN_FROM.fullmatch(values[0])
    if plain is not None:
        return canonical(plain.group(1) or plain.group(2))
    if len(values[0]) > MAX_FROM_CHARS:  # the full parser is slow on long odd values
        return None
    try:
        header = default.header_factory("From", values[0])
        groups = header.groups
    except Exception:  # the email package raises odd errors on odd input
        return None
    if header.defects:  # e.g. `x <a@b> <c@d>` reads as a@b, `<a@b` as a@b: not for a policy
        return None
    if len(groups) != 1 or groups[0].display_name is not None or len(header.addresses) != 1:
        return None
    address = header.addresses[0]
    if not address.username or not address.domain:
        return None
    return canonical(address.addr_spec)


def canonical(address: str) -> str | None:
    """`Jane.Doe@Example.COM` -> `jane.doe@example.com`; a quoted local part is accepted only
    when it needs no quotes (`"jane"@x`), never when it hides an `@` or other specials."""
    text = address.strip()
    quoted = _QUOTED_LOCAL.fullmatch(text)
    if quoted:
        local = re.sub(r"\\(.)", r"\1", quoted.group(1))
        text = f"{local}@{quoted.group(2)}"
    match = _ADDR_SPEC.fullmatch(text)
    if match is None:
        return None
    return f"{match.group(1)}@{match.group(2).rstrip('.')}".lower()


def sender_matches(address: str | None, patterns: Iterable[str]) -> bool:
    """Whether a canonical address matches one of the operator's `allowed_senders` patterns
    (fnmatch, case-insensitive). None (unparsable) and '' (null sender) never match."""
    if not address:
        return False
    return any(fnmatchcase(address, p.lower()) for p in patterns)


def header_values(raw: bytes | bytearray, names: Iterable[str]) -> dict[str, list[str]]:
    """The undecoded values of the header fields `names` (lower-case), unfolded, top first.

    Read from the raw bytes rather than from the decoded `ParsedMail` headers: decoding an
    encoded-word display name (`=?utf-8?q?Doe=2C_Jane?=`) can turn one address into what reads
    as two, or make a display name read as an address. Only the header block is parsed.
    """
    wanted: dict[str, list[str]] = {name: [] for name in names}
    end = _HEADER_END.search(raw, 0, MAX_HEADER_BLOCK)
    head = bytes(raw[: end.end() if end else MAX_HEADER_BLOCK])
    try:
        items = BytesHeaderParser(policy=compat32).parsebytes(head).raw_items()
    except Exception:  # the stdlib parser on hostile input: no values rather than a crash
        return wanted
    for key, value in items:
        found = wanted.get(key.strip().lower())
        if found is not None:
            found.append(from_surrogates(unfold(str(value)[:MAX_HEADER_CHARS])).strip())
    return wanted
