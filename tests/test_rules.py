"""Parsing rules: operators, keys, templates, evaluation order and file:line load errors."""

from __future__ import annotations

import hashlib
import textwrap
import time
from pathlib import Path

import pytest

from gateway.errors import RuleError, RuleEvaluationError
from gateway.mail.parse import ParsedMail
from gateway.rules import evaluate, load_ruleset, normalise_key
from gateway.rules.model import Condition, Decision, Extractor, Link, Rule, Ruleset

ROOT = Path(__file__).resolve().parent.parent
HELPDESK = ROOT / "parsing_rules" / "helpdesk.toml"


def mail(**kwargs: object) -> ParsedMail:
    defaults: dict[str, object] = {
        "subject": "Printer on fire",
        "from_": "Desk <support@desk.example>",
        "from_addr": "support@desk.example",
        "to": ("pd@gw.example",),
        "message_id": "abc@desk.example",
        "headers": {"x-desk-case": ("29",), "x-priority": ("1",)},
        "text": "Case #29 created\nRequester: Bob Example\nStatus: New\n",
    }
    defaults.update(kwargs)
    return ParsedMail(**defaults)  # type: ignore[arg-type]


def rule(*conditions: Condition, **kwargs: object) -> Rule:
    options: dict[str, object] = {"name": "r", "action": "trigger"}
    options.update(kwargs)
    return Rule(conditions=conditions, **options)  # type: ignore[arg-type]


def run(*rules: Rule, message: ParsedMail | None = None, **ruleset: object) -> Decision:
    return evaluate(Ruleset(rules=rules, **ruleset), message or mail())  # type: ignore[arg-type]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- operators

OPERATOR_CASES = [
    # (field, op, value, ignore_case, expected)
    ("body", "contains", "Status: New", False, True),
    ("body", "contains", "status: new", False, False),
    ("body", "contains", "status: new", True, True),
    ("body", "not_contains", "Status: Resolved", False, True),
    ("body", "not_contains", "Status: New", False, False),
    ("body", "not_contains", "STATUS: NEW", False, True),
    ("body", "not_contains", "STATUS: NEW", True, False),
    ("subject", "equals", "Printer on fire", False, True),
    ("subject", "equals", "printer ON fire", False, False),
    ("subject", "equals", "printer ON fire", True, True),
    ("subject", "equals", "Printer", False, False),
    ("subject", "not_equals", "Printer", False, True),
    ("subject", "not_equals", "PRINTER ON FIRE", False, True),
    ("subject", "not_equals", "PRINTER ON FIRE", True, False),
    ("subject", "starts_with", "Printer", False, True),
    ("subject", "starts_with", "printer", False, False),
    ("subject", "starts_with", "printer", True, True),
    ("subject", "ends_with", "fire", False, True),
    ("subject", "ends_with", "FIRE", False, False),
    ("subject", "ends_with", "FIRE", True, True),
    ("body", "ends_with", "Status: New", False, True),  # trailing newline trimmed
    ("body", "matches", r"Case #\d+", False, True),
    ("body", "matches", r"case #\d+", False, False),
    ("body", "matches", r"case #\d+", True, True),
    ("body", "not_matches", r"Case #\d+", False, False),
    ("body", "not_matches", r"case #\d+", False, True),
    ("body", "not_matches", r"case #\d+", True, False),
    ("subject", "always", "", False, True),
    ("subject", "always", "", True, True),
    ("from", "contains", "support@desk.example", False, True),
    ("to", "equals", "pd@gw.example", False, True),
    ("cc", "equals", "", False, True),
    ("headers.X-Desk-Case", "equals", "29", False, True),
    ("headers.x-missing", "equals", "", False, True),
    ("html", "contains", "<p>", False, False),
    ("subject", "contains", "STRASSE", True, True),  # casefold: ß == ss
]


