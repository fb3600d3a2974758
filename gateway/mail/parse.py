"""Raw RFC 5322 bytes -> an immutable parsed view that the rules read.

Never raises on bad input: whatever cannot be decoded is replaced and noted in `defects`.

Speed is designed around: the stdlib parser runs with `policy.compat32` (no lazy header
objects, about 13x faster than `policy.default`) and everything is decoded here, by hand, with
every step bounded (parts, nesting, headers, header length, parameters, body size).
"""

from __future__ import annotations

import binascii
import email
import email.parser
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from email.policy import Compat32

from gateway.mail.headers import (
    MAX_HEADER_CHARS,
    Defects,
    bare_addresses,
    clean_header,
    decode_bytes,
    decode_words,
    from_surrogates,
    msg_ids,
    params,
    parse_date,
    sender,
    unfold,
)
from gateway.mail.htmltext import html_to_text


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
    is_auto_reply: bool = False  # any automatic mail: an auto-reply or a notification
    is_bounce: bool = False
    loop_reason: str = ""  # why is_auto_reply / is_bounce was set
    # what the loop guard (gateway.mail.loop_guard) tells apart:
    auto_reply_reason: str = ""  # an automatic *reply* (Auto-Submitted: auto-replied, OOO...)
    notification_reason: str = ""  # Auto-Submitted: auto-generated / auto-notified, nothing else
    bounce_reason: str = ""
    gateway_loop: tuple[str, ...] = ()  # X-Gateway-Loop values: mail a gateway sent
    defects: tuple[str, ...] = ()
    auth: Mapping[str, str] = field(default_factory=dict)  # auth.* fields, once checked

    def header(self, name: str) -> str:
        """First value of a header (case-insensitive), or ''."""
        values = self.headers.get(name.lower(), ())
        return values[0] if values else ""

    def field(self, name: str) -> str:
        """The text of a rule field: subject, body, html, from, to, cc or headers.<Name>."""
        if name.startswith("headers."):
            return "\n".join(self.headers.get(name[len("headers.") :].lower(), ()))
        if name.startswith("auth."):  # unchecked mail: no result ('none'), no signing domain
            return self.auth.get(name, "" if name == "auth.dkim_domain" else "none")
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
AUTH_FIELDS = ("auth.dkim", "auth.spf", "auth.dmarc", "auth.dkim_domain")  # sender authenticity

# --- bounds: every loop over attacker-controlled structure is capped -------------------------

MAX_PARTS = 200  # MIME parts walked
MAX_DEPTH = 20  # multipart nesting followed
MAX_HEADERS = 500  # top-level header fields kept
MAX_PARAM_CHARS = 8_192  # characters of Content-Type/-Disposition given to parameter parsing
MAX_REFERENCES = 100  # ids kept from References
MAX_BODY_CHARS = 2_000_000  # characters of text and of html (PagerDuty-size bodies)

_AUTOREPLY_SUBJECT = re.compile(
    r"out of (?:the )?office|automatic reply|auto(?:matic)?[- ]?(?:reply|response|antwort)"
    r"|^\s*auto:|autoreply|abwesenheit|abwesend|r[ée]ponse automatique|absence"
    r"|fuera de la oficina|respuesta autom[áa]tica|risposta automatica|afwezig"
    r"|automatisch antwoord|fr[åa]nvaro|autosvar|自动回复|自動応答|自動返信|不在",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery (?:status|fail|has failed|notification|report|problem)"
    r"|returned mail|failure notice|mail delivery|non-?delivery|could not be delivered"
    r"|unzustellbar|nicht zustellbar|mail system error|rejected",
    re.IGNORECASE,
)
_BOUNCE_SENDERS = frozenset({"mailer-daemon", "postmaster"})
_AUTOREPLY_HEADERS = ("x-autoreply", "x-autorespond", "x-autoreply-from", "x-mail-autoreply")

_B64_ALPHABET_DELETE = bytes(
    b for b in range(256) if not (chr(b).isascii() and (chr(b).isalnum() or chr(b) in "+/"))
)
_KEYWORD = re.compile(r"[\w.-]*")  # the value of Auto-Submitted before any comment/parameter


