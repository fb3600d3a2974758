"""Duplicate detection at acceptance: Message-ID plus a hash of the body, without parsing MIME."""

from __future__ import annotations

import hashlib
import re

from gateway.mail.headers import msg_ids
from gateway.mail.parse import as_bytes

_FINGERPRINT_HEAD_BYTES = 256 * 1024  # header bytes scanned
_FP_MSGID = re.compile(rb"^message-id[ \t]*:(.*)$", re.IGNORECASE | re.MULTILINE)
_FP_FOLD = re.compile(rb"\n[ \t]+")


def fingerprint(raw: bytes | bytearray, start: int = 0) -> tuple[str, str]:
    """(Message-ID or '', sha256 of the body) for duplicate detection at acceptance time.

    `start`: where the message begins in `raw` (after a trace header the listener put first).

    No MIME parsing: split at the first blank line, find Message-ID with a regex over the
    unfolded header bytes. The body's line endings are normalised to LF and trailing blank
    lines ignored, so the same message relayed over SMTP (CRLF) and fetched over IMAP, or
    with a trailing newline added by an MTA, still counts as the same message.
    """
    try:
        data = raw if isinstance(raw, (bytes, bytearray)) else as_bytes(raw)
        body_start = _body_start(data, start)
        return _fingerprint_id(bytes(data[start:body_start])), _body_hash(data, body_start)
    except Exception:
        return "", hashlib.sha256(b"").hexdigest()


_HASH_CHUNK = 1 << 20


def _body_start(data: bytes | bytearray, start: int = 0) -> int:
    """Offset of the body: after the earliest blank line of any line-ending style.

    Mail is CRLF almost always: the other styles are only looked for before the first CRLFCRLF,
    so a big message is scanned once, not three times, on the listener's hot path."""
    best, width = data.find(b"\r\n\r\n", start), 4
    end = best if best >= 0 else len(data)
    for sep in (b"\n\n", b"\r\r"):
        i = data.find(sep, start, end + 1)  # a match may start just before `end`
        if i >= 0 and (best < 0 or i < best):
            best, width, end = i, 2, i
    return len(data) if best < 0 else best + width


def _body_hash(data: bytes | bytearray, start: int) -> str:
    """sha256 of the body with line endings normalised to LF and trailing newlines dropped,
    computed a chunk at a time: a 10 MB mail costs one chunk of memory, not three copies."""
    end = len(data)
    while end > start and data[end - 1] in (10, 13):
        end -= 1
    digest = hashlib.sha256()
    view = memoryview(data)
    carry = b""  # a CR at a chunk's end may be the first half of a CRLF
    for offset in range(start, end, _HASH_CHUNK):
        chunk = carry + bytes(view[offset : min(offset + _HASH_CHUNK, end)])
        carry = b"\r" if chunk.endswith(b"\r") else b""
        if carry:
            chunk = chunk[:-1]
        digest.update(chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n"))
    if carry:
        digest.update(b"\n")
    return digest.hexdigest()


def _fingerprint_id(head: bytes) -> str:
    """Message-ID from raw header bytes, without angle brackets."""
    head = head[:_FINGERPRINT_HEAD_BYTES].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    found = _FP_MSGID.search(_FP_FOLD.sub(b" ", head))
    if not found:
        return ""
    value = found.group(1).decode("utf-8", "replace").strip()
    ids = msg_ids(value)
    return ids[0][:998] if ids else ""
