"""gateway.message: raw mail bytes -> ParsedMail, the loop guard, and fingerprint().

The hostile corpus lives in tests/fixtures/mail/*.eml; the huge inputs are generated here.
"""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from gateway.mail.fingerprint import fingerprint
from gateway.mail.htmltext import html_to_text
from gateway.mail.parse import (
    FIELDS,
    MAX_BODY_CHARS,
    MAX_DEPTH,
    MAX_PARTS,
    Attachment,
    ParsedMail,
    parse_message,
)

CORPUS = sorted((Path(__file__).parent / "fixtures" / "mail").glob("*.eml"))
BOUND_SECONDS = 10.0  # generous: the property is "does not hang", not a speed target


def mail(*headers: str, body: str | bytes = "body\n", crlf: bool = False) -> bytes:
    """A message from header lines and a body; LF line endings unless crlf."""
    head = "\n".join(headers).encode("utf-8")
    raw = head + b"\n\n" + (body.encode("utf-8") if isinstance(body, str) else body)
    return raw.replace(b"\n", b"\r\n") if crlf else raw


def bounded(raw: bytes, envelope_from: str | None = None) -> ParsedMail:
    """Parse and assert it returned a ParsedMail within BOUND_SECONDS."""
    started = time.monotonic()
    parsed = parse_message(raw, envelope_from)
    elapsed = time.monotonic() - started
    assert isinstance(parsed, ParsedMail)
    assert elapsed < BOUND_SECONDS, f"parse took {elapsed:.1f}s"
    assert not any(d.startswith("internal parse error") for d in parsed.defects), parsed.defects
    return parsed


# --- bodies -----------------------------------------------------------------------------------


def test_plain_text_message() -> None:
    parsed = parse_message(
        mail(
            "From: Desk <support@desk.example>",
            "To: desk@gateway.example",
            "Subject: Case #1 opened",
            "Message-ID: <case-1@desk.example>",
            body="Hello\nStatus: New\n",
        )
    )
    assert parsed.subject == "Case #1 opened"
    assert parsed.text == "Hello\nStatus: New\n"
    assert parsed.html == ""
    assert parsed.attachments == ()
    assert parsed.defects == ()
    assert not parsed.is_auto_reply and not parsed.is_bounce and parsed.loop_reason == ""


DESK_HTML = (
    "<html><head><style>td{color:red}</style><title>Desk</title></head><body>"
    "<p>Hello team,</p><table>"
    '<tr><td style="padding:4px">Case</td><td>#42</td></tr>'
    "<tr><td>Status:</td><td>New</td></tr>"
    "<tr><th>Priority:</th><td>High&nbsp;&amp;&nbsp;urgent</td></tr>"
    "</table><div>Reply above this line</div>-- Desk.com"
    "<script>document.write('hidden')</script></body></html>"
)


def test_html_only_desk_notification_has_status_line() -> None:
    parsed = parse_message(
        mail("Subject: Case #42", "Content-Type: text/html; charset=utf-8", body=DESK_HTML)
    )
    lines = parsed.text.split("\n")
    assert "Status: New" in lines
    assert "Case #42" in lines
    assert "Priority: High & urgent" in lines
    assert "-- Desk.com" in lines  # text after a closed block is its own line
    assert "hidden" not in parsed.text and "color:red" not in parsed.text
    assert parsed.html == DESK_HTML
    assert parsed.field("body") == parsed.text and parsed.field("html") == DESK_HTML


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        pytest.param("<p>Hello</p>Status: New", ["Hello", "Status: New"], id="text-after-block"),
        pytest.param("<div>a</div><b>Status:</b> New", ["a", "Status: New"], id="inline-after"),
        pytest.param("a<br>b<br/>c", ["a", "b", "c"], id="br"),
        pytest.param("<ul><li>one</li><li>two</li></ul>", ["one", "two"], id="list"),
        pytest.param(
            "<table><tr><td>Status:</td><td>New</td></tr><tr><td>Next</td></tr></table>",
            ["Status: New", "Next"],
            id="table-rows",
        ),
        pytest.param("x&nbsp;&nbsp; y\n\n z", ["x y z"], id="whitespace-collapsed"),
        pytest.param("<!-- Status: Old --><p>kept</p>", ["kept"], id="comment-dropped"),
        pytest.param("a<noscript>n</noscript><style>p{}</style>b", ["ab"], id="dropped-tags"),
        pytest.param("   ", [], id="blank"),
        pytest.param("<p><b>unclosed <i>tags", ["unclosed tags"], id="unclosed"),
    ],
)
def test_html_to_text(html: str, expected: list[str]) -> None:
    text = html_to_text(html)
    assert (text.split("\n") if text else []) == expected


MULTIPART_ALTERNATIVE = b"""From: a@example.com
Subject: alternative
MIME-Version: 1.0
Content-Type: multipart/alternative; boundary="XX"

--XX
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

Plain: Status: New caf=C3=A9 soft=
break
--XX
Content-Type: text/html; charset=utf-8
Content-Transfer-Encoding: base64

PHA+SFRNTDogU3RhdHVzOiBOZXc8L3A+
--XX--
"""


