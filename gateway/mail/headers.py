"""Header and charset decoding for gateway.message: lenient, bounded, never raising.

Charsets (iso-8859-1/us-ascii labels read as windows-1252, undeclared 8-bit guessed),
RFC 2047 encoded-words, address lists, message ids, dates and RFC 2045/2231 MIME parameters.
Every function notes what it had to repair in a `Defects` instead of raising.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from datetime import UTC, datetime
from email.utils import getaddresses, parsedate_to_datetime
from functools import lru_cache

MAX_HEADER_CHARS = 16_384  # characters of one header value considered
MAX_PARAMS = 64  # MIME parameters considered per header
MAX_ADDRESSES = 1_000  # addresses kept per To/Cc
MAX_DEFECTS = 50  # notes kept in `defects`

_WIN1252_LABELS = frozenset(
    {"iso-8859-1", "iso8859-1", "iso_8859-1", "latin-1", "latin1", "l1", "cp819", "ibm819"}
    | {"iso-ir-100", "csisolatin1", "us-ascii", "ascii", "us", "ansi_x3.4-1968", "iso646-us"}
    | {"cp367", "csascii", "windows-1252", "cp1252", "x-cp1252"}
)
# Codecs that are not plain text encodings, or are slow/unsafe on hostile input.
# Compared with codecs.lookup(...).name, which spells them with hyphens.
_REFUSED_CODECS = frozenset(
    {"punycode", "idna", "unicode-escape", "raw-unicode-escape", "undefined", "mbcs", "oem"}
)
_FOLD = re.compile(r"(?:\r\n|\r|\n)[ \t]*")
_ENCODED_WORD = re.compile(r"=\?([^?\s]{1,75})\?([bBqQ])\?([^?\s]*)\?=")
_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")
_MSGID = re.compile(r"<([^<>]*)>")
_ADDRESS_FALLBACK = re.compile(r"[^\s<>@\"',;:()\[\]]+@[^\s<>@\"',;:()\[\]]+")
# One plain 'addr' or 'Display Name <addr>' with nothing getaddresses() would interpret
# (quotes, comments, groups, routes, escapes): parsed here, about 10x faster.
_SIMPLE_ADDRESS = re.compile(
    r"[ \t]*(?:([^\s<>()\[\]\\,;:@\"](?:[^<>()\[\]\\,;:@\"]*[^\s<>()\[\]\\,;:@\"])?)?[ \t]*"
    r"<([^\s<>()\[\]\\,;:@\"]+@[^\s<>()\[\]\\,;:@\"]+)>"
    r"|([^\s<>()\[\]\\,;:@\"]+@[^\s<>()\[\]\\,;:@\"]+))[ \t]*"
)
_PARAM = re.compile(r';\s*([^\s=;"]+)\s*=\s*("(?:[^"\\]|\\.)*"?|[^;]*)', re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_CONTINUATION = re.compile(r"^([^*]+)\*(\d{1,3})(\*?)$")
_LWS = re.compile(r"[ \t]+")


class Defects:
    """Short, de-duplicated, capped notes about what was repaired or cut."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._seen: set[str] = set()

    def add(self, note: str) -> None:
        """Record a note once; past MAX_DEFECTS only a final marker is kept."""
        if note in self._seen:
            return
        self._seen.add(note)
        if len(self.items) < MAX_DEFECTS:
            self.items.append(note)
        elif len(self.items) == MAX_DEFECTS:
            self.items.append("more defects omitted")


# --- charsets -------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def codec_for(label: str) -> str | None:
    """Resolve a declared charset to a Python codec name, or None if unusable."""
    name = label.strip().strip("\"'").lower()
    if name in _WIN1252_LABELS:
        return "cp1252"  # iso-8859-1/us-ascii labels are routinely windows-1252 in practice
    if not name or len(name) > 40 or "\x00" in name:
        return None
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if info.name in _REFUSED_CODECS or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


def decode_undeclared(data: bytes) -> str:
    """8-bit bytes without a charset: UTF-8 if it is valid, else windows-1252."""
    if data.isascii():
        return data.decode("ascii")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def decode_bytes(data: bytes, charset: str | None, defects: Defects, what: str) -> str:
    """Decode with the declared charset, falling back sensibly; never raises."""
    if not charset:
        text = decode_undeclared(data)
    else:
        codec = codec_for(charset)
        if codec is None:
            defects.add(f"{what}: unknown charset {charset[:40]!r}, guessed")
            text = decode_undeclared(data)
        else:
            try:
                text = data.decode(codec, errors="replace")
            except Exception:  # exotic codecs can raise despite errors="replace"
                defects.add(f"{what}: charset {charset[:40]!r} failed, guessed")
                text = decode_undeclared(data)
    if "\ufffd" in text:
        defects.add(f"{what}: undecodable bytes replaced")
    return text


