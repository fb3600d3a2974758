"""Operator templates run with time and size budgets in an immutable sandbox, and nothing a mail
or a case carries can add a header to the mail the gateway sends."""

from __future__ import annotations

import email
import textwrap
import tracemalloc
from email.policy import default as default_policy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import RuleError, RuleEvaluationError
from gateway.mail.parse import ParsedMail
from gateway.rules import evaluate, load_ruleset
from gateway.rules.model import Condition, Extractor, Rule, Ruleset
from gateway.sandbox import BudgetedSandbox, BudgetExceeded
from gateway.store import Incident
from gateway.themes.render import Themes, incident_context, load_context

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def rule_file(tmp_path: Path, summary: str = "{{ subject }}", details: str = "") -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(
        textwrap.dedent(
            f"""\
            [[rule]]
            name = "new case"
            conditions = [{{ field = "body", op = "contains", value = "Status: New" }}]
            action = "trigger"
            summary = '''{summary}'''
            {details}
            """
        )
    )
    return path


def mail(body: str = "Status: New", subject: str = "Printer on fire") -> ParsedMail:
    return ParsedMail(subject=subject, from_="a@b", from_addr="a@b", to=("x@y",), text=body)


def ruleset(summary: str = "{{ subject }}", details=()) -> Ruleset:
    rule = Rule(
        name="r",
        conditions=(Condition(field="body", op="always"),),
        action="trigger",
        incident_key=Extractor(field="subject"),
        summary=summary,
        details=details,
    )
    return Ruleset(rules=(rule,))


def make_incident(summary: str, case_message_id: str) -> Incident:
    return Incident(
        service="helpdesk",
        incident_key="k",
        state="triggered",
        summary=summary,
        trigger_count=1,
        acknowledge_count=0,
        resolve_count=0,
        times_opened=1,
        first_seen=1.0,
        last_seen=1.0,
        opened_at=1.0,
        resolved_at=None,
        last_message=None,
        case_message_id=case_message_id,
    )


# --- time -------------------------------------------------------------------------------------


def test_check_refuses_a_rule_template_that_loops_past_its_time_budget(tmp_path: Path) -> None:
    path = rule_file(tmp_path, summary=NESTED_LOOPS)
    with pytest.raises(RuleError) as caught:
        load_ruleset([path])
    [problem] = caught.value.problems
    assert "budget" in problem.message and "longer than" in problem.message
    assert problem.line == 5  # the summary line


def test_a_template_that_loops_only_on_real_mail_quarantines_that_mail() -> None:
    """Passes check on the empty sample mail, then meets a 3,000-character body."""
    rules = ruleset(summary="{% for a in body %}{% for b in body %}{% endfor %}{% endfor %}x")
    with pytest.raises(RuleEvaluationError) as caught:
        evaluate(rules, mail(body="Status: New " + "y" * 3000))
    assert "longer than" in str(caught.value) and caught.value.rule == "r"


def test_the_time_budget_leaves_the_callers_tracer_in_place() -> None:
    import sys

    def tracer(*args):
        return None

    env = BudgetedSandbox(max_seconds=0.05)
    sys.settrace(tracer)
    try:
        with pytest.raises(BudgetExceeded):
            env.render(env.from_string(NESTED_LOOPS), {})
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)