def test_multipart_alternative_prefers_text_and_keeps_html() -> None:
    parsed = parse_message(MULTIPART_ALTERNATIVE)
    assert parsed.text == "Plain: Status: New café softbreak"
    assert parsed.html == "<p>HTML: Status: New</p>"
    assert parsed.attachments == ()


def test_multipart_alternative_with_empty_text_uses_html() -> None:
    raw = MULTIPART_ALTERNATIVE.replace(b"Plain: Status: New caf=C3=A9 soft=\nbreak", b"  ")
    parsed = parse_message(raw)
    assert parsed.text == "HTML: Status: New"


@pytest.mark.parametrize(
    ("cte", "payload", "expected"),
    [
        pytest.param(
            "quoted-printable", b"caf=C3=A9 =E2=82=AC=\n5 =3D ok\n", "café €5 = ok\n", id="qp"
        ),
        pytest.param("base64", b"U3RhdHVzOiBOZXcgw6kK\n", "Status: New é\n", id="base64"),
        pytest.param("BASE64", b"U3RhdHVz\nOiBOZXcgw6kK\n", "Status: New é\n", id="base64-upper"),
        pytest.param("8bit", "Status: New é\n".encode(), "Status: New é\n", id="8bit"),
        pytest.param("7bit", b"Status: New\n", "Status: New\n", id="7bit"),
    ],
)
def test_transfer_encodings(cte: str, payload: bytes, expected: str) -> None:
    raw = mail(
        "Content-Type: text/plain; charset=utf-8", f"Content-Transfer-Encoding: {cte}", body=payload
    )
    assert parse_message(raw).text == expected


@pytest.mark.parametrize(
    ("charset", "payload", "expected"),
    [
        pytest.param(
            "iso-8859-1", b"\x93Hi\x94 \x80 5 caf\xe9\n", "“Hi” € 5 café\n", id="latin1-is-cp1252"
        ),
        pytest.param("us-ascii", b"\x93quoted\x94\n", "“quoted”\n", id="ascii-is-cp1252"),
        pytest.param('"ISO-8859-1"', b"\x80\n", "€\n", id="quoted-upper-label"),
        pytest.param(None, "café ✓\n".encode(), "café ✓\n", id="undeclared-utf8"),
        pytest.param(None, b"caf\xe9 \x80\n", "café €\n", id="undeclared-latin-junk"),
        pytest.param("utf-8", b"ok \xff\xfe end\n", "ok \ufffd\ufffd end\n", id="bad-utf8"),
        pytest.param("iso-8859-15", b"\xa4\n", "€\n", id="latin9"),
        pytest.param("koi8-r", "привет\n".encode("koi8-r"), "привет\n", id="koi8-r"),
        pytest.param("shift_jis", "日本語\n".encode("shift_jis"), "日本語\n", id="shift-jis"),
        pytest.param("x-no-such-charset", "café\n".encode(), "café\n", id="unknown-charset"),
    ],
)
def test_body_charsets(charset: str | None, payload: bytes, expected: str) -> None:
    ctype = "Content-Type: text/plain" + (f"; charset={charset}" if charset else "")
    assert parse_message(mail(ctype, body=payload)).text == expected


@pytest.mark.parametrize(
    "charset", ["unicode_escape", "raw-unicode-escape", "rot13", "base64", "hex", "idna"]
)
def test_non_text_codecs_are_not_applied(charset: str) -> None:
    parsed = parse_message(mail(f"Content-Type: text/plain; charset={charset}", body="\\x41 abc\n"))
    assert parsed.text == "\\x41 abc\n"
    assert any("unknown charset" in d for d in parsed.defects)


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"Subject: x\r\n\r\nline1\r\nline2\r\n", id="crlf"),
        pytest.param(b"Subject: x\r\rline1\rline2\r", id="cr-only"),
        pytest.param(b"Subject: x\n\nline1\r\nline2\n", id="mixed"),
        pytest.param(
            b"Content-Transfer-Encoding: base64\r\n\r\nbGluZTENCmxpbmUyDQo=\r\n", id="b64-crlf"
        ),
    ],
)
def test_text_line_endings_normalised(raw: bytes) -> None:
    assert parse_message(raw).text == "line1\nline2\n"


