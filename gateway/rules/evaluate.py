"""Evaluation, the hot path: first matching rule wins, and the trace says why.

Everything is compiled once at load time, templates are rendered only for the rule that matched,
and field texts are case-folded at most once per message.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import regex

from gateway.errors import RuleEvaluationError
from gateway.mail.parse import ParsedMail
from gateway.rules.keys import normalise_key
from gateway.rules.model import (
    DEFAULT_SUMMARY,
    KEYED_ACTIONS,
    MAX_DETAIL,
    MAX_NOTE,
    MAX_SUMMARY,
    NO_SUBJECT,
    SEVERITIES,
    Condition,
    Decision,
    Extractor,
    Filter,
    PagerDutyDecision,
    Rule,
    Ruleset,
    TraceStep,
)
from gateway.rules.templates import render
from gateway.schedules import Schedule, is_within

# --------------------------------------------------------------------------- per-message fields


class _Fields:
    """Field texts of one message, computed and case-folded at most once per evaluation."""

    __slots__ = ("_folded", "_stripped", "_text", "at", "mail")

    def __init__(self, mail: ParsedMail, at: float | None = None) -> None:
        self.mail = mail
        self.at = at  # the instant `time` conditions judge: when the mail was accepted
        self._text: dict[str, str] = {}
        self._folded: dict[str, str] = {}
        self._stripped: dict[str, str] = {}

    def instant(self) -> float:
        """`at`, or now (read once) when the caller gave none, e.g. `gateway test-rules`."""
        if self.at is None:
            self.at = time.time()
        return self.at

    def text(self, name: str) -> str:
        value = self._text.get(name)
        if value is None:
            value = self._text[name] = self.mail.field(name)
        return value

    def folded(self, name: str) -> str:
        value = self._folded.get(name)
        if value is None:
            value = self._folded[name] = self.text(name).casefold()
        return value

    def stripped(self, name: str, ignore_case: bool) -> str:
        """Whole-field comparisons ignore surrounding whitespace (bodies end with newlines)."""
        cache_key = name + "\0" + ("i" if ignore_case else "")
        value = self._stripped.get(cache_key)
        if value is None:
            source = self.folded(name) if ignore_case else self.text(name)
            value = self._stripped[cache_key] = source.strip()
        return value


class _Within(Mapping[str, bool]):
    """The `within` template name: schedule name -> whether the mail arrived within it,
    judged only for the names a template reads."""

    def __init__(self, schedules: tuple[Schedule, ...], at: float) -> None:
        self._schedules = {s.name: s for s in schedules}
        self._at = at

    def __getitem__(self, name: str) -> bool:
        return is_within(self._schedules[name], self._at)

    def __iter__(self) -> Iterator[str]:
        return iter(self._schedules)

    def __len__(self) -> int:
        return len(self._schedules)


def _search(
    pattern: regex.Pattern[str], text: str, timeout: float, rule: str, field_name: str
) -> regex.Match[str] | None:
    """Every operator regex runs with a timeout; a timeout quarantines the message."""
    try:
        return pattern.search(text, timeout=timeout)
    except TimeoutError:
        raise RuleEvaluationError(
            rule,
            f"regex {pattern.pattern!r} timed out after {timeout:g}s on field {field_name}",
        ) from None


# --------------------------------------------------------------------------- conditions


_STRING_OPS: dict[str, Callable[[str, str], bool]] = {
    "contains": lambda text, value: value in text,
    "not_contains": lambda text, value: value not in text,
    "equals": lambda text, value: text == value,
    "not_equals": lambda text, value: text != value,
    "starts_with": lambda text, value: text.startswith(value),
    "ends_with": lambda text, value: text.endswith(value),
}
_WHOLE_FIELD_OPS = frozenset({"equals", "not_equals", "starts_with", "ends_with"})


def _test(cond: Condition, fields: _Fields, timeout: float, rule: str) -> bool:
    """Evaluate one condition against the message."""
    op = cond.op
    if op == "always":
        return True
    if cond._schedule is not None:
        return is_within(cond._schedule, fields.instant()) == (op == "within")
    if cond._pattern is not None:
        found = _search(cond._pattern, fields.text(cond.field), timeout, rule, cond.field)
        return (found is not None) == (op == "matches")
    if op in _WHOLE_FIELD_OPS:
        text = fields.stripped(cond.field, cond.ignore_case)
    else:
        text = fields.folded(cond.field) if cond.ignore_case else fields.text(cond.field)
    return _STRING_OPS[op](text, cond._folded if cond.ignore_case else cond.value)


def _match(rule: Rule, fields: _Fields, timeout: float) -> tuple[bool, str]:
    """(matched, reason) for a rule's conditions."""
    return _match_conditions(rule.conditions, rule.match, fields, timeout, rule.name)