@pytest.mark.parametrize(
    ("field", "op", "value", "ignore_case", "expected"),
    OPERATOR_CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2] or 'none'}-{'i' if c[3] else 'cs'}" for c in OPERATOR_CASES],
)
def test_operator(field: str, op: str, value: str, ignore_case: bool, expected: bool) -> None:
    subject = "Straße" if value == "STRASSE" else "Printer on fire"
    decision = run(rule(Condition(field, op, value, ignore_case)), message=mail(subject=subject))
    assert (decision.rule == "r") is expected
    assert decision.unmatched is not expected


# --------------------------------------------------------------------------- all / any / order

YES = Condition("body", "contains", "Status: New")
NO = Condition("body", "contains", "Status: Resolved")


@pytest.mark.parametrize(
    ("match", "conditions", "expected"),
    [
        ("all", (YES, YES), True),
        ("all", (YES, NO), False),
        ("any", (NO, YES), True),
        ("any", (NO, NO), False),
    ],
    ids=["all-yes", "all-one-no", "any-one-yes", "any-none"],
)
def test_match_all_any(match: str, conditions: tuple[Condition, ...], expected: bool) -> None:
    assert (run(rule(*conditions, match=match)).rule == "r") is expected


def test_all_trace_names_failing_condition() -> None:
    decision = run(rule(YES, NO))
    assert decision.trace[0].reason == 'condition 2 body contains "Status: Resolved": no'
    assert not decision.trace[0].matched


def test_first_match_wins_and_trace_records_every_rule() -> None:
    decision = run(
        rule(NO, name="resolved", action="resolve"),
        rule(YES, name="first", summary="first"),
        rule(YES, name="second", summary="second"),
    )
    assert decision.rule == "first"
    assert decision.summary == "first"
    assert [(s.rule, s.matched) for s in decision.trace] == [("resolved", False), ("first", True)]


def test_disabled_rule_is_skipped() -> None:
    decision = run(rule(YES, name="off", enabled=False), rule(YES, name="on"))
    assert decision.rule == "on"
    assert decision.trace[0].reason == "disabled"


def test_discard_rule_needs_no_key() -> None:
    decision = run(rule(YES, action="discard"), message=mail(subject=""))
    assert decision.action == "discard"
    assert decision.incident_key is None
    assert not decision.unmatched


# --------------------------------------------------------------------------- key extractors

KEY_CASES = [
    (Extractor("subject"), "Printer on fire"),
    (Extractor("subject", regex=r"on (\w+)"), "fire"),
    (Extractor("body", regex=r"Case #(\d+)"), "29"),
    (Extractor("body", regex=r"Case #\d+"), "Case #29"),  # no group: whole match
    (Extractor("body", regex=r"Case #(\d+).*\n.*: (\w+)"), "29-Bob"),  # groups joined with -
    (Extractor("body", regex=r"case #(\d+)", ignore_case=True), "29"),
    (Extractor("body", between=("Case #", " ")), "29"),
    (Extractor("body", between=("Requester: ", " Example")), "Bob"),
    (Extractor("body", between=("Requester: ", "NOT THERE")), "Bob Example"),  # end of line
    (Extractor("body", between=("case #", " "), ignore_case=True), "29"),
    (Extractor("body", after="Requester:"), "Bob Example"),
    (Extractor("body", after="REQUESTER:", ignore_case=True), "Bob Example"),
    (Extractor("subject", before=" on "), "Printer"),
    (Extractor("body", before=" Example"), "Requester: Bob"),  # same line only
    (Extractor("headers.X-Desk-Case"), "29"),
]


@pytest.mark.parametrize(
    ("extractor", "expected"), KEY_CASES, ids=[e.describe() for e, _ in KEY_CASES]
)
def test_key_extractor(extractor: Extractor, expected: str) -> None:
    decision = run(rule(YES, incident_key=extractor))
    assert decision.incident_key == expected