# --- headers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        pytest.param("=?utf-8?B?w6lsw6h2ZQ==?=", "élève", id="utf8-b"),
        pytest.param("=?UTF-8?Q?caf=C3=A9_ok?= =?utf-8?q?_more?=", "café ok more", id="utf8-q"),
        pytest.param("Re: =?utf-8?Q?caf=C3=A9?= done", "Re: café done", id="mixed-plain"),
        pytest.param("=?utf-8?B?5pel?= =?utf-8?B?5pys?=", "日本", id="adjacent-joined"),
        pytest.param("=?utf-8?Q?=E6=97?= =?utf-8?Q?=A5?=", "日", id="char-split-across-words"),
        pytest.param("=?utf-8?B?!!!?=", "=?utf-8?B?!!!?=", id="broken-b-kept"),
        pytest.param("=?utf-8?Q?unterminated", "=?utf-8?Q?unterminated", id="unterminated"),
        pytest.param("=?x-bogus?Q?hello=20world?=", "hello world", id="unknown-charset"),
        pytest.param("=?iso-8859-1?Q?=80_=93x=94?=", "€ “x”", id="latin1-word-is-cp1252"),
        pytest.param("=?utf-8*en?Q?lang_tag?=", "lang tag", id="rfc2231-language"),
        pytest.param("=?gb2312?B?xOO6ww==?=", "你好", id="chinese-gb2312"),
        pytest.param("=?utf-8?B?5L2g5aW9?=", "你好", id="chinese-utf8"),
        pytest.param("=?iso-2022-jp?B?GyRCJDMkcyRLJEEkTxsoQg==?=", "こんにちは", id="japanese-jis"),
        pytest.param("=?shift_jis?B?k/qWe4zq?=", "日本語", id="japanese-sjis"),
        pytest.param("=?utf-8?Q?a=0D=0Ab?=", "a b", id="smuggled-newline"),
    ],
)
def test_encoded_word_subjects(subject: str, expected: str) -> None:
    parsed = parse_message(mail(f"Subject: {subject}"))
    assert parsed.subject == expected
    assert parsed.field("subject") == expected


def test_raw_8bit_headers_are_decoded() -> None:
    raw = "Subject: 你好 raw ✓\nFrom: Jürgen Müller <j@example.de>\n\nx".encode()
    parsed = parse_message(raw)
    assert parsed.subject == "你好 raw ✓"
    assert parsed.from_ == "Jürgen Müller <j@example.de>"
    latin = parse_message(b"Subject: Caf\xe9 \x93q\x94\nFrom: Ren\xe9 <r@example.com>\n\nx")
    assert latin.subject == "Café “q”"
    assert latin.from_ == "René <r@example.com>"  # regression: used to lose the whole message


def test_folded_headers_are_unfolded() -> None:
    raw = b"Subject: a long\r\n\tsubject\r\n   folded\r\nX-Tag: one\n two\n\nbody"
    parsed = parse_message(raw)
    assert parsed.subject == "a long subject folded"
    assert parsed.header("X-Tag") == "one two"


def test_missing_headers() -> None:
    parsed = parse_message(b"X-Only: this\n\nbody\n")
    assert parsed.subject == ""
    assert parsed.from_ == "" and parsed.from_addr == ""
    assert parsed.to == () and parsed.cc == ()
    assert parsed.message_id == "" and parsed.in_reply_to == "" and parsed.references == ()
    assert parsed.date is None
    assert parsed.text == "body\n"
    assert parsed.header("Subject") == ""


def test_headers_dict_is_multi_valued_lower_case_and_ordered() -> None:
    parsed = parse_message(
        mail("Received: one", "X-Case: 1", "RECEIVED: two", "received: three", "Subject: s")
    )
    assert parsed.headers["received"] == ("one", "two", "three")
    assert parsed.header("Received") == "one"
    assert parsed.header("x-case") == "1"
    assert list(parsed.headers) == ["received", "x-case", "subject"]


@pytest.mark.parametrize(
    ("header", "from_", "from_addr"),
    [
        pytest.param("Desk <Support@Desk.Example>", "Desk <Support@Desk.Example>", "support@desk.example", id="name"),
        pytest.param("support@desk.example", "support@desk.example", "support@desk.example", id="bare"),
        pytest.param('"Doe, John" <j@example.com>', "Doe, John <j@example.com>", "j@example.com", id="comma"),
        pytest.param("=?utf-8?Q?J=C3=BCrgen?= <j@z.de>", "Jürgen <j@z.de>", "j@z.de", id="encoded"),
        pytest.param("=?utf-8?Q?Doe=2C_J?= <j@z.de>", "Doe, J <j@z.de>", "j@z.de", id="encoded-comma"),
        pytest.param("j@z.de (Jürgen)", "Jürgen <j@z.de>", "j@z.de", id="comment-name"),
        pytest.param("Desk.com   Support <s@desk.com>", "Desk.com Support <s@desk.com>", "s@desk.com", id="spaces"),
        pytest.param("not an address", "not an address", "not", id="no-address"),
        pytest.param("root (Cron Daemon)", "root (Cron Daemon)", "root", id="local-only"),
    ],
)  # fmt: skip
def test_from(header: str, from_: str, from_addr: str) -> None:
    parsed = parse_message(mail(f"From: {header}"))
    assert parsed.from_ == from_
    assert parsed.from_addr == from_addr
    assert parsed.field("from") == from_


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("a@x.com", ("a@x.com",), id="single"),
        pytest.param('"B, A" <A@X.com>, c@y.com', ("a@x.com", "c@y.com"), id="comma-in-name"),
        pytest.param("=?utf-8?Q?M=C3=BCller=2C_K?= <k@z.de>, l@z.de", ("k@z.de", "l@z.de"), id="encoded"),
        pytest.param("a@x.com, A@X.COM, b@x.com", ("a@x.com", "b@x.com"), id="deduplicated"),
        pytest.param("Team: a@x.com, b@x.com;", ("a@x.com", "b@x.com"), id="group"),
        pytest.param("undisclosed-recipients:;", (), id="empty-group"),
        pytest.param('"unterminated <a@x.com>, b@x.com', ("a@x.com", "b@x.com"), id="open-quote"),
        pytest.param("a@x.com,, ,b@x.com,", ("a@x.com", "b@x.com"), id="empty-entries"),
        pytest.param("((((((((a@x.com", ("a@x.com",), id="open-comments"),
    ],
)  # fmt: skip
def test_to_and_cc(header: str, expected: tuple[str, ...]) -> None:
    parsed = parse_message(mail(f"To: {header}", f"Cc: {header}"))
    assert parsed.to == expected
    assert parsed.cc == expected
    assert parsed.field("to") == ", ".join(expected) == parsed.field("cc")


