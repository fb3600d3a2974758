"""Parsing rules: the compiled rule model, incident-key normalisation and evaluation.

Loading and validating the operator's TOML files lives in `gateway.rulefile`; this module keeps
the hot path (`evaluate`) small: everything is compiled once at load time, templates are rendered
only for the rule that matched, and field texts are case-folded at most once per message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import regex
from jinja2 import StrictUndefined, Template
from jinja2.sandbox import SandboxedEnvironment

from gateway.errors import RuleEvaluationError
from gateway.message import ParsedMail

ACTIONS = ("trigger", "acknowledge", "resolve", "discard")
KEYED_ACTIONS = ("trigger", "acknowledge", "resolve")
SEVERITIES = ("critical", "error", "warning", "info")
OPS = (
    "contains",
    "not_contains",
    "equals",
    "not_equals",
    "starts_with",
    "ends_with",
    "matches",
    "not_matches",
    "always",
)
TEMPLATE_NAMES = (  # what summary / severity / details / links templates may use
    "subject",
    "body",
    "html",
    "from_",
    "sender",
    "from_addr",
    "to",
    "cc",
    "headers",
    "message_id",
    "date",
    "key",
    "rule",
    "details",
)
MAX_KEY = 255  # PagerDuty dedup_key limit
MAX_SUMMARY = 1024  # PagerDuty payload.summary limit
MAX_DETAIL = 4000  # per custom_details value; keeps events far below the 512 KB request cap
DEFAULT_SUMMARY = "{{ subject }}"
NO_SUBJECT = "(no subject)"

# Reply/forward markers in many mail clients' languages, with optional counters ("Re[2]:",
# "Re(2):"), a space before the colon ("Re :") and the full-width colon ("回复：").
_REPLY_WORDS = r"(?:re|fwd?|aw|wg|sv|vs|antw|tr|rif|回复|回覆|答复|转发|轉寄|轉發)"
_REPLY_PREFIX = _REPLY_WORDS + r"[ \t]*(?:\[\d+\]|\(\d+\))?[ \t]*[:：]"

ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


def is_template(text: str) -> bool:
    """A value is a Jinja template only if it contains Jinja markup; literals skip rendering."""
    return "{{" in text or "{%" in text or "{#" in text


@lru_cache(maxsize=8192)
def compile_template(source: str) -> Template:
    """Compile once per distinct source; rules re-use the compiled template on every message."""
    return ENV.from_string(source)


def compile_regex(pattern: str, ignore_case: bool) -> regex.Pattern[str]:
    """Operator regexes always go through the `regex` package (it supports timeouts)."""
    return regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)


@dataclass(frozen=True)
class Condition:
    """One test on one field; `value` is unused for `always`."""

    field: str
    op: str
    value: str = ""
    ignore_case: bool = False
    line: int | None = None
    _pattern: regex.Pattern[str] | None = field(default=None, compare=False, repr=False)
    _folded: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.op in ("matches", "not_matches") and self._pattern is None:
            object.__setattr__(self, "_pattern", compile_regex(self.value, self.ignore_case))
        object.__setattr__(self, "_folded", self.value.casefold())

    def describe(self) -> str:
        """Short human form for traces: 'body contains "Status: New"'."""
        if self.op == "always":
            return "always"
        value = self.value if len(self.value) <= 60 else self.value[:57] + "..."
        case = " (ignore case)" if self.ignore_case else ""
        return f'{self.field} {self.op} "{value}"{case}'


@dataclass(frozen=True)
class Extractor:
    """Takes text from a field: whole, or by regex / between / after / before (at most one)."""

    field: str
    regex: str | None = None
    between: tuple[str, str] | None = None
    after: str | None = None
    before: str | None = None
    ignore_case: bool = False
    _compiled: tuple[regex.Pattern[str] | None, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        markers: tuple[str, ...] = ()
        if self.between is not None:
            markers = tuple(self.between)
            object.__setattr__(self, "between", markers)
        elif self.after is not None:
            markers = (self.after,)
        elif self.before is not None:
            markers = (self.before,)
        if self.regex is not None:
            compiled: tuple[regex.Pattern[str] | None, ...] = (
                compile_regex(self.regex, self.ignore_case),
            )
        elif self.ignore_case and markers:
            compiled = tuple(compile_regex(regex.escape(m), True) for m in markers)
        else:
            compiled = ()
        object.__setattr__(self, "_compiled", compiled)

    def describe(self) -> str:
        """Short human form for traces."""
        for how in ("regex", "between", "after", "before"):
            value = getattr(self, how)
            if value is not None:
                return f"{self.field} {how} {value!r}"
        return f"{self.field} (whole)"


@dataclass(frozen=True)
class Link:
    """A PagerDuty link; both parts may be templates. An empty rendered href drops the link."""

    href: str
    text: str = ""


@dataclass(frozen=True)
class Rule:
    """One operator rule, compiled. `file`/`line` point at its `[[rule]]` header."""

    name: str
    conditions: tuple[Condition, ...]
    action: str
    match: str = "all"
    incident_key: Extractor = Extractor(field="subject")
    summary: str = DEFAULT_SUMMARY
    severity: str = "critical"
    details: tuple[tuple[str, Extractor | str], ...] = ()
    links: tuple[Link, ...] = ()
    enabled: bool = True
    file: str = ""
    line: int | None = None

    @property
    def where(self) -> str:
        """'file:line' for messages, or '' for rules built in code."""
        if not self.file:
            return ""
        return self.file if self.line is None else f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Ruleset:
    """All rules of one service (in order, across its files) plus the unmatched policy."""

    rules: tuple[Rule, ...] = ()
    unmatched_action: str = "discard"
    unmatched_summary: str = DEFAULT_SUMMARY
    unmatched_severity: str = "warning"
    strip_tags: tuple[str, ...] = ()
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class TraceStep:
    """Why one rule did or did not match: the answer to 'why did this mail do nothing?'."""

    rule: str
    matched: bool
    reason: str


@dataclass(frozen=True)
class Decision:
    """What to do with one message, and why."""

    rule: str | None
    action: str
    incident_key: str | None
    summary: str
    severity: str
    details: dict[str, str]
    links: tuple[dict[str, str], ...]
    trace: tuple[TraceStep, ...]
    reason: str
    unmatched: bool = False


def load_ruleset(paths: list[Path]) -> Ruleset:
    """Load, validate and compile rule files; raises RuleError listing every problem."""
    from gateway.rulefile import load_rule_files  # rulefile imports this module

    return load_rule_files(paths)


# --------------------------------------------------------------------------- key normalisation


@lru_cache(maxsize=64)
def _prefix_pattern(tags: tuple[str, ...]) -> regex.Pattern[str]:
    alternatives = [_REPLY_PREFIX, *(regex.escape(t) for t in tags if t.strip())]
    return regex.compile(r"^(?:" + "|".join(alternatives) + r")\s*", regex.IGNORECASE)


def normalise_key(text: str, tags: tuple[str, ...] | list[str] = ()) -> str:
    """Make replies and forwards of one case produce the same key (see DESIGN 'Incident key').

    Trims, collapses whitespace, strips Re:/Fwd:/... and the operator's [tag] prefixes in any
    order and number, then cuts to 255 characters with a hash suffix so long keys never collide.
    """
    key = " ".join(text.split())
    pattern = _prefix_pattern(tuple(tags))
    while key:
        found = pattern.match(key)
        if found is None or not found.end():
            break
        key = key[found.end() :]
    key = key.strip()
    if len(key) > MAX_KEY:
        digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
        key = key[: MAX_KEY - 1 - len(digest)] + "~" + digest
    return key


# --------------------------------------------------------------------------- per-message fields


class _Fields:
    """Field texts of one message, computed and case-folded at most once per evaluation."""

    __slots__ = ("_folded", "_stripped", "_text", "mail")

    def __init__(self, mail: ParsedMail) -> None:
        self.mail = mail
        self._text: dict[str, str] = {}
        self._folded: dict[str, str] = {}
        self._stripped: dict[str, str] = {}

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
    if cond._pattern is not None:
        found = _search(cond._pattern, fields.text(cond.field), timeout, rule, cond.field)
        return (found is not None) == (op == "matches")
    if op in _WHOLE_FIELD_OPS:
        text = fields.stripped(cond.field, cond.ignore_case)
    else:
        text = fields.folded(cond.field) if cond.ignore_case else fields.text(cond.field)
    return _STRING_OPS[op](text, cond._folded if cond.ignore_case else cond.value)


def _match(rule: Rule, fields: _Fields, timeout: float) -> tuple[bool, str]:
    """(matched, reason) for a rule's conditions; all short-circuits on the first 'no'."""
    conds = rule.conditions
    if rule.match == "any":
        for number, cond in enumerate(conds, 1):
            if _test(cond, fields, timeout, rule.name):
                return True, f"condition {number} {cond.describe()}: yes (any)"
        return False, f"none of {_count(len(conds))} matched (any)"
    for number, cond in enumerate(conds, 1):
        if not _test(cond, fields, timeout, rule.name):
            return False, f"condition {number} {cond.describe()}: no"
    return True, f"all {_count(len(conds))} matched"


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