def from_surrogates(value: str) -> str:
    """Undo the parser's surrogateescape of raw 8-bit header bytes.

    Safe on text that is already decoded (a display name taken from a decoded value): real
    characters are re-encoded as UTF-8, so they come back unchanged.
    """
    try:
        data = value.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        data = value.encode("utf-8", "surrogateescape")
    return decode_undeclared(data)


# --- headers --------------------------------------------------------------------------------


def unfold(value: str) -> str:
    """Header unfolding: a line break plus its leading whitespace becomes one space."""
    if "\n" in value or "\r" in value:
        value = _FOLD.sub(" ", value)
    return value


def _decode_word(encoding: str, text: str, defects: Defects) -> bytes | None:
    """Decode one RFC 2047 encoded-word to bytes, or None when it is beyond repair."""
    raw = text.encode("ascii", "replace")
    if encoding in "qQ":
        return binascii.a2b_qp(raw, header=True)
    cleaned = _B64_JUNK.sub(b"", raw.rstrip(b"="))
    if len(cleaned) % 4 == 1:
        cleaned = cleaned[:-1]
    if not cleaned and raw.strip(b"="):
        defects.add("header: invalid base64 encoded-word kept as is")
        return None
    if len(cleaned) != len(raw.rstrip(b"=")):
        defects.add("header: invalid characters in base64 encoded-word dropped")
    try:
        return base64.b64decode(cleaned + b"=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        defects.add("header: invalid base64 encoded-word kept as is")
        return None


def decode_words(value: str, defects: Defects) -> str:
    """Lenient RFC 2047 decoding.

    Adjacent words in the same charset are joined as bytes before decoding (mailers split
    multi-byte characters across words); whitespace between encoded words is dropped; a word
    that cannot be decoded is kept literally.
    """
    out: list[str] = []
    pending = bytearray()
    pending_cs = ""
    pos = 0
    after_word = False
    for m in _ENCODED_WORD.finditer(value):
        gap = value[pos : m.start()]
        charset = m.group(1).split("*", 1)[0]
        data = _decode_word(m.group(2), m.group(3), defects)
        if data is None:
            out.append(_flush(pending, pending_cs, defects))
            out.append(gap + m.group(0))
            pending, after_word = bytearray(), False
        else:
            if not (after_word and (not gap or gap.isspace())):
                out.append(_flush(pending, pending_cs, defects))
                out.append(gap)
                pending = bytearray()
            elif charset.lower() != pending_cs.lower():
                out.append(_flush(pending, pending_cs, defects))
                pending = bytearray()
            pending += data
            pending_cs, after_word = charset, True
        pos = m.end()
    out.append(_flush(pending, pending_cs, defects))
    out.append(value[pos:])
    return "".join(out)


def _flush(pending: bytearray, charset: str, defects: Defects) -> str:
    """Decode the bytes collected from a run of encoded-words."""
    if not pending:
        return ""
    return decode_bytes(bytes(pending), charset, defects, "header")


def clean_header(value: str, defects: Defects, name: str = "header") -> str:
    """Raw header value -> one line of text; 8-bit bytes guessed, encoded-words decoded."""
    if len(value) > MAX_HEADER_CHARS:
        defects.add(f"{name}: value truncated at {MAX_HEADER_CHARS} characters")
        value = value[:MAX_HEADER_CHARS]
    value = unfold(value)
    if not value.isascii():
        value = from_surrogates(value)
    if "=?" in value:
        value = decode_words(value, defects)
    if "\x00" in value:
        defects.add(f"{name}: NUL characters replaced")
        value = value.replace("\x00", "\ufffd")
    if "\r" in value or "\n" in value:  # encoded-words can smuggle line breaks
        value = _FOLD.sub(" ", value)
    return value.strip()


def addresses(values: list[str], defects: Defects) -> list[tuple[str, str]]:
    """(display name, address) pairs; falls back to a plain regex when the parser gives up."""
    if not values:
        return []
    pairs = _simple_addresses(values)
    if pairs is not None:
        return pairs[:MAX_ADDRESSES]
    try:
        pairs = getaddresses(values)
    except Exception:  # nested comments recurse without bound in the stdlib parser
        defects.add("addresses: unparseable, extracted by pattern")
        pairs = [("", a) for v in values for a in _ADDRESS_FALLBACK.findall(v)]
    if not any(addr.strip() for _name, addr in pairs):  # unbalanced comments swallow all
        found = [("", a) for v in values for a in _ADDRESS_FALLBACK.findall(v)]
        if found:
            defects.add("addresses: unparseable, extracted by pattern")
            pairs = found
    out = []
    for name, addr in pairs[:MAX_ADDRESSES]:
        addr = addr.strip()
        if "<" in addr or ">" in addr:  # an unbalanced quote swallowed the rest of the list
            out.extend(("", found) for found in _ADDRESS_FALLBACK.findall(addr))
        elif addr:
            out.append((name, addr))
    return out[:MAX_ADDRESSES]


def _simple_addresses(values: list[str]) -> list[tuple[str, str]] | None:
    """The common case without the stdlib parser; None when any piece is not plain."""
    pairs = []
    for value in values:
        for piece in value.split(","):
            if not piece or piece.isspace():
                continue
            m = _SIMPLE_ADDRESS.fullmatch(piece)
            if m is None:
                return None
            name, addr = m.group(1), m.group(2) or m.group(3)
            if name and ("  " in name or "\t" in name):
                name = _LWS.sub(" ", name)  # as the stdlib: only SP/HTAB separate words
            pairs.append((name or "", addr))
    return pairs


def bare_addresses(values: list[str], defects: Defects) -> tuple[str, ...]:
    """Lower-cased bare addresses, duplicates removed, order kept."""
    seen: dict[str, None] = {}
    for _name, addr in addresses(values, defects):
        seen.setdefault(addr.lower(), None)
    return tuple(seen)


def sender(values: list[str], decoded: str, defects: Defects) -> tuple[str, str]:
    """(display 'Name <addr>', bare lower-cased addr) of the first From."""
    pairs = addresses(values[:1], defects)
    if not pairs:
        found = _ADDRESS_FALLBACK.search(decoded)
        return decoded, found.group(0).lower() if found else ""
    name, addr = pairs[0]
    if "@" not in addr:  # 'root (Cron Daemon)', or not an address at all: show it all
        return decoded, addr.lower()
    name = clean_header(name, defects, "from") if name else ""
    return (f"{name} <{addr}>" if name else addr), addr.lower()


def msg_ids(value: str) -> list[str]:
    """Message ids in a header, without angle brackets; bare ids split on whitespace."""
    bracketed = _MSGID.findall(value)
    if bracketed:  # 'Message-ID: <>' is no id at all, not the id '<>'
        return [i.strip() for i in bracketed if i.strip()]
    return value.split()


def parse_date(value: str) -> datetime | None:
    """Date header -> aware datetime (naive is taken as UTC), None when unparseable."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except Exception:
        return None
    if parsed is None:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- MIME parameters --------------------------------------------------------------------


def params(value: str, defects: Defects) -> dict[str, str]:
    """MIME parameters of a header value (lower-case names), RFC 2231 included.

    Continuations (name*0, name*1*) are joined in index order; name*=charset'lang'value is
    percent-decoded; anything malformed is kept as literal text rather than raising.
    """
    plain: dict[str, str] = {}
    pieces: dict[str, dict[int, tuple[bool, str]]] = {}
    for count, m in enumerate(_PARAM.finditer(value)):
        if count >= MAX_PARAMS:
            defects.add(f"mime: only the first {MAX_PARAMS} parameters considered")
            break
        name, val = m.group(1).lower(), _unquote(m.group(2))
        if name.endswith("*") and "*" not in name[:-1]:
            pieces.setdefault(name[:-1], {}).setdefault(0, (True, val))
            continue
        cont = _CONTINUATION.match(name)
        if cont:
            pieces.setdefault(cont.group(1), {}).setdefault(
                int(cont.group(2)), (bool(cont.group(3)), val)
            )
        else:
            plain.setdefault(name, val)
    for name, segments in pieces.items():
        joined = _join_rfc2231(segments, defects)
        if joined is not None:
            plain[name] = joined
    return plain


def _unquote(value: str) -> str:
    """Strip a quoted-string's quotes and backslash escapes."""
    value = value.strip()
    if value.startswith('"'):
        value = value[1:-1] if value.endswith('"') and len(value) > 1 else value[1:]
        if "\\" in value:
            value = _QUOTED_PAIR.sub(r"\1", value)
    return value


def _join_rfc2231(segments: dict[int, tuple[bool, str]], defects: Defects) -> str | None:
    """Join RFC 2231 segments; gaps in the indexes end the value (with a note)."""
    charset = ""
    data = bytearray()
    for index in range(len(segments)):
        if index not in segments:
            defects.add("mime: RFC 2231 continuation indexes have gaps")
            break
        extended, text = segments[index]
        if extended and index == 0 and text.count("'") >= 2:
            charset, _lang, text = text.split("'", 2)
        if extended:
            data += _percent_decode(text)
        else:
            data += text.encode("utf-8", "surrogateescape")
    if not data and not segments.get(0):
        return None
    return decode_bytes(bytes(data), charset or None, defects, "mime parameter")


def _percent_decode(text: str) -> bytes:
    """%XX decoding that keeps malformed escapes literally."""
    raw = text.encode("utf-8", "surrogateescape")
    if b"%" not in raw:
        return raw
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25 and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return bytes(out)


def _is_hex(pair: bytes) -> bool:
    """True for two hex digits."""
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)