def test_multiple_to_headers_are_combined() -> None:
    parsed = parse_message(mail("To: a@x.com", "To: B <b@x.com>"))
    assert parsed.to == ("a@x.com", "b@x.com")


def test_message_ids() -> None:
    parsed = parse_message(
        mail(
            "Message-ID: <case-1@desk.example>",
            "In-Reply-To: <parent@desk.example> (comment)",
            "References: <r1@x>\n <r2@x>\t<r3@x>",
        )
    )
    assert parsed.message_id == "case-1@desk.example"
    assert parsed.in_reply_to == "parent@desk.example"
    assert parsed.references == ("r1@x", "r2@x", "r3@x")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("Message-ID: bare-id@example.com", "bare-id@example.com", id="no-brackets"),
        pytest.param("Message-ID: <>", "", id="empty-brackets"),
        pytest.param("Message-ID:", "", id="empty"),
        pytest.param("Message-ID:\n <folded@example.com>", "folded@example.com", id="folded"),
    ],
)
def test_odd_message_ids(header: str, expected: str) -> None:
    assert parse_message(mail(header)).message_id == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param(
            "Tue, 24 Nov 2026 04:00:00 +0100",
            datetime(2026, 11, 24, 4, tzinfo=timezone(timedelta(hours=1))),
            id="offset",
        ),
        pytest.param("24 Nov 2026 04:00:00 GMT", datetime(2026, 11, 24, 4, tzinfo=UTC), id="gmt"),
        pytest.param("Tue, 24 Nov 2026 04:00:00", datetime(2026, 11, 24, 4, tzinfo=UTC), id="naive"),
        pytest.param("Tue, 24 Nov 2026 04:00:00 -0000", datetime(2026, 11, 24, 4, tzinfo=UTC), id="-0000"),
        pytest.param("garbage", None, id="garbage"),
        pytest.param("Tue, 99 Foo 2026 99:99:99 +9999", None, id="out-of-range"),
        pytest.param("", None, id="empty"),
    ],
)  # fmt: skip
def test_dates(header: str, expected: datetime | None) -> None:
    parsed = parse_message(mail(f"Date: {header}"))
    assert parsed.date == expected
    if expected is not None:
        assert parsed.date is not None and parsed.date.tzinfo is not None


# --- attachments ------------------------------------------------------------------------------

ATTACHMENTS = b"""From: a@example.com
Subject: attachments
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="M"

--M
Content-Type: text/plain

the body
--M
Content-Type: application/pdf; name="r.pdf"
Content-Disposition: attachment; filename*=utf-8''%E2%82%AC%20report.pdf
Content-Transfer-Encoding: base64

AAECAwQF
--M
Content-Type: text/plain
Content-Disposition: attachment; filename="log.txt"

Status: Resolved (inside an attachment)
--M
Content-Type: image/png
Content-Disposition: attachment;
 filename*0*=utf-8''%E6%97%A5;
 filename*1=".png"
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--M
Content-Type: application/octet-stream; name="=?utf-8?Q?na=C3=AFve.bin?="
Content-Transfer-Encoding: quoted-printable

a=3Db
--M--
"""


def test_attachments_are_listed_not_used_as_body() -> None:
    parsed = parse_message(ATTACHMENTS)
    assert parsed.text == "the body"
    assert "Resolved" not in parsed.text
    assert parsed.attachments == (
        Attachment("€ report.pdf", "application/pdf", 6),
        Attachment("log.txt", "text/plain", 39),
        Attachment("日.png", "image/png", 8),
        Attachment("naïve.bin", "application/octet-stream", 3),
    )