class _BoundedPolicy(Compat32):
    """compat32, but parameter parsing never sees more than MAX_PARAM_CHARS of a header.

    The parser itself calls get_boundary() on every multipart Content-Type, and the stdlib
    parameter splitter is quadratic: 200 KB of ';' takes 0.4 s, 2 MB takes a minute.
    """

    def header_fetch_parse(self, name: str, value: str) -> str:  # type: ignore[override]
        """Truncate what get()/get_param() see; raw_items() still has the full value."""
        if len(value) > MAX_PARAM_CHARS:
            value = value[:MAX_PARAM_CHARS]
        return super().header_fetch_parse(name, value)


_POLICY = _BoundedPolicy()


def _raw_headers(msg: Message, defects: Defects) -> list[tuple[str, str]]:
    """The (lower-case name, unfolded undecoded value) pairs of a message, capped."""
    out: list[tuple[str, str]] = []
    try:
        items = list(msg.raw_items())
    except Exception:
        return out
    for name, value in items:
        if len(out) >= MAX_HEADERS:
            defects.add(f"headers: only the first {MAX_HEADERS} kept")
            break
        if not isinstance(value, str):
            value = str(value)
        name = name[:200].strip().lower()
        if not name.isascii():
            name = from_surrogates(name)
        out.append((name, value))
    return out


def _decode_headers(raw: list[tuple[str, str]], defects: Defects) -> dict[str, tuple[str, ...]]:
    """All header fields, decoded, grouped by lower-case name in order of appearance."""
    grouped: dict[str, list[str]] = {}
    for name, value in raw:
        grouped.setdefault(name, []).append(clean_header(value, defects, name))
    return {name: tuple(values) for name, values in grouped.items()}


def _raw_values(raw: list[tuple[str, str]], name: str) -> list[str]:
    """Undecoded (but unfolded, 8-bit-guessed) values of one header, for address parsing."""
    out = []
    for key, value in raw:
        if key == name:
            value = unfold(value[:MAX_HEADER_CHARS])
            if not value.isascii():
                value = from_surrogates(value)
            out.append(value.replace("\x00", "\ufffd") if "\x00" in value else value)
    return out


# --- MIME parts -----------------------------------------------------------------------------


def _first_header(part: Message, name: str) -> str:
    """First raw value of a header on a part, unfolded, '' if absent."""
    try:
        for key, value in part.raw_items():
            if key.lower() == name:
                value = unfold(str(value)[:MAX_PARAM_CHARS])
                return value if value.isascii() else from_surrogates(value)
    except Exception:
        return ""
    return ""


# --- MIME parts -----------------------------------------------------------------------------


@dataclass
class _PartInfo:
    """What the walker needs to know about one part."""

    content_type: str
    disposition: str
    filename: str
    charset: str


def _part_info(part: Message, defects: Defects) -> _PartInfo:
    """Content type, disposition, filename and charset of a part, without raising."""
    try:
        ctype = part.get_content_type()
    except Exception:
        defects.add("mime: unreadable Content-Type, treated as text/plain")
        ctype = "text/plain"
    ct_params = params(_first_header(part, "content-type"), defects)
    cd_value = _first_header(part, "content-disposition")
    disposition = cd_value.split(";", 1)[0].strip().lower()
    cd_params = params(cd_value, defects) if cd_value else {}
    filename = cd_params.get("filename") or ct_params.get("name") or ""
    if "=?" in filename:
        filename = decode_words(filename, defects)
    return _PartInfo(ctype, disposition, filename.strip(), ct_params.get("charset", ""))


def _walk(msg: Message, defects: Defects) -> Iterator[Message]:
    """Depth-first leaves, bounded in count and depth; attached messages are leaves."""
    stack: list[tuple[Message, int]] = [(msg, 0)]
    seen = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            defects.add(f"mime: only the first {MAX_PARTS} parts read")
            return
        _note_parser_defects(part, defects)
        children = _children(part)
        if children is None:
            yield part
        elif depth >= MAX_DEPTH:
            defects.add(f"mime: parts nested deeper than {MAX_DEPTH} skipped")
        else:
            stack.extend((child, depth + 1) for child in reversed(children[:MAX_PARTS]))