def _match_conditions(
    conds: tuple[Condition, ...], match: str, fields: _Fields, timeout: float, name: str
) -> tuple[bool, str]:
    """(matched, reason) for rules and filters alike; all short-circuits on the first 'no'."""
    if match == "any":
        for number, cond in enumerate(conds, 1):
            if _test(cond, fields, timeout, name):
                return True, f"condition {number} {cond.describe()}: yes (any)"
        return False, f"none of {_count(len(conds))} matched (any)"
    for number, cond in enumerate(conds, 1):
        if not _test(cond, fields, timeout, name):
            return False, f"condition {number} {cond.describe()}: no"
    return True, f"all {_count(len(conds))} matched"


def _match_filter(stop: Filter, fields: _Fields, timeout: float) -> tuple[bool, str]:
    """(passed, reason) for a [filter]: the same condition logic as a rule's `match`."""
    return _match_conditions(stop.conditions, stop.mode, fields, timeout, "[filter]")


def _count(number: int) -> str:
    return f"{number} condition" if number == 1 else f"{number} conditions"


# --------------------------------------------------------------------------- extraction


def _find(
    text: str, marker: str, compiled: regex.Pattern[str] | None, start: int = 0
) -> tuple[int, int] | None:
    """(start, end) of a marker; case-insensitive markers use their precompiled regex."""
    if compiled is not None:
        found = compiled.search(text, start)
        return None if found is None else found.span()
    index = text.find(marker, start)
    return None if index < 0 else (index, index + len(marker))


def _line_end(text: str, start: int) -> int:
    end = text.find("\n", start)
    return len(text) if end < 0 else end


def extract(ex: Extractor, fields: _Fields, timeout: float, rule: str) -> str | None:
    """Text selected by an extractor, stripped; None when the marker/regex is not found.

    between: text after the first `start` up to the next `end` (or the end of that line when
    `end` never follows); after: rest of the line; before: the line's text before the marker.
    """
    text = fields.text(ex.field)
    compiled = ex._compiled
    if ex.regex is not None:
        found = _search(compiled[0], text, timeout, rule, ex.field)  # type: ignore[arg-type]
        if found is None:
            return None
        if not found.re.groups:
            return found.group(0).strip()
        return "-".join(g.strip() for g in found.groups() if g and g.strip())
    if ex.between is not None:
        first = _find(text, ex.between[0], compiled[0] if compiled else None)
        if first is None:
            return None
        last = _find(text, ex.between[1], compiled[1] if compiled else None, first[1])
        stop = last[0] if last is not None else _line_end(text, first[1])
        return text[first[1] : stop].strip()
    if ex.after is not None:
        found_at = _find(text, ex.after, compiled[0] if compiled else None)
        if found_at is None:
            return None
        return text[found_at[1] : _line_end(text, found_at[1])].strip()
    if ex.before is not None:
        found_at = _find(text, ex.before, compiled[0] if compiled else None)
        if found_at is None:
            return None
        return text[text.rfind("\n", 0, found_at[0]) + 1 : found_at[0]].strip()
    return text.strip()


# --------------------------------------------------------------------------- rendering


def _context(
    mail: ParsedMail, key: str | None, rule: str, within: Mapping[str, bool]
) -> dict[str, Any]:
    """The names templates see; `from` is a Jinja keyword, hence `from_` and `sender`."""
    return {
        "subject": mail.subject,
        "body": mail.text,
        "html": mail.html,
        "from_": mail.from_,
        "sender": mail.from_,
        "from_addr": mail.from_addr,
        "to": ", ".join(mail.to),
        "cc": ", ".join(mail.cc),
        "headers": {name: values[0] for name, values in mail.headers.items() if values},
        "message_id": mail.message_id,
        "date": mail.date.isoformat() if mail.date else "",
        "key": key or "",
        "rule": rule,
        "details": {},
        "within": within,
    }