# --- size -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        pytest.param("{{ 'x' * 10**9 }}", id="repeat"),
        pytest.param("{{ [1] * 10**9 }}", id="repeat-list"),
        pytest.param("{{ 10 ** 1000000000 }}", id="power"),
        pytest.param("{{ 'x' | center(10**9) }}", id="center-filter"),
        pytest.param("{{ 'x'.ljust(2000000000) }}", id="ljust-method"),
        pytest.param("{{ '{:>1000000000}'.format('x') }}", id="format-width"),
        pytest.param("{{ '{:>1000000000}'['format']('x') }}", id="format-by-item"),
        pytest.param("{{ '{:>{}}'.format('x', 1000000000) }}", id="format-argument"),
        pytest.param("{{ '%1000000000s' % 'x' }}", id="percent-width"),
        pytest.param(
            "{% set ns = namespace(s='x') %}{% for i in range(40) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            id="namespace-doubling",
        ),
        pytest.param("{{ ('x' * 900000) | replace('x', 'yy') }}", id="replace-growth"),
        pytest.param("{% for i in range(100000) %}{{ 'x' * 20 }}{% endfor %}", id="output"),
    ],
)
def test_values_beyond_the_size_budget_are_refused_before_they_are_built(source: str) -> None:
    env = BudgetedSandbox()
    tracemalloc.start()
    try:
        template = env.from_string(source)  # no constant folding of intercepted operators
        with pytest.raises(BudgetExceeded):
            env.render(template, {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 1024 * 1024


def test_check_refuses_a_huge_constant_in_a_rule_template(tmp_path: Path) -> None:
    with pytest.raises(RuleError) as caught:
        load_ruleset([rule_file(tmp_path, summary="{{ 'x' * 10**9 }}")])
    assert "budget" in caught.value.problems[0].message


def test_ordinary_templates_render_as_before() -> None:
    env = BudgetedSandbox()
    source = "{% for w in words %}{{ w | upper }}{{ '-' * 3 }}{% endfor %}{{ 2 ** 10 }}{{ 7 % 3 }}"
    assert env.render(env.from_string(source), {"words": ["a", "b"]}) == "A---B---10241"


# --- immutability -----------------------------------------------------------------------------


def test_rule_templates_cannot_change_what_goes_to_pagerduty() -> None:
    rules = ruleset(details=(("a", "1"), ("b", "{{ details.update({'a': 'rewritten'}) }}")))
    with pytest.raises(RuleEvaluationError) as caught:
        evaluate(rules, mail())
    assert "details.b" in str(caught.value)


# --- header injection -------------------------------------------------------------------------


def test_a_case_subject_with_a_file_separator_adds_no_header() -> None:
    themes = Themes(TEMPLATES)
    case = load_context(ROOT / "tests" / "fixtures" / "case29.json")
    case["case"]["subject"] = "Printer\x1cCc: victim@evil.example"
    msg = themes.render("case_new", case, default_from="gw@gateway.test")
    received = email.message_from_bytes(msg.as_bytes(), policy=default_policy)
    assert received["Cc"] is None
    assert received["Subject"] == "Printer Cc: victim@evil.example"


def test_a_message_id_with_a_group_separator_adds_no_header_to_incident_update() -> None:
    themes = Themes(TEMPLATES)
    incident = make_incident(summary="VPN down", case_message_id="x\x1cX-Injected: 1@evil")
    context = incident_context("trigger", incident, to=["desk@x.example"], from_addr="gw@x")
    msg = themes.render("incident_update", context, default_from="gw@x")
    received = email.message_from_bytes(msg.as_bytes(), policy=default_policy)
    assert received["X-Injected"] is None
    assert "\x1c" not in received["In-Reply-To"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(subject=st.text(min_size=1, max_size=80), message_id=st.text(max_size=40))
def test_no_text_in_a_header_value_changes_the_set_of_headers(subject: str, message_id: str):
    themes = Themes(TEMPLATES)
    incident = make_incident(summary=subject, case_message_id=message_id)
    context = incident_context("trigger", incident, to=["desk@x.example"], from_addr="gw@x")
    msg = themes.render("incident_update", context, default_from="gw@x")
    received = email.message_from_bytes(msg.as_bytes(), policy=default_policy)
    names = {name.lower() for name in received}
    expected = {"to", "from", "subject", "auto-submitted", "x-gateway-event", "x-gateway-service"}
    expected |= {"message-id", "date", "mime-version", "content-type"}
    expected |= {"x-gateway-loop"}  # the gateway's own mail carries its loop stamp
    assert expected <= names
    assert names - expected <= {"in-reply-to", "references", "content-transfer-encoding"}
    for name, value in received.items():
        assert not any(ch in str(value) for ch in LINE_BREAKS), (name, value)