@pytest.mark.parametrize(
    "extractor",
    [
        Extractor("body", regex=r"Ticket (\d+)"),
        Extractor("body", between=("Ticket ", " ")),
        Extractor("body", after="Ticket:"),
        Extractor("body", before="Ticket"),
        Extractor("body", regex=r"Case #(X)?"),  # group did not participate
    ],
    ids=["regex", "between", "after", "before", "empty-match"],
)
def test_key_not_found_means_rule_does_not_match(extractor: Extractor) -> None:
    decision = run(rule(YES, name="keyed", incident_key=extractor), rule(YES, name="fallback"))
    assert decision.rule == "fallback"
    assert "incident key not found" in decision.trace[0].reason


def test_empty_subject_key_does_not_match() -> None:
    decision = run(rule(YES), message=mail(subject=" Re: "))
    assert decision.unmatched
    assert "incident key not found" in decision.trace[0].reason


# --------------------------------------------------------------------------- normalisation

NORMALISE_CASES = [
    ("  Printer   on\tfire \n", (), "Printer on fire"),
    ("Re: Printer", (), "Printer"),
    ("RE: Printer", (), "Printer"),
    ("re: Printer", (), "Printer"),
    ("Fwd: Printer", (), "Printer"),
    ("FW: Printer", (), "Printer"),
    ("Fw: Printer", (), "Printer"),
    ("AW: Printer", (), "Printer"),
    ("WG: Printer", (), "Printer"),
    ("SV: Printer", (), "Printer"),
    ("VS: Printer", (), "Printer"),
    ("Antw: Printer", (), "Printer"),
    ("回复: Printer", (), "Printer"),
    ("回复：Printer", (), "Printer"),
    ("转发: Printer", (), "Printer"),
    ("Re : Printer", (), "Printer"),
    ("Re[2]: Printer", (), "Printer"),
    ("Re: Re: RE: Printer", (), "Printer"),
    ("RE: Fwd: AW: [Desk] Subject  with   spaces ", ("[Desk]",), "Subject with spaces"),
    ("[desk] Re: [EXTERNAL] Fwd: Printer", ("[Desk]", "[EXTERNAL]"), "Printer"),
    ("[Desk] Printer", (), "[Desk] Printer"),  # tags only when listed
    ("Review: Printer", (), "Review: Printer"),  # not a prefix
    ("Printer Re: again", (), "Printer Re: again"),  # only prefixes
    ("Re:", (), ""),
]


@pytest.mark.parametrize(
    ("text", "tags", "expected"),
    NORMALISE_CASES,
    ids=[c[0].strip() or "blank" for c in NORMALISE_CASES],
)
def test_normalise_key(text: str, tags: tuple[str, ...], expected: str) -> None:
    assert normalise_key(text, tags) == expected


def test_normalise_short_key_is_not_cut() -> None:
    assert normalise_key("x" * 255) == "x" * 255


def test_normalise_long_key_cut_with_hash() -> None:
    long_key = "y" * 400
    key = normalise_key(long_key)
    digest = hashlib.sha256(long_key.encode()).hexdigest()[:12]
    assert len(key) == 255
    assert key == "y" * 242 + "~" + digest


def test_long_keys_with_common_prefix_do_not_collide() -> None:
    prefix = "P" * 300
    first, second = normalise_key(prefix + " alpha"), normalise_key(prefix + " beta")
    assert first != second
    assert len(first) <= 255 and len(second) <= 255


def test_reply_and_original_share_key_through_rules() -> None:
    rules = Ruleset(rules=(rule(YES),), strip_tags=("[Desk]",))
    original = evaluate(rules, mail(subject="[Desk] Printer on fire"))
    reply = evaluate(rules, mail(subject="RE:  Fwd: [DESK]  Printer on fire  "))
    assert original.incident_key == reply.incident_key == "Printer on fire"


# --------------------------------------------------------------------------- templates


