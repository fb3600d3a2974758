"""Notification themes: the default themes, message correctness, and hostile input."""

from __future__ import annotations

import copy
import email
import json
from email.message import EmailMessage
from email.policy import default as default_policy
from pathlib import Path

import pytest

from gateway.errors import ThemeError
from gateway.mail.parse import parse_message
from gateway.rules import evaluate, load_ruleset
from gateway.store import Incident
from gateway.themes.render import Themes, check, incident_context, load_context, replace_header

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
CASE29 = ROOT / "tests" / "fixtures" / "case29.json"


@pytest.fixture(scope="module")
def themes() -> Themes:
    return Themes(TEMPLATES)


@pytest.fixture
def case() -> dict:
    return load_context(CASE29)


def make_theme(root: Path, name: str, text: str, html: str | None = None, sample=None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "message.txt.j2").write_text(text)
    if html is not None:
        (folder / "message.html.j2").write_text(html)
    if sample is not None:
        (folder / "sample.json").write_text(json.dumps(sample))
    return folder


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def reparse(msg: EmailMessage) -> EmailMessage:
    """What a receiver sees: the serialized bytes parsed again."""
    return email.message_from_bytes(msg.as_bytes(), policy=default_policy)


def text_body(msg: EmailMessage) -> str:
    return msg.get_body(("plain",)).get_content()


def html_body(msg: EmailMessage) -> str:
    return msg.get_body(("html",)).get_content()


class TestDefaultThemes:
    def test_case_new_is_the_desk_notification(self, themes: Themes, case: dict) -> None:
        msg = reparse(themes.render("case_new", case))
        assert msg["To"] == "desk@gateway.example"
        assert msg["From"] == "Helpdesk <support@helpdesk.example>"
        assert msg["Subject"] == "Printer on fire in building 2"
        assert msg["Message-ID"].endswith("@helpdesk.example>")
        assert msg["Date"].datetime is not None
        body = text_body(msg)
        for line in ("Case #29", "Status: New", "Priority: 10",
                     "Requester: Jane Customer <jane@customer.example>",
                     "Link: https://yourcompany.desk.com/agent/case/29"):  # fmt: skip
            assert line in body
        assert "Status: Resolved" not in body

    def test_case_resolved_is_text_only(self, themes: Themes, case: dict) -> None:
        msg = reparse(themes.render("case_resolved", case))
        assert msg.get_content_type() == "text/plain"
        assert msg["Subject"] == "Printer on fire in building 2"
        assert "Status: Resolved" in msg.get_content()
        assert "Status: New" not in msg.get_content()

    def test_case_themes_round_trip_through_the_default_rules(
        self, themes: Themes, case: dict
    ) -> None:
        ruleset = load_ruleset([ROOT / "parsing_rules" / "helpdesk.toml"])
        decisions = [
            evaluate(ruleset, parse_message(themes.render(name, case).as_bytes()), regex_timeout=1)
            for name in ("case_new", "case_resolved")
        ]
        assert [d.action for d in decisions] == ["trigger", "resolve"]
        assert {d.incident_key for d in decisions} == {"Printer on fire in building 2"}
        assert decisions[0].details["case"] == "29"

    def test_incident_update_is_threaded_and_auto_submitted(self, themes: Themes) -> None:
        msg = reparse(themes.render_sample("incident_update"))
        assert msg["In-Reply-To"] == "<case-1042.1714641240@helpdesk.example>"
        assert msg["References"] == "<case-1042.1714641240@helpdesk.example>"
        assert msg["Auto-Submitted"] == "auto-generated"
        assert msg["X-Gateway-Event"] == "trigger"
        assert msg["Subject"] == "Re: VPN down for the Lisbon office"
        assert msg["Message-ID"].endswith("@gateway.example>")

    def test_incident_update_is_ignored_by_the_loop_guard(self, themes: Themes) -> None:
        mail = parse_message(themes.render_sample("incident_update").as_bytes())
        assert mail.is_auto_reply
        assert "Auto-Submitted" in mail.loop_reason

    @pytest.mark.parametrize("event", ["trigger", "duplicate", "acknowledge", "resolve"])
    def test_incident_context_from_the_store_renders(self, themes: Themes, event: str) -> None:
        incident = Incident(
            service="helpdesk", incident_key="Printer on fire", state="triggered",
            summary="Printer on fire", trigger_count=2, acknowledge_count=0, resolve_count=0,
            times_opened=1, first_seen=1714641240.0, last_seen=1714641300.0, opened_at=None,
            resolved_at=None, last_message=7, case_message_id="abc@helpdesk.example",
        )  # fmt: skip
        context = incident_context(
            event, incident, to=["support@helpdesk.example"], from_addr="gw@gateway.example"
        )
        msg = themes.render("incident_update", context)
        assert msg["X-Gateway-Event"] == event
        assert msg["In-Reply-To"] == "<abc@helpdesk.example>"

    def test_unknown_event_names_the_template_line(self, themes: Themes) -> None:
        context = load_context(TEMPLATES / "incident_update" / "sample.json")
        context["event"] = "exploded"
        with pytest.raises(ThemeError) as info:
            themes.render("incident_update", context)
        problem = info.value.problems[0]
        assert problem.file.endswith("message.txt.j2") and problem.line is not None

    def test_every_shipped_theme_passes_check(self) -> None:
        assert check(TEMPLATES) == []

    def test_unknown_theme(self, themes: Themes, case: dict) -> None:
        with pytest.raises(ThemeError, match=r"no such theme.*case_new"):
            themes.render("nope", case)