def _children(part: Message) -> list[Message] | None:
    """Sub-parts to descend into, or None for a leaf.

    multipart/* and inline message/rfc822 are containers; an attached message is listed as
    an attachment, and message/delivery-status header blocks are not bodies.
    """
    try:
        payload = part.get_payload()
        if not isinstance(payload, list):
            return None
        ctype = part.get_content_type()
        if ctype.startswith("multipart/"):
            return payload
        if ctype in ("message/rfc822", "message/global"):
            disposition = _first_header(part, "content-disposition").split(";", 1)[0]
            return None if disposition.strip().lower() == "attachment" else payload
        return []  # delivery-status and friends: nothing to read
    except Exception:
        return None


def _payload_bytes(part: Message, defects: Defects) -> bytes:
    """Transfer-decoded payload; lenient about bad base64/QP."""
    try:
        data = part.get_payload(decode=True)
    except Exception:
        defects.add("mime: undecodable part body kept raw")
        try:
            data = str(part.get_payload()).encode("ascii", "surrogateescape")
        except Exception:
            data = b""
    return data if isinstance(data, bytes) else b""


def _decoded_size(part: Message) -> int:
    """Decoded size of an attachment without decoding base64 (count the alphabet)."""
    try:
        payload = part.get_payload()
        if isinstance(payload, list):
            return sum(len(p.as_bytes()) for p in payload[:MAX_PARTS] if isinstance(p, Message))
        raw = str(payload).encode("ascii", "surrogateescape")
        cte = _first_header(part, "content-transfer-encoding").strip().lower()
        if cte == "base64":
            return len(raw.translate(None, _B64_ALPHABET_DELETE)) * 3 // 4
        if cte == "quoted-printable":
            return len(binascii.a2b_qp(raw))
        return len(raw)
    except Exception:
        return 0


def _text_of(part: Message, info: _PartInfo, defects: Defects, what: str) -> str:
    """The decoded text of a body part, capped at MAX_BODY_CHARS."""
    data = _payload_bytes(part, defects)
    if len(data) > MAX_BODY_CHARS * 4:  # no charset needs more than 4 bytes a character
        data = data[: MAX_BODY_CHARS * 4]
    text = decode_bytes(data, info.charset or None, defects, what)
    if what == "text" and "\r" in text:  # rules work line by line on "\n" (SMTP sends CRLF)
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _cap(text, defects, what)


def _cap(text: str, defects: Defects, what: str) -> str:
    """Cut a body at MAX_BODY_CHARS (a note, not an error) and replace NULs."""
    if len(text) > MAX_BODY_CHARS:
        defects.add(f"{what}: truncated at {MAX_BODY_CHARS} characters")
        text = text[:MAX_BODY_CHARS]
    if "\x00" in text:
        defects.add(f"{what}: NUL characters replaced")
        text = text.replace("\x00", "\ufffd")
    return text


@dataclass
class _Bodies:
    """The chosen bodies and the listed attachments."""

    text: str = ""
    html: str = ""
    has_text: bool = False
    has_html: bool = False
    attachments: list[Attachment] = field(default_factory=list)


def _collect(msg: Message, defects: Defects) -> _Bodies:
    """First inline text/plain, first inline text/html, everything else attached."""
    bodies = _Bodies()
    for part in _walk(msg, defects):
        info = _part_info(part, defects)
        inline = info.disposition != "attachment"
        if inline and info.content_type == "text/plain" and not bodies.has_text:
            bodies.text, bodies.has_text = _text_of(part, info, defects, "text"), True
        elif inline and info.content_type == "text/html" and not bodies.has_html:
            bodies.html, bodies.has_html = _text_of(part, info, defects, "html"), True
        elif info.content_type.startswith("multipart/") and not bodies.has_text:
            # The parser could not split it (boundary missing): keep the words findable.
            defects.add("mime: multipart without readable parts, read as text")
            bodies.text, bodies.has_text = _text_of(part, info, defects, "text"), True
        elif _is_attachment(info):
            size = _decoded_size(part)
            bodies.attachments.append(Attachment(info.filename, info.content_type, size))
    return bodies