def test_summary_template_uses_context() -> None:
    summary = (
        "{{ rule }}|{{ key }}|{{ sender }}|{{ from_ }}|{{ from_addr }}|{{ to }}|"
        "{{ headers['x-priority'] }}|{{ message_id }}|{{ details.case }}"
    )
    details = (("case", Extractor("body", regex=r"Case #(\d+)")),)
    decision = run(rule(YES, summary=summary, details=details))
    assert decision.summary == (
        "r|Printer on fire|Desk <support@desk.example>|Desk <support@desk.example>|"
        "support@desk.example|pd@gw.example|1|abc@desk.example|29"
    )


def test_summary_collapses_whitespace_and_cuts_at_1024() -> None:
    decision = run(
        rule(YES, summary="{{ body }}"), message=mail(text="a  b\n\nStatus: New " + "c" * 3000)
    )
    assert len(decision.summary) == 1024
    assert decision.summary.startswith("a b Status: New ccc")
    assert decision.summary.endswith("c…")


def test_default_summary_and_empty_subject() -> None:
    assert run(rule(YES)).summary == "Printer on fire"
    keyed = rule(YES, incident_key=Extractor("body", regex=r"Case #(\d+)"))
    assert run(keyed, message=mail(subject="")).summary == "(no subject)"


@pytest.mark.parametrize(
    ("severity", "expected"),
    [
        ("warning", "warning"),
        ("{{ 'error' if headers['x-priority'] == '1' else 'info' }}", "error"),
        ("{% if 'fire' in subject %}CRITICAL{% else %}info{% endif %}", "critical"),
    ],
    ids=["fixed", "template", "template-uppercase"],
)
def test_severity(severity: str, expected: str) -> None:
    assert run(rule(YES, severity=severity)).severity == expected


def test_invalid_rendered_severity_raises() -> None:
    with pytest.raises(RuleEvaluationError, match="severity template rendered 'high'"):
        run(rule(YES, severity="{{ 'high' }}"))


def test_template_render_error_raises() -> None:
    with pytest.raises(RuleEvaluationError, match="summary template failed"):
        run(rule(YES, summary="{{ headers['x-nope'] }}"))


def test_sandbox_blocks_unsafe_attributes() -> None:
    with pytest.raises(RuleEvaluationError):
        run(rule(YES, summary="{{ subject.__class__.__mro__ }}"))


def test_templates_not_rendered_for_rules_that_do_not_match() -> None:
    broken = rule(NO, name="broken", summary="{{ headers['x-nope'] }}")
    assert run(broken, rule(YES)).rule == "r"


def test_details_and_links() -> None:
    details = (
        ("case", Extractor("body", regex=r"Case #(\d+)")),
        ("ticket", Extractor("body", after="Ticket:")),  # not found -> ""
        ("who", "{{ details.case }} by {{ sender }}"),
    )
    links = (
        Link("https://desk.example/case/{{ details.case }}", "Case {{ details.case }}"),
        Link("{% if details.ticket %}https://t/{{ details.ticket }}{% endif %}", "dropped"),
        Link("https://static.example"),
    )
    decision = run(rule(YES, details=details, links=links))
    assert decision.details == {
        "case": "29",
        "ticket": "",
        "who": "29 by Desk <support@desk.example>",
    }
    assert decision.links == (
        {"href": "https://desk.example/case/29", "text": "Case 29"},
        {"href": "https://static.example", "text": "https://static.example"},
    )


def test_detail_values_are_capped() -> None:
    details = (("body", "{{ body }}"),)
    decision = run(rule(YES, details=details), message=mail(text="z" * 10000 + " Status: New"))
    assert len(decision.details["body"]) == 4000


# --------------------------------------------------------------------------- unmatched


def test_unmatched_discard_is_default() -> None:
    decision = run(rule(NO))
    assert decision.unmatched and decision.rule is None
    assert decision.action == "discard"
    assert decision.incident_key is None
    assert decision.reason == "no rule matched (1 rule(s) tried); [unmatched] action = discard"