class TestMessageFormat:
    def test_multipart_alternative_structure(self, themes: Themes, case: dict) -> None:
        msg = reparse(themes.render("case_new", case))
        assert msg.get_content_type() == "multipart/alternative"
        parts = list(msg.iter_parts())
        assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
        assert all("MIME-Version" not in p for p in parts)
        assert '<a href="https://yourcompany.desk.com/agent/case/29">' in html_body(msg)

    def test_non_ascii_subject_is_encoded_and_round_trips(self, themes: Themes, case: dict) -> None:
        subject = "Drucker brennt – Gebäude 2, Büro 3.14 ☃ " + "sehr lange Betreffzeile " * 4
        case["case"]["subject"] = subject.strip()
        case["case"]["description"] = "Ça brûle ☃"
        raw = themes.render("case_new", case).as_bytes()
        raw.decode("ascii")  # 7-bit clean: any relay takes it
        assert b"=?utf-8?" in raw
        assert all(len(line) <= 78 for line in raw.split(b"\r\n"))
        msg = email.message_from_bytes(raw, policy=default_policy)
        assert msg["Subject"] == subject.strip()
        assert "Ça brûle ☃" in text_body(msg)

    def test_message_id_and_date_added_only_when_absent(self, tmp_path: Path) -> None:
        make_theme(tmp_path, "t", "To: a@x.example\nFrom: b@y.example\n"
                   "Message-ID: <fixed@y.example>\nDate: Thu, 02 May 2024 09:14:00 +0000\n\nhi\n")  # fmt: skip
        msg = Themes(tmp_path).render("t", {})
        assert msg["Message-ID"] == "<fixed@y.example>"
        assert msg["Date"] == "Thu, 02 May 2024 09:14:00 +0000"

    def test_default_from_and_empty_headers_left_out(self, tmp_path: Path) -> None:
        make_theme(tmp_path, "t", "To: a@x.example\nFrom: {{ sender | default('') }}\n"
                   "Cc: {{ cc | default('') }}\n\nhi\n")  # fmt: skip
        msg = Themes(tmp_path).render("t", {}, default_from="gw@gw.example")
        assert msg["From"] == "gw@gw.example" and "Cc" not in msg
        assert msg["Message-ID"].endswith("@gw.example>")

    def test_filters(self, tmp_path: Path) -> None:
        body = ("{{ 1714641240 | datetime }}|{{ '2024-05-02T09:14:00Z' | datetime('%H:%M', "
                "'Europe/Lisbon') }}|{{ 'a@x' | addr('Ann') }}|{{ 'id@x' | msgid }}|"
                "{{ '<id@x>' | msgid }}|{{ 'abcdefghijklmnopqrstuvwxyz' | truncate(10) }}\n")  # fmt: skip
        make_theme(tmp_path, "t", f"To: a@x.example\nFrom: b@y.example\n\n{body}")
        text = Themes(tmp_path).render("t", {}).get_content()
        assert text == "2024-05-02 09:14 UTC|10:14|Ann <a@x>|<id@x>|<id@x>|abcdefg...\n"

    def test_replace_to(self, themes: Themes, case: dict) -> None:
        msg = themes.render("case_new", case)
        replace_header(msg, "to", "other@gateway.example")
        assert msg.get_all("To") == ["other@gateway.example"]