def _is_attachment(info: _PartInfo) -> bool:
    """Named or attachment-disposed parts, and non-text leaves such as inline images."""
    if info.disposition == "attachment" or info.filename:
        return True
    return not info.content_type.startswith(("text/", "multipart/"))


def _note_parser_defects(part: Message, defects: Defects) -> None:
    """Carry the stdlib parser's own findings (missing boundaries, bad base64...)."""
    for defect in getattr(part, "defects", ())[:10]:
        defects.add(f"parser: {type(defect).__name__}")


# --- loop guard -----------------------------------------------------------------------------


NOTIFICATION_KEYWORDS = frozenset({"auto-generated", "auto-notified"})  # RFC 3834, RFC 5436


def _auto_submitted(headers: Mapping[str, tuple[str, ...]]) -> tuple[str, str]:
    """(reason, keyword) of the Auto-Submitted fields other than 'no', or ('', '').

    With several fields, a reply keyword wins over a notification one: a mail that says it is
    an automatic reply anywhere is treated as one.
    """
    found: tuple[str, str] = ("", "")
    for submitted in headers.get("auto-submitted", ())[:10]:
        keyword = _KEYWORD.match(submitted.strip()).group(0).lower()  # type: ignore[union-attr]
        if keyword == "no":  # 'no (sent by hand)' is still no
            continue
        if keyword not in NOTIFICATION_KEYWORDS:
            return f"Auto-Submitted: {submitted[:60]}", keyword
        found = found if found[0] else (f"Auto-Submitted: {submitted[:60]}", keyword)
    return found


def _auto_reply_reason(headers: Mapping[str, tuple[str, ...]], subject: str) -> str:
    """Why this looks like an automatic *reply*, or ''.

    Auto-Submitted counts here unless it says auto-generated/auto-notified (a notification,
    judged separately). `Precedence: bulk` and `X-Auto-Response-Suppress` only count together
    with an out-of-office-looking subject: helpdesks and notifiers (Zendesk, Desk.com, Jira,
    cron relays) put both on the very notifications we must act on, to stop *other* robots
    from answering them; and not at all on a mail that declares itself a notification
    (Zendesk's "Out of office: VPN down (#4711)" is a ticket, not a vacation reply). Junk and
    auto_reply precedence and the explicit autoreply headers always count.
    """
    reason, keyword = _auto_submitted(headers)
    if reason and keyword not in NOTIFICATION_KEYWORDS:
        return reason
    first = _first_values(headers)
    for name in _AUTOREPLY_HEADERS:
        if name in headers:
            return f"{name.title()} header present"
    precedence = first.get("precedence", "").strip().lower()
    if precedence in ("junk", "auto_reply", "auto-reply"):
        return f"Precedence: {precedence}"
    if reason:  # a declared notification: the subject guesses below are not for it
        return ""
    ooo_subject = bool(_AUTOREPLY_SUBJECT.search(subject))
    if precedence in ("bulk", "list") and ooo_subject:
        return f"Precedence: {precedence} with an out-of-office subject"
    suppress = first.get("x-auto-response-suppress", "").lower()
    if ("oof" in suppress or "autoreply" in suppress or "all" in suppress) and ooo_subject:
        return "X-Auto-Response-Suppress with an out-of-office subject"
    return ""


def _notification_reason(headers: Mapping[str, tuple[str, ...]]) -> str:
    """'Auto-Submitted: auto-generated' (or auto-notified): a notification, not a reply."""
    reason, keyword = _auto_submitted(headers)
    return reason if keyword in NOTIFICATION_KEYWORDS else ""