def test_unmatched_trigger_generic_alert() -> None:
    decision = run(
        rule(NO),
        message=mail(subject="Re: [Desk] Disk full"),
        unmatched_action="trigger",
        unmatched_severity="error",
        strip_tags=("[Desk]",),
    )
    assert decision.unmatched and decision.action == "trigger"
    assert decision.incident_key == "Disk full"
    assert decision.summary == "Re: [Desk] Disk full"
    assert decision.severity == "error"


def test_unmatched_trigger_without_subject_keys_by_message_id() -> None:
    decision = run(message=mail(subject=""), unmatched_action="trigger")
    assert decision.incident_key == "no-subject:abc@desk.example"
    assert decision.severity == "warning"
    assert decision.summary == "(no subject)"


# --------------------------------------------------------------------------- regex timeout


def test_catastrophic_regex_times_out_as_evaluation_error() -> None:
    evil = Condition("body", "matches", r"(a+)+$")
    started = time.monotonic()
    with pytest.raises(RuleEvaluationError) as caught:
        evaluate(
            Ruleset(rules=(rule(evil, name="evil"),)),
            mail(text="a" * 50000 + "!"),
            regex_timeout=0.2,
        )
    assert time.monotonic() - started < 3
    assert caught.value.rule == "evil"
    assert "timed out after 0.2s on field body" in caught.value.reason


def test_catastrophic_extractor_regex_times_out() -> None:
    evil = Extractor("body", regex=r"(a+)+$")
    with pytest.raises(RuleEvaluationError, match="timed out"):
        evaluate(
            Ruleset(rules=(rule(Condition("body", "always"), incident_key=evil),)),
            mail(text="a" * 50000 + "!"),
            regex_timeout=0.2,
        )


# --------------------------------------------------------------------------- loading


def load_error(*paths: Path) -> str:
    with pytest.raises(RuleError) as caught:
        load_ruleset(list(paths))
    return str(caught.value)


GOOD_RULE = """
    [[rule]]
    name = "ok"
    conditions = [ { field = "body", op = "contains", value = "x" } ]
    action = "trigger"
"""