def _context(mail: ParsedMail, key: str | None, rule: str) -> dict[str, Any]:
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
    }


def render(source: str, context: Mapping[str, Any], rule: str, what: str) -> str:
    """Render a (possibly literal) template; any failure is a RuleEvaluationError."""
    if not is_template(source):
        return source
    try:
        return compile_template(source).render(context)
    except Exception as exc:  # operator template code: any failure quarantines the message
        raise RuleEvaluationError(rule, f"{what} template failed: {exc}") from None


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


def evaluate(ruleset: Ruleset, mail: ParsedMail, *, regex_timeout: float = 0.5) -> Decision:
    """First enabled matching rule wins; the trace records every rule tried and why.

    Raises RuleEvaluationError (regex timeout, failing template) so the caller quarantines.
    """
    fields = _Fields(mail)
    trace: list[TraceStep] = []
    for rule in ruleset.rules:
        if not rule.enabled:
            trace.append(TraceStep(rule.name, False, "disabled"))
            continue
        matched, why = _match(rule, fields, regex_timeout)
        key = None
        if matched and rule.action in KEYED_ACTIONS:
            raw = extract(rule.incident_key, fields, regex_timeout, rule.name)
            key = normalise_key(raw, ruleset.strip_tags) if raw else ""
            if not key:
                why = f"{why}, but incident key not found ({rule.incident_key.describe()})"
                matched = False
            else:
                why = f'{why}; key "{key}"'
        trace.append(TraceStep(rule.name, matched, why))
        if matched:
            return _decide(rule, mail, fields, key, tuple(trace), regex_timeout)
    return _unmatched(ruleset, mail, tuple(trace))


def _decide(
    rule: Rule,
    mail: ParsedMail,
    fields: _Fields,
    key: str | None,
    trace: tuple[TraceStep, ...],
    timeout: float,
) -> Decision:
    ctx = _context(mail, key, rule.name)
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
    )


def _unmatched(ruleset: Ruleset, mail: ParsedMail, trace: tuple[TraceStep, ...]) -> Decision:
    """No rule matched: discard (kept, visible) or a generic alert keyed by the subject."""
    action = ruleset.unmatched_action
    key = None
    if action == "trigger":
        key = normalise_key(mail.subject, ruleset.strip_tags)
        if not key:  # one alert per subject-less mail; redeliveries share the Message-ID
            key = f"no-subject:{mail.message_id}" if mail.message_id else NO_SUBJECT
    ctx = _context(mail, key, "[unmatched]")
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