def test_text_attachment_first_is_not_the_body() -> None:
    raw = ATTACHMENTS.replace(b"--M\nContent-Type: text/plain\n\nthe body\n", b"")
    parsed = parse_message(raw)
    assert parsed.text == ""
    assert [a.filename for a in parsed.attachments][1] == "log.txt"


# --- loop guard -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param(["Auto-Submitted: auto-replied"], "Auto-Submitted", id="auto-submitted"),
        pytest.param(["Auto-Submitted: auto-generated"], "Auto-Submitted", id="auto-generated"),
        pytest.param(["X-Autoreply: yes"], "X-Autoreply", id="x-autoreply"),
        pytest.param(["X-Autorespond: x"], "X-Autorespond", id="x-autorespond"),
        pytest.param(["X-Autoreply-From: a@b"], "X-Autoreply-From", id="x-autoreply-from"),
        pytest.param(["X-Mail-Autoreply: 1"], "X-Mail-Autoreply", id="x-mail-autoreply"),
        pytest.param(["Precedence: junk"], "Precedence: junk", id="precedence-junk"),
        pytest.param(["Precedence: auto_reply"], "Precedence: auto_reply", id="precedence-ar"),
        pytest.param(
            ["Precedence: bulk", "Subject: Out of Office: back Monday"],
            "Precedence: bulk with an out-of-office subject",
            id="bulk-with-ooo-subject",
        ),
        pytest.param(
            ["Precedence: list", "Subject: Automatische Antwort: Abwesenheit"],
            "Precedence: list",
            id="list-with-german-ooo",
        ),
        pytest.param(
            ["X-Auto-Response-Suppress: OOF", "Subject: Automatic reply: away"],
            "X-Auto-Response-Suppress",
            id="suppress-with-ooo-subject",
        ),
    ],
)
def test_auto_reply_detected(headers: list[str], reason: str) -> None:
    parsed = parse_message(mail("From: a@example.com", *headers))
    assert parsed.is_auto_reply
    assert not parsed.is_bounce
    assert reason in parsed.loop_reason


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(["Auto-Submitted: no"], id="auto-submitted-no"),
        pytest.param(["Auto-Submitted: No"], id="auto-submitted-No"),
        pytest.param(["Auto-Submitted: no (sent by a human)"], id="auto-submitted-no-comment"),
        pytest.param(["Precedence: bulk", "Subject: Case #1: Status New"], id="helpdesk-bulk"),
        pytest.param(["X-Auto-Response-Suppress: All", "Subject: Case #2"], id="helpdesk-suppress"),
        pytest.param(["Subject: Out of office printer is on fire"], id="ooo-subject-alone"),
    ],
)
def test_not_auto_reply(headers: list[str]) -> None:
    parsed = parse_message(mail("From: support@desk.example", *headers))
    assert not parsed.is_auto_reply
    assert not parsed.is_bounce
    assert parsed.loop_reason == ""


DSN = b"""From: MAILER-DAEMON@mx.example
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="R"

--R
Content-Type: text/plain

This is the mail system at host mx.example.
--R
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example

Final-Recipient: rfc822; x@y.example
Action: failed
--R
Content-Type: message/rfc822

Subject: original

Status: New (inside the returned message)
--R--
"""


@pytest.mark.parametrize(
    ("raw", "envelope_from", "reason"),
    [
        pytest.param(mail("Subject: x"), "", "null envelope sender", id="null-sender"),
        pytest.param(mail("Subject: x"), "<>", "null envelope sender", id="null-sender-brackets"),
        pytest.param(DSN, None, "multipart/report", id="multipart-report"),
        pytest.param(mail("X-Failed-Recipients: a@b"), None, "X-Failed-Recipients", id="x-failed"),
        pytest.param(
            mail("From: MAILER-DAEMON@mx.example", "Subject: Delivery Status Notification (Failure)"),
            None,
            "From mailer-daemon",
            id="mailer-daemon",
        ),
        pytest.param(
            mail("From: Postmaster <postmaster@mx.example>", "Subject: Undeliverable: hi"),
            "bounces@mx.example",
            "From postmaster",
            id="postmaster",
        ),
    ],
)  # fmt: skip
def test_bounce_detected(raw: bytes, envelope_from: str | None, reason: str) -> None:
    parsed = parse_message(raw, envelope_from)
    assert parsed.is_bounce
    assert reason in parsed.loop_reason


def test_bounce_report_body_is_the_human_part() -> None:
    parsed = parse_message(DSN)
    assert parsed.text == "This is the mail system at host mx.example."
    assert "Reporting-MTA" not in parsed.text


@pytest.mark.parametrize(
    ("raw", "envelope_from"),
    [
        pytest.param(mail("Subject: x"), None, id="envelope-unknown"),
        pytest.param(mail("Subject: x"), "desk@desk.example", id="envelope-sender"),
        pytest.param(mail("From: MAILER-DAEMON@mx.example", "Subject: hello"), None, id="daemon-chat"),
    ],
)  # fmt: skip
def test_not_bounce(raw: bytes, envelope_from: str | None) -> None:
    parsed = parse_message(raw, envelope_from)
    assert not parsed.is_bounce
    assert parsed.loop_reason == ""