LOAD_ERRORS = {
    "toml-syntax": (
        """
        [[rule]]
        name = "broken
        action = "trigger"
        """,
        2,
        "TOML syntax error",
    ),
    "unknown-op": (
        """
        [[rule]]
        name = "a"
        conditions = [
          { field = "body", op = "contains", value = "x" },
          { field = "body", op = "contain", value = "y" },
        ]
        action = "trigger"
        """,
        5,
        "unknown op 'contain'",
    ),
    "bad-regex": (
        """
        [[rule]]
        name = "a"
        action = "trigger"
        conditions = [ { field = "body", op = "always" },
                       { field = "body", op = "matches", value = 'Case #(\\d+' } ]
        """,
        5,
        "bad regex 'Case #(\\d+': missing )",
    ),
    "bad-template": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        action = "trigger"

        summary = "{{ subject "
        """,
        6,
        "bad template",
    ),
    "bad-template-multiline": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        action = "trigger"
        summary = \"\"\"
        {{ subject }}
        {% if x %}
        \"\"\"
        """,
        7,
        "bad template",
    ),
    "unknown-template-variable": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        action = "trigger"
        links = [ { href = "https://x/{{ ky }}" } ]
        """,
        5,
        "unknown template variable(s) ky",
    ),
    "unknown-field": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "bdy", op = "contains", value = "x" } ]
        action = "trigger"
        """,
        3,
        "unknown field 'bdy'",
    ),
    "unknown-rule-key": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        action = "trigger"
        sumary = "x"
        """,
        5,
        "unknown key 'sumary'",
    ),
    "unknown-condition-key": (
        """
        [[rule]]
        name = "a"
        conditions = [
          { field = "body", op = "contains", vaule = "x" },
        ]
        action = "trigger"
        """,
        4,
        "unknown key 'vaule'",
    ),
    "unknown-extractor-key": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        action = "trigger"

        [rule.incident_key]
        field = "subject"
        regexp = "x"
        """,
        8,
        "unknown key 'regexp'",
    ),
    "unknown-top-level-key": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        action = "trigger"

        [unmatch]
        action = "discard"
        """,
        6,
        "unknown top-level key 'unmatch'",
    ),
    "missing-action": (
        """
        # comment
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        """,
        2,
        "missing action",
    ),
    "unknown-action": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        action = "page"
        """,
        4,
        "unknown action 'page'",
    ),
    "invalid-severity": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        action = "trigger"
        severity = "high"
        """,
        5,
        "invalid severity 'high'",
    ),
    "missing-value": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" }, { field = "body", op = "equals" } ]
        action = "trigger"
        """,
        3,
        "missing value",
    ),
    "bad-between": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        action = "trigger"
        incident_key = { field = "body", between = ["Case #"] }
        """,
        5,
        "between must be two non-empty strings",
    ),
    "two-extractors": (
        """
        [[rule]]
        name = "a"
        conditions = [ { field = "body", op = "always" } ]
        action = "trigger"
        details = { case = { field = "body", after = "x", before = "y" } }
        """,
        5,
        "use at most one of",
    ),
    "second-rule": (
        GOOD_RULE
        + """
        [[rule]]
        name = "b"
        conditions = [ { op = "always" },
          { field = "headers.", op = "equals", value = "" } ]
        action = "trigger"
        """,
        9,
        "unknown field 'headers.'",
    ),
    "empty-conditions": (
        """
        [[rule]]
        name = "a"
        conditions = []
        action = "trigger"
        """,
        1,
        "conditions must be a non-empty list",
    ),
    "single-brackets": (
        """
        [rule]
        name = "a"
        """,
        1,
        "[[rule]] (double brackets)",
    ),
}


@pytest.mark.parametrize(("source", "line", "message"), LOAD_ERRORS.values(), ids=list(LOAD_ERRORS))
def test_load_error_names_file_and_line(
    tmp_path: Path, source: str, line: int, message: str
) -> None:
    path = write(tmp_path, "rules.toml", source)
    error = load_error(path)
    assert f"{path}:{line}:" in error
    assert message in error
    located = [p for p in error.splitlines() if message in p]
    assert located and located[0].startswith(f"{path}:{line}:")


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a.toml", GOOD_RULE)
    second = tmp_path / "b.toml"
    second.write_text("\n\n" + textwrap.dedent(GOOD_RULE).replace('"ok"', '"OK"'))
    error = load_error(first, second)
    assert (
        f"{second}:5: [rule 'OK'.name]: duplicate rule name 'OK' (first defined at {first}:1)"
        in error
    )


def test_two_unmatched_tables_across_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a.toml", '[unmatched]\naction = "discard"\n')
    second = write(tmp_path, "b.toml", '# x\n[unmatched]\naction = "trigger"\n')
    assert f"{second}:2: [unmatched]: [unmatched] is already defined at {first}:1" in load_error(
        first, second
    )


def test_all_problems_across_files_are_reported(tmp_path: Path) -> None:
    first = write(tmp_path, "a.toml", "x = 1\n")
    second = write(tmp_path, "b.toml", "[[rule]]\nname = 'a'\nconditions = [{op='always'}]\n")
    with pytest.raises(RuleError) as caught:
        load_ruleset([first, second])
    assert [(p.file, p.line) for p in caught.value.problems] == [(str(first), 1), (str(second), 1)]


def test_missing_file_is_a_problem(tmp_path: Path) -> None:
    assert "cannot read rule file" in load_error(tmp_path / "nope.toml")


def test_load_full_rule_and_tags(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "rules.toml",
        """
        [keys]
        strip_tags = ["[Desk]"]

        [[rule]]
        name = "new"
        match = "any"
        conditions = [
          { field = "body", op = "contains", value = "status: new", ignore_case = true },
          { field = "headers.X-Desk-Status", op = "equals", value = "new" },
        ]
        action = "trigger"
        incident_key = { field = "subject", regex = 'Case #(\\d+)' }
        summary = "Case {{ key }}: {{ subject }}"
        severity = "{{ 'warning' }}"
        details = { requester = { field = "body", after = "Requester:" }, n = "{{ key }}" }
        links = [ { href = "https://desk.example/{{ key }}", text = "Case" } ]

        [[rule]]
        name = "catch all"
        enabled = false
        conditions = [ { op = "always" } ]
        action = "discard"

        [unmatched]
        action = "trigger"
        severity = "info"
        """,
    )
    ruleset = load_ruleset([path])
    assert [(r.name, r.line, r.enabled) for r in ruleset.rules] == [
        ("new", 4, True),
        ("catch all", 18, False),
    ]
    assert ruleset.strip_tags == ("[Desk]",)
    assert (ruleset.unmatched_action, ruleset.unmatched_severity) == ("trigger", "info")
    decision = evaluate(ruleset, mail(subject="[Desk] Case #29: Printer on fire"))
    assert decision.incident_key == "29"
    assert decision.summary == "Case 29: [Desk] Case #29: Printer on fire"
    assert decision.severity == "warning"
    assert decision.details == {"requester": "Bob Example", "n": "29"}
    assert decision.links == ({"href": "https://desk.example/29", "text": "Case"},)
    assert decision.reason == f'matched rule "new" ({path}:4)'


# --------------------------------------------------------------------------- default ruleset


@pytest.fixture(scope="module")
def helpdesk() -> Ruleset:
    return load_ruleset([HELPDESK])


def test_helpdesk_new_case_triggers_keyed_by_subject(helpdesk: Ruleset) -> None:
    decision = evaluate(helpdesk, mail(subject="Printer  on fire "))
    assert decision.rule == "new case"
    assert decision.action == "trigger"
    assert decision.incident_key == "Printer on fire"
    assert decision.summary == "Printer on fire"
    assert decision.severity == "critical"
    assert decision.details["case"] == "29"
    assert decision.details["requester"] == "Bob Example"
    assert decision.links[0]["href"].endswith("/agent/case/29")


def test_helpdesk_reply_resolved_resolves_same_key(helpdesk: Ruleset) -> None:
    new = evaluate(helpdesk, mail(subject="Printer on fire"))
    body = "Your case was resolved.\nStatus: Resolved\n\n> Status: New\n"
    resolved = evaluate(helpdesk, mail(subject="Re: Printer on fire", text=body))
    assert resolved.rule == "resolved case"
    assert resolved.action == "resolve"
    assert resolved.incident_key == new.incident_key == "Printer on fire"


def test_helpdesk_second_new_mail_has_same_key(helpdesk: Ruleset) -> None:
    first = evaluate(helpdesk, mail())
    second = evaluate(helpdesk, mail(message_id="other@desk.example"))
    assert first.incident_key == second.incident_key


def test_helpdesk_open_is_disabled_and_other_mail_discarded(helpdesk: Ruleset) -> None:
    decision = evaluate(helpdesk, mail(text="Status: Open\n"))
    assert decision.unmatched and decision.action == "discard"
    assert ("opened case", False, "disabled") in [
        (s.rule, s.matched, s.reason) for s in decision.trace
    ]


def test_helpdesk_link_dropped_without_case_number(helpdesk: Ruleset) -> None:
    decision = evaluate(helpdesk, mail(text="Status: New\n"))
    assert decision.links == ()
    assert decision.details["case"] == ""


@pytest.mark.parametrize("subject", ["[Desk] VPN down", "Re: VPN down", "RE: [EXTERNAL] VPN down"])
def test_the_default_rules_key_tagged_and_replied_subjects_alike(subject: str) -> None:
    ruleset = load_ruleset([HELPDESK])
    decision = evaluate(ruleset, mail(subject=subject, text="Status: New\n"))
    assert (decision.action, decision.incident_key) == ("trigger", "VPN down")