def _collapse(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _summary(source: str, context: Mapping[str, Any], rule: str, mail: ParsedMail) -> str:
    text = mail.subject if source == DEFAULT_SUMMARY else render(source, context, rule, "summary")
    summary = _collapse(text, MAX_SUMMARY)
    return summary or _collapse(mail.subject, MAX_SUMMARY) or NO_SUBJECT


def _severity(source: str, context: Mapping[str, Any], rule: str) -> str:
    value = render(source, context, rule, "severity").strip().lower()
    if value not in SEVERITIES:
        raise RuleEvaluationError(
            rule, f"severity template rendered {value!r}, not one of {', '.join(SEVERITIES)}"
        )
    return value


def _details(rule: Rule, fields: _Fields, ctx: dict[str, Any], timeout: float) -> dict[str, str]:
    """Details in file order; later templates can use earlier ones via `details`."""
    details: dict[str, str] = ctx["details"]
    for name, spec in rule.details:
        if isinstance(spec, Extractor):
            value = extract(spec, fields, timeout, rule.name) or ""
        else:
            value = render(spec, ctx, rule.name, f"details.{name}").strip()
        details[name] = value if len(value) <= MAX_DETAIL else value[: MAX_DETAIL - 1] + "…"
    return details


def _links(rule: Rule, ctx: Mapping[str, Any]) -> tuple[dict[str, str], ...]:
    links = []
    for link in rule.links:
        href = render(link.href, ctx, rule.name, "links.href").strip()
        if href:
            text = render(link.text, ctx, rule.name, "links.text").strip() if link.text else ""
            links.append({"href": href, "text": _collapse(text, MAX_SUMMARY) or href})
    return tuple(links)


# --------------------------------------------------------------------------- evaluation


def evaluate(
    ruleset: Ruleset, mail: ParsedMail, *, regex_timeout: float = 0.5, at: float | None = None
) -> Decision:
    """First enabled matching rule wins; the trace records every rule tried and why.

    `at` is the instant `time` conditions and `within` judge: the processor passes when the
    mail was accepted, so a backlog or a replay decides as it would have on arrival; without
    it, now. Raises RuleEvaluationError (regex timeout, failing template) so the caller
    quarantines.
    """
    fields = _Fields(mail, at)
    trace: list[TraceStep] = []
    for stop in ruleset.filters:
        passed, why = _match_filter(stop, fields, regex_timeout)
        trace.append(TraceStep(stop.label, passed, why))
        if not passed:
            return _filtered(stop, mail, tuple(trace), why)
    for rule in ruleset.rules:
        if not rule.enabled:
            trace.append(TraceStep(rule.name, False, "disabled"))
            continue
        matched, why = _match(rule, fields, regex_timeout)
        key = None
        if matched and rule.action in KEYED_ACTIONS:
            key = _key(rule, fields, regex_timeout, ruleset.strip_tags)
            if not key:
                why = f"{why}, but incident key not found ({rule.describe_key()})"
                matched = False
            else:
                why = f'{why}; key "{key}"'
        trace.append(TraceStep(rule.name, matched, why))
        if matched:
            return _decide(ruleset, rule, mail, fields, key, tuple(trace), regex_timeout)
    return _unmatched(ruleset, mail, tuple(trace), fields)


def _key(rule: Rule, fields: _Fields, timeout: float, tags: tuple[str, ...]) -> str:
    """The normalised key from the first of the rule's key extractors that finds one."""
    raw = extract(rule.incident_key, fields, timeout, rule.name)
    key = normalise_key(raw, tags) if raw else ""
    for extractor in rule.key_fallbacks:
        if key:
            break
        raw = extract(extractor, fields, timeout, rule.name)
        key = normalise_key(raw, tags) if raw else ""
    return key


def _decide(
    ruleset: Ruleset,
    rule: Rule,
    mail: ParsedMail,
    fields: _Fields,
    key: str | None,
    trace: tuple[TraceStep, ...],
    timeout: float,
) -> Decision:
    ctx = _context(mail, key, rule.name, _Within(ruleset.schedules, fields.instant()))
    details = _details(rule, fields, ctx, timeout)
    where = f" ({rule.where})" if rule.where else ""
    return Decision(
        rule=rule.name,
        action=rule.action,
        incident_key=key,
        summary=_summary(rule.summary, ctx, rule.name, mail),
        severity=_severity(rule.severity, ctx, rule.name),
        details=details,
        links=_links(rule, ctx),
        trace=trace,
        reason=f'matched rule "{rule.name}"{where}',
        rest=_rest(rule, ctx),
    )


def _rest(rule: Rule, ctx: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The rule's REST actions, with its note rendered (cut to PagerDuty's limit)."""
    actions = []
    for name, value in rule.rest:
        if name == "add_note":
            value = render(value, ctx, rule.name, "add_note").strip()[:MAX_NOTE]
            if not value:
                continue  # an empty note is no note
        actions.append((name, value))
    return tuple(actions)


def _filtered(stop: Filter, mail: ParsedMail, trace: tuple[TraceStep, ...], why: str) -> Decision:
    """Stopped by a [filter]: no rule is tried, nothing is sent; the mail is kept, visible."""
    return Decision(
        rule=None,
        action="discard",
        incident_key=None,
        summary=_collapse(mail.subject, MAX_SUMMARY) or NO_SUBJECT,
        severity="",
        details={},
        links=(),
        trace=trace,
        reason=f"filtered by {stop.label}: {why}",
        filtered=True,
    )


def _unmatched(
    ruleset: Ruleset, mail: ParsedMail, trace: tuple[TraceStep, ...], fields: _Fields
) -> Decision:
    """No rule matched: discard (kept, visible) or a generic alert keyed by the subject."""
    action = ruleset.unmatched_action
    key = None
    if action == "trigger":
        key = normalise_key(mail.subject, ruleset.strip_tags)
        if not key:  # one alert per subject-less mail; redeliveries share the Message-ID
            key = f"no-subject:{mail.message_id}" if mail.message_id else NO_SUBJECT
    ctx = _context(mail, key, "[unmatched]", _Within(ruleset.schedules, fields.instant()))
    tried = f"{len(trace)} rule(s) tried" if trace else "no rules"
    return Decision(
        rule=None,
        action=action,
        incident_key=key,
        summary=_summary(ruleset.unmatched_summary, ctx, "[unmatched]", mail),
        severity=_severity(ruleset.unmatched_severity, ctx, "[unmatched]"),
        details={},
        links=(),
        trace=trace,
        reason=f"no rule matched ({tried}); [unmatched] action = {action}",
        unmatched=True,
    )


def conditions_match(
    conditions: tuple[Condition, ...],
    mail: ParsedMail,
    *,
    match: str = "all",
    at: float | None = None,
    regex_timeout: float = 0.5,
    name: str = "conditions",
) -> bool:
    """Whether a mail meets conditions that belong to no rule (a `[[heartbeat]]`'s), judged
    as a rule's are. Raises RuleEvaluationError on a regex timeout."""
    probe = Rule(name=name, conditions=conditions, action="discard", match=match)
    return _match(probe, _Fields(mail, at), regex_timeout)[0]


# --------------------------------------------------------------------------- reverse rules


class _EventFields:
    """A PagerDuty event's fields (`PAGERDUTY_FIELDS`), shaped like a mail for `_Fields`."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values

    def field(self, name: str) -> str:
        return self.values.get(name, "")


def evaluate_pagerduty(
    ruleset: Ruleset, fields: Mapping[str, str], *, regex_timeout: float = 0.5
) -> PagerDutyDecision:
    """The first enabled `[[pagerduty_rule]]` whose conditions hold for the event's fields;
    none matching means "mirror" (and the service's `notify.on` shorthand decides on mail)."""
    texts = _Fields(_EventFields(fields))  # type: ignore[arg-type]
    trace: list[TraceStep] = []
    for rule in ruleset.pagerduty_rules:
        if not rule.enabled:
            trace.append(TraceStep(rule.name, False, "disabled"))
            continue
        matched, reason = _match(rule, texts, regex_timeout)  # type: ignore[arg-type]
        trace.append(TraceStep(rule.name, matched, reason))
        if matched:
            return PagerDutyDecision(rule.name, rule.action, rule.theme, rule.to, tuple(trace))
    return PagerDutyDecision(None, "mirror", trace=tuple(trace))