def test_auto_reply_and_bounce_reasons_combine() -> None:
    parsed = parse_message(mail("Auto-Submitted: auto-replied"), envelope_from="")
    assert parsed.is_auto_reply and parsed.is_bounce
    assert parsed.loop_reason == "Auto-Submitted: auto-replied; null envelope sender (bounce)"


# --- field() ----------------------------------------------------------------------------------


def test_field_names() -> None:
    parsed = parse_message(
        mail(
            "From: Desk <d@desk.example>",
            "To: a@x.com, b@x.com",
            "Cc: c@x.com",
            "Subject: s",
            "X-Desk-Priority: high",
            "x-desk-priority: urgent",
            body="the body\n",
        )
    )
    assert set(FIELDS) == {"subject", "body", "html", "from", "to", "cc"}
    assert parsed.field("subject") == "s"
    assert parsed.field("body") == "the body\n"
    assert parsed.field("html") == ""
    assert parsed.field("from") == "Desk <d@desk.example>"
    assert parsed.field("to") == "a@x.com, b@x.com"
    assert parsed.field("cc") == "c@x.com"
    assert parsed.field("headers.X-Desk-Priority") == "high\nurgent"
    assert parsed.field("headers.x-DESK-priority") == "high\nurgent"
    assert parsed.field("headers.X-Absent") == ""
    with pytest.raises(KeyError):
        parsed.field("nonsense")


# --- hostile corpus ---------------------------------------------------------------------------


def test_corpus_is_present() -> None:
    assert len(CORPUS) >= 15


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in CORPUS])
def test_corpus_parses(path: Path) -> None:
    raw = path.read_bytes()
    parsed = bounded(raw)
    for envelope_from in ("", "a@example.com"):
        bounded(raw, envelope_from)
    assert fingerprint(raw)[1]  # and fingerprint never raises either
    for text in (parsed.subject, parsed.from_, parsed.text, parsed.html, *parsed.to):
        assert "\x00" not in text
    assert "\n" not in parsed.subject and "\r" not in parsed.subject
    assert "\r" not in parsed.text


def _cut_points(length: int) -> list[int]:
    return sorted({0, 1, 17, length // 2, max(length - 1, 0)})


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in CORPUS])
def test_corpus_truncated(path: Path) -> None:
    raw = path.read_bytes()
    for cut in _cut_points(len(raw)):
        bounded(raw[:cut])
        fingerprint(raw[:cut])


def corpus(name: str) -> ParsedMail:
    return bounded((Path(__file__).parent / "fixtures" / "mail" / f"{name}.eml").read_bytes())


def test_corpus_bad_charsets_decode_sensibly() -> None:
    parsed = corpus("bad_charset_names")
    assert parsed.subject == "Disk full on server"
    assert parsed.text == "Status: New (unknown charset)"
    assert parsed.html == "<p>Fgnghf: Arj</p>"  # rot13 is no text charset: not applied
    assert any("unknown charset" in d for d in parsed.defects)


@pytest.mark.parametrize(
    "name", ["broken_boundary", "multipart_no_boundary", "empty_boundary_and_params"]
)
def test_corpus_unsplittable_multipart_keeps_words_findable(name: str) -> None:
    parsed = corpus(name)
    assert "boundary part" in parsed.text or "Status: New" in parsed.text


def test_corpus_missing_closing_boundary() -> None:
    parsed = corpus("missing_closing_boundary")
    assert parsed.text == "first part: Status: New"
    assert parsed.attachments == (Attachment("data.bin", "application/octet-stream", 9),)
    assert "parser: CloseBoundaryNotFoundDefect" in parsed.defects


def test_corpus_invalid_base64_and_truncated_qp() -> None:
    assert corpus("invalid_base64").text.startswith("Status: New\n")
    qp = corpus("truncated_qp")
    assert qp.text.startswith("Status: New café =ZZ broken escape")


def test_corpus_rfc2231() -> None:
    assert corpus("rfc2231_mixed").attachments == (
        Attachment("€ in report 日.pdf", "application/pdf", 9),
        Attachment("Grüße.csv", "text/csv", 3),
    )
    gaps = corpus("rfc2231_bad_indexes")
    assert [a.filename for a in gaps.attachments] == ["bad%ZZ%4only-one.bin", "start-"]
    assert "mime: RFC 2231 continuation indexes have gaps" in gaps.defects
    unknown = corpus("rfc2231_unknown_charset")
    assert [a.filename for a in unknown.attachments] == ["x.pdf", "%ZZA%"]


def test_corpus_nul_bytes_replaced() -> None:
    parsed = corpus("nul_bytes")
    assert parsed.subject == "NUL\ufffdin subject"
    assert parsed.text == "Status: New\ufffd\ufffd after NUL\n"
    assert "text: NUL characters replaced" in parsed.defects