class TestHostileInput:
    @pytest.mark.parametrize(
        "subject",
        [
            pytest.param("x\r\nBcc: victim@evil.example", id="crlf"),
            pytest.param("x\nBcc: victim@evil.example", id="lf"),
            pytest.param("x\rBcc: victim@evil.example", id="cr"),
            pytest.param("x\u2028Bcc: victim@evil.example", id="unicode-line-separator"),
            pytest.param("x\r\n\r\nBcc: victim@evil.example", id="blank-line"),
        ],
    )
    def test_subject_cannot_inject_a_header(self, themes: Themes, case: dict, subject) -> None:
        case["case"]["subject"] = subject
        raw = themes.render("case_new", case).as_bytes()
        header_section = raw.split(b"\r\n\r\n", 1)[0]  # the body may show the text as-is
        assert b"\nBcc:" not in header_section and b"\rBcc:" not in header_section
        msg = email.message_from_bytes(raw, policy=default_policy)
        assert msg["Bcc"] is None
        assert msg["Subject"] == "x Bcc: victim@evil.example"
        assert msg["To"] == "desk@gateway.example"

    def test_to_cannot_inject_a_header(self, themes: Themes, case: dict) -> None:
        case["integration_address"] = "desk@gateway.example\r\nBcc: victim@evil.example"
        with pytest.raises(ThemeError, match="header To: invalid address") as info:
            themes.render("case_new", case)
        assert info.value.problems[0].file.endswith("case_new/message.txt.j2")

    def test_html_escapes_hostile_case_fields(self, themes: Themes, case: dict) -> None:
        case["case"]["subject"] = "<script>alert(1)</script>"
        case["case"]["description"] = '"><img src=x onerror=alert(1)>'
        case["case"]["link"] = 'https://x.example/" onmouseover="alert(1)'
        html = html_body(reparse(themes.render("case_new", case)))
        assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<img" not in html
        assert 'onmouseover="alert' not in html
        # The text part is plain text: shown as-is, never interpreted.
        assert "<script>alert(1)</script>" in reparse(themes.render("case_new", case))["Subject"]

    @pytest.mark.parametrize(
        "expression",
        [
            pytest.param("''.__class__.__mro__", id="mro"),
            pytest.param("case.__class__.__base__.__subclasses__()", id="subclasses"),
            pytest.param("cycler.__init__.__globals__", id="globals"),
            pytest.param("case.update({'id': 1})", id="mutation"),
        ],
    )
    def test_sandbox_refuses_internals(self, tmp_path: Path, expression: str) -> None:
        make_theme(
            tmp_path, "evil", f"To: a@x.example\nFrom: b@y.example\n\nok\n{{{{ {expression} }}}}\n"
        )
        with pytest.raises(ThemeError, match="sandbox") as info:
            Themes(tmp_path).render("evil", {"case": {"id": 29}})
        assert info.value.problems[0].line == 5

    def test_disallowed_header_name(self, tmp_path: Path) -> None:
        make_theme(tmp_path, "t", "To: a@x.example\nFrom: b@y.example\nBcc: c@z.example\n\nhi\n")
        with pytest.raises(ThemeError, match="'Bcc' not allowed"):
            Themes(tmp_path).render("t", {})


class TestErrors:
    def test_missing_variable_names_file_and_line(self, themes: Themes, case: dict) -> None:
        del case["case"]["priority"]
        with pytest.raises(ThemeError, match="priority") as info:
            themes.render("case_resolved", case)
        problem = info.value.problems[0]
        path = TEMPLATES / "case_resolved" / "message.txt.j2"
        assert problem.file == str(path)
        assert problem.line == line_of(path, "Priority:")
        assert str(problem).startswith(f"{path}:{problem.line}: ")

    def test_missing_variable_in_header_block(self, themes: Themes, case: dict) -> None:
        del case["integration_address"]
        with pytest.raises(ThemeError, match="integration_address") as info:
            themes.render("case_new", case)
        assert info.value.problems[0].line == 1

    def test_missing_variable_in_html(self, themes: Themes, case: dict) -> None:
        broken = copy.deepcopy(case)
        del broken["case"]["created_at"]
        path = TEMPLATES / "case_new" / "message.txt.j2"
        with pytest.raises(ThemeError) as info:
            themes.render("case_new", broken)
        assert info.value.problems[0].line == line_of(path, "Created:")

    @pytest.mark.parametrize(
        ("text", "html", "file", "line"),
        [
            pytest.param("To: {{ to\n\nbody\n", None, "message.txt.j2", 1, id="header"),
            pytest.param("To: a@x\n\none\ntwo\n{% if %}\n", None, "message.txt.j2", 5, id="body"),
            pytest.param("To: a@x\n\nok\n", "<p>\n{% endfor %}\n", "message.html.j2", 2, id="html"),
        ],
    )
    def test_syntax_error_names_file_and_line(self, tmp_path, text, html, file, line) -> None:
        make_theme(tmp_path, "broken", text, html)
        with pytest.raises(ThemeError) as info:
            Themes(tmp_path)
        problem = info.value.problems[0]
        assert problem.file == str(tmp_path / "broken" / file)
        assert problem.line == line

    def test_check_reports_every_broken_theme(self, tmp_path: Path) -> None:
        make_theme(
            tmp_path, "good", "To: {{ to }}\nFrom: b@y.example\n\nhi\n", sample={"to": "a@x"}
        )
        make_theme(tmp_path, "no_sample", "To: a@x\nFrom: b@y.example\n\nhi\n")
        make_theme(tmp_path, "undefined", "To: a@x\nFrom: b@y.example\n\n{{ nope }}\n", sample={})
        problems = check(tmp_path)
        assert [(Path(p.file).parent.name, p.line) for p in problems] == [
            ("no_sample", None),
            ("undefined", 4),
        ]

    def test_check_reports_syntax_errors(self, tmp_path: Path) -> None:
        make_theme(tmp_path, "bad", "To: a@x\n\n{% if %}\n")
        problems = check(tmp_path)
        assert len(problems) == 1 and problems[0].line == 3

    def test_bad_sample_json(self, tmp_path: Path) -> None:
        folder = make_theme(tmp_path, "t", "To: a@x\nFrom: b@y.example\n\nhi\n")
        (folder / "sample.json").write_text('{"a": 1,\n oops}')
        problems = check(tmp_path)
        assert problems[0].file.endswith("sample.json") and problems[0].line == 2