def _gateway_stamps(headers: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The X-Gateway-Loop values (gateway.mail.loop_guard.LOOP_HEADER), stripped."""
    return tuple(v.strip() for v in headers.get("x-gateway-loop", ())[:20] if v.strip())


def _bounce_reason(
    envelope_from: str | None, content_type: str, from_addr: str, subject: str, headers: Mapping
) -> str:
    """Why this looks like a bounce (or other delivery report), or ''."""
    if envelope_from is not None and envelope_from.strip() in ("", "<>"):
        return "null envelope sender (bounce)"
    if content_type == "multipart/report":
        return "multipart/report (delivery or disposition report)"
    if "x-failed-recipients" in headers:
        return "X-Failed-Recipients header present"
    local = from_addr.split("@", 1)[0]
    if local in _BOUNCE_SENDERS and _BOUNCE_SUBJECT.search(subject):
        return f"From {local} with a delivery-status subject"
    return ""


def _first_values(headers: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """First value per header name."""
    return {name: values[0] for name, values in headers.items() if values}


# --- entry points ---------------------------------------------------------------------------


def as_bytes(raw: object) -> bytes:
    """Accept bytes-like input (or, leniently, str); anything else is empty."""
    if isinstance(raw, bytes):
        return raw
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    try:
        return bytes(raw)  # type: ignore[call-overload]
    except Exception:
        return b""


def _parse_tree(raw: bytes, defects: Defects) -> Message:
    """The stdlib parse, falling back to headers-only, then to nothing, on failure."""
    try:
        return email.message_from_bytes(raw, policy=_POLICY)
    except Exception as exc:  # RecursionError on absurd nesting, MemoryError...
        defects.add(f"parser failed ({type(exc).__name__}), body read as plain text")
    try:
        return email.parser.BytesParser(policy=_POLICY).parsebytes(raw, headersonly=True)
    except Exception:
        defects.add("headers unparseable")
        return Message(policy=_POLICY)


def _top_content_type(msg: Message) -> str:
    """The top-level content type, text/plain when unreadable."""
    try:
        return msg.get_content_type()
    except Exception:
        return "text/plain"


def parse_message(raw: bytes, envelope_from: str | None = None) -> ParsedMail:
    """Parse raw bytes; `envelope_from` '' (the null sender) marks a bounce."""
    try:
        return _parse(as_bytes(raw), envelope_from)
    except Exception as exc:  # a last line of defence: a bug here must not drop mail
        return ParsedMail(defects=(f"internal parse error: {type(exc).__name__}",))


def _parse(raw: bytes, envelope_from: str | None) -> ParsedMail:
    """The actual work of parse_message."""
    defects = Defects()
    msg = _parse_tree(raw, defects)
    raw_headers = _raw_headers(msg, defects)
    headers = _decode_headers(raw_headers, defects)
    first = _first_values(headers)
    subject = first.get("subject", "")
    from_, from_addr = sender(_raw_values(raw_headers, "from"), first.get("from", ""), defects)
    bodies = _collect(msg, defects)
    text = bodies.text
    if not text.strip() and bodies.html:
        text = _cap(html_to_text(bodies.html), defects, "text")
    content_type = _top_content_type(msg)
    reply = _auto_reply_reason(headers, subject)
    notification = _notification_reason(headers)
    auto = notification or reply  # Auto-Submitted first, as it always was reported
    bounce = _bounce_reason(envelope_from, content_type, from_addr, subject, headers)
    msgid = msg_ids(first.get("message-id", ""))
    in_reply_to = msg_ids(first.get("in-reply-to", ""))
    return ParsedMail(
        subject=subject,
        from_=from_,
        from_addr=from_addr,
        to=bare_addresses(_raw_values(raw_headers, "to"), defects),
        cc=bare_addresses(_raw_values(raw_headers, "cc"), defects),
        message_id=msgid[0] if msgid else "",
        in_reply_to=in_reply_to[0] if in_reply_to else "",
        references=tuple(msg_ids(" ".join(headers.get("references", ())))[:MAX_REFERENCES]),
        date=parse_date(first.get("date", "")),
        headers=headers,
        text=text,
        html=bodies.html,
        attachments=tuple(bodies.attachments),
        is_auto_reply=bool(auto),
        is_bounce=bool(bounce),
        loop_reason="; ".join(r for r in (auto, bounce) if r),
        auto_reply_reason=reply,
        notification_reason=notification,
        bounce_reason=bounce,
        gateway_loop=_gateway_stamps(headers),
        defects=tuple(defects.items),
    )