@pytest.mark.parametrize("name", ["bare_lf", "cr_only", "mixed_line_endings"])
def test_corpus_line_endings(name: str) -> None:
    parsed = corpus(name)
    assert "Status: New" in parsed.text.split("\n")
    assert "\r" not in parsed.text


def test_corpus_header_only() -> None:
    parsed = corpus("header_only")
    assert parsed.subject == "headers and nothing else"
    assert parsed.message_id == "hdr@example.com"
    assert parsed.text == ""


def test_corpus_attached_message_is_listed_not_read() -> None:
    parsed = corpus("message_rfc822_attachment")
    assert parsed.text == "See the attached original."
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("original.eml", "message/rfc822")
    ]
    assert parsed.attachments[0].size > 50


def test_corpus_nested_mixed_alternative_related() -> None:
    parsed = corpus("nested_mixed_alternative_related")
    assert parsed.text == "Plain part: Status: New"
    assert "<td>Status:</td>" in parsed.html
    assert parsed.attachments == (
        Attachment("", "image/png", 8),
        Attachment("logs.zip", "application/zip", 5),
    )


def test_corpus_encoded_word_mess() -> None:
    parsed = corpus("encoded_word_mess")
    assert parsed.subject.startswith("oké ")
    assert parsed.from_addr == "odd@example.com"
    assert parsed.to == ("u@example.com",)


def test_corpus_raw_latin1_headers() -> None:
    parsed = corpus("latin1_raw_headers")
    assert parsed.subject == "Café “quoted” € 5"
    assert parsed.from_ == "René Müller <rene@example.com>"
    assert parsed.to == ("x@example.com",)


# --- generated huge inputs --------------------------------------------------------------------


def _nested(levels: int) -> bytes:
    head, tail = [], []
    for i in range(levels):
        head.append(b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i))
        tail.insert(0, b"\n--b%d--\n" % i)
    return (
        b"Subject: nested\n" + b"".join(head) + b"Content-Type: text/plain\n\ndeep" + b"".join(tail)
    )


def _many_parts(count: int) -> bytes:
    parts = b"".join(b"--p\nContent-Type: text/plain\n\npart %d\n" % i for i in range(count))
    return b"Content-Type: multipart/mixed; boundary=p\n\n" + parts + b"--p--\n"


HUGE = [
    pytest.param(lambda: b"Subject: " + b"A" * 200_000 + b"\n\nbody", id="200KB-header"),
    pytest.param(
        lambda: b"X-Words: " + b"word\n " * 40_000 + b"\nSubject: after\n\nbody", id="200KB-folded"
    ),
    pytest.param(lambda: b"Content-Type: text/plain" + b"; a=b" * 10_000 + b"\n\nbody", id="10k-params"),
    pytest.param(
        lambda: b"Content-Type: multipart/mixed" + b";" * 10_000 + b"; boundary=x\n\n--x\n\nhi\n--x--\n",
        id="10k-semicolons-multipart",
    ),
    pytest.param(
        lambda: b"Content-Type: multipart/mixed" + b";" * 2_000_000 + b"; boundary=x\n\n--x\n\nhi\n",
        id="2M-semicolons-multipart",
    ),
    pytest.param(
        lambda: _many_parts(1).replace(
            b"Content-Type: text/plain",
            b"Content-Type: text/plain\nContent-Disposition: attachment"
            + b"".join(b"; filename*%d*=%%41" % i for i in range(10_000)),
        ),
        id="10k-rfc2231-segments",
    ),
    pytest.param(lambda: _nested(100), id="100-nested"),
    pytest.param(lambda: _nested(5_000), id="5000-nested"),
    pytest.param(lambda: _many_parts(10_000), id="10k-parts"),
    pytest.param(lambda: b"".join(b"X-H%d: v\n" % i for i in range(100_000)) + b"\nbody", id="100k-headers"),
    pytest.param(lambda: b"To: " + b"(" * 100_000 + b"a@b\n\nx", id="nested-comments-in-to"),
    pytest.param(lambda: b"Subject: " + b"=?utf-8?Q?a?= " * 100_000 + b"\n\nb", id="100k-encoded-words"),
    pytest.param(lambda: b"Subject: big\n\n" + (b"x" * 76 + b"\n") * 400_000, id="30MB-body"),
    pytest.param(
        lambda: b"Content-Transfer-Encoding: base64\n\n" + (b"QUFB" * 19 + b"\n") * 400_000,
        id="30MB-base64",
    ),
    pytest.param(
        lambda: b"Content-Type: text/html\n\n" + b"<div><p>x</p>" * 2_500_000, id="30MB-html"
    ),
    pytest.param(lambda: b"Subject: x\n\n" + b"y" * 30_000_000, id="30MB-one-line"),
]  # fmt: skip


@pytest.mark.parametrize("build", HUGE)
def test_huge_inputs_are_bounded(build) -> None:
    raw = build()
    parsed = bounded(raw)
    assert len(parsed.text) <= MAX_BODY_CHARS and len(parsed.html) <= MAX_BODY_CHARS
    assert len(parsed.defects) <= 51
    started = time.monotonic()
    fingerprint(raw)
    assert time.monotonic() - started < BOUND_SECONDS


def test_huge_body_is_truncated_with_a_note() -> None:
    parsed = bounded(b"Subject: big\n\n" + (b"x" * 76 + b"\n") * 400_000)
    assert len(parsed.text) == MAX_BODY_CHARS
    assert f"text: truncated at {MAX_BODY_CHARS} characters" in parsed.defects


def test_nesting_and_part_limits_are_noted() -> None:
    deep = bounded(_nested(MAX_DEPTH + 5))
    assert f"mime: parts nested deeper than {MAX_DEPTH} skipped" in deep.defects
    shallow = bounded(_nested(MAX_DEPTH - 2))
    assert shallow.text == "deep"
    many = bounded(_many_parts(MAX_PARTS * 3))
    assert many.text == "part 0"
    assert f"mime: only the first {MAX_PARTS} parts read" in many.defects


def test_header_cap_keeps_a_bounded_headers_dict() -> None:
    parsed = bounded(b"".join(b"X-H%d: v\n" % i for i in range(10_000)) + b"Subject: late\n\nb")
    assert 0 < len(parsed.headers) <= 500
    assert any(d.startswith("headers: only the first") for d in parsed.defects)


def test_defects_are_capped() -> None:
    subject = " ".join(f"=?x-bogus-{i}?Q?w?=" for i in range(200))
    parsed = parse_message(mail(f"Subject: {subject}"))
    assert len(parsed.defects) == 51
    assert parsed.defects[-1] == "more defects omitted"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\n", id="newline"),
        pytest.param(b"Subject: bytes\n\nbody", id="bytes"),
        pytest.param("Subject: str input\n\nbody", id="str"),
        pytest.param(bytearray(b"Subject: bytearray\n\nbody"), id="bytearray"),
        pytest.param(memoryview(b"Subject: memoryview\n\nbody"), id="memoryview"),
        pytest.param(None, id="none"),
        pytest.param(12345, id="int"),
    ],
)
def test_odd_input_types_never_raise(raw: object) -> None:
    parsed = parse_message(raw)  # type: ignore[arg-type]
    assert isinstance(parsed, ParsedMail)
    if isinstance(raw, str | bytes | bytearray | memoryview) and len(raw) > 2:
        assert parsed.subject and parsed.text == "body"


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_same_message_same_key() -> None:
    a = mail("Message-ID: <m1@x>", "Subject: one", "Received: by a", body="Status: New\n")
    b = mail("Received: by b", "Message-ID: <m1@x>", "Subject: one", body="Status: New\n")
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) == ("m1@x", hashlib.sha256(b"Status: New").hexdigest())


def test_fingerprint_different_body_different_hash() -> None:
    a = fingerprint(mail("Message-ID: <m1@x>", body="Status: New\n"))
    b = fingerprint(mail("Message-ID: <m1@x>", body="Status: Closed\n"))
    assert a[0] == b[0] == "m1@x"
    assert a[1] != b[1]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(mail("Subject: none"), "", id="no-message-id"),
        pytest.param(mail("Message-ID: <>"), "", id="empty-brackets"),
        pytest.param(mail("Message-ID:"), "", id="empty"),
        pytest.param(mail("Message-ID:\n <folded@x>"), "folded@x", id="folded"),
        pytest.param(mail("Message-ID:\n\t<folded@x>", crlf=True), "folded@x", id="folded-crlf"),
        pytest.param(mail("message-id:   <lower@x>  "), "lower@x", id="lower-case"),
        pytest.param(mail("Resent-Message-ID: <resent@x>"), "", id="resent-ignored"),
        pytest.param(mail("Subject: x", body="Message-ID: <in-body@x>\n"), "", id="body-ignored"),
        pytest.param(mail("Message-ID: bare@x"), "bare@x", id="bare"),
    ],
)
def test_fingerprint_message_id(raw: bytes, expected: str) -> None:
    assert fingerprint(raw)[0] == expected


def test_fingerprint_agrees_with_parse_message_id() -> None:
    raw = mail("Message-ID:\n <folded@x>", "Subject: s")
    assert fingerprint(raw)[0] == parse_message(raw).message_id


def test_fingerprint_ignores_line_endings_and_trailing_blank_lines() -> None:
    lf = mail("Message-ID: <m@x>", body="line1\nline2\n")
    crlf = mail("Message-ID: <m@x>", body="line1\nline2\n", crlf=True)
    cr = lf.replace(b"\n", b"\r")
    padded = lf + b"\n\n"
    assert fingerprint(lf) == fingerprint(crlf) == fingerprint(cr) == fingerprint(padded)
