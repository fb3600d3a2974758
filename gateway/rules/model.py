"""The compiled rule model: what a rule file becomes, and what evaluating one mail decides.

Built by `gateway.rules.loader`, read by `gateway.rules.evaluate`; no I/O and no evaluation here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import regex

from gateway.schedules import Schedule

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
TIME_FIELD = "time"  # { field = "time", op = "within" | "outside", value = "<schedule>" }
TIME_OPS = ("within", "outside")
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
    "within",  # schedule name -> whether the mail arrived within it
)
# reverse rules ([[pagerduty_rule]]): what a Webhooks v3 event offers to conditions, and actions
PAGERDUTY_FIELDS = (
    "event_type",
    "title",
    "status",
    "service",
    "escalation_policy",
    "priority",
    "urgency",
    "assignee",
    "note",
)
PAGERDUTY_ACTIONS = ("notify", "mirror", "discard")
# REST API actions a mail rule may add (with `[pagerduty] api_token`): what the Events API can't
REST_ACTIONS = ("set_priority", "set_urgency", "add_note", "reassign", "add_responders")
TRIGGER_ONLY_REST = ("set_priority", "set_urgency")
URGENCIES = ("high", "low")
MAX_NOTE = 25_000  # PagerDuty's note content limit
MAX_KEY = 255  # PagerDuty dedup_key limit
MAX_SUMMARY = 1024  # PagerDuty payload.summary limit
MAX_DETAIL = 4000  # per custom_details value; keeps events far below the 512 KB request cap
DEFAULT_SUMMARY = "{{ subject }}"
NO_SUBJECT = "(no subject)"


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
    _schedule: Schedule | None = field(default=None, compare=False, repr=False)  # time ops

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
    key_fallbacks: tuple[Extractor, ...] = ()  # incident_key = [a, b, ...]: tried in order
    summary: str = DEFAULT_SUMMARY
    severity: str = "critical"
    details: tuple[tuple[str, Extractor | str], ...] = ()
    links: tuple[Link, ...] = ()
    enabled: bool = True
    file: str = ""
    line: int | None = None
    # REST actions, in REST_ACTIONS order: (action, value); a note is a template, a target
    # is "escalation_policy:PXXXXXX" or "user:PXXXXXX"
    rest: tuple[tuple[str, str], ...] = ()

    def describe_key(self) -> str:
        """The key's extractor(s) for traces: 'subject regex ... or body regex ...'."""
        return " or ".join(ex.describe() for ex in (self.incident_key, *self.key_fallbacks))

    @property
    def where(self) -> str:
        """'file:line' for messages, or '' for rules built in code."""
        if not self.file:
            return ""
        return self.file if self.line is None else f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Filter:
    """A `[filter]` table: mail must pass it before any rule is tried (PagerDuty's email
    filters). Mail that does not pass is kept as `filtered` and nothing is sent."""

    conditions: tuple[Condition, ...]
    mode: str = "all"
    file: str = ""
    line: int | None = None

    @property
    def label(self) -> str:
        """'[filter] (name.toml:line)' for traces: which file's filter stopped the mail."""
        if not self.file:
            return "[filter]"
        name = self.file.replace("\\", "/").rsplit("/", 1)[-1]
        return f"[filter] ({name}:{self.line})" if self.line else f"[filter] ({name})"


@dataclass(frozen=True)
class PagerDutyRule:
    """A reverse rule: a PagerDuty-side event -> tell the helpdesk (a theme to addresses),
    only update the incident mirror, or discard the event (recorded, nothing changes)."""

    name: str
    conditions: tuple[Condition, ...]
    action: str  # notify | mirror | discard
    match: str = "all"
    theme: str = "incident_update"
    to: tuple[str, ...] = ()
    enabled: bool = True
    file: str = ""
    line: int | None = None

    @property
    def where(self) -> str:
        if not self.file:
            return ""
        return self.file if self.line is None else f"{self.file}:{self.line}"


@dataclass(frozen=True)
class PagerDutyDecision:
    """What a PagerDuty-side event does: the first matching reverse rule, or none."""

    rule: str | None  # None: no reverse rule matched (the mirror is updated; `notify.on` applies)
    action: str  # notify | mirror | discard
    theme: str = ""
    to: tuple[str, ...] = ()
    trace: tuple[TraceStep, ...] = ()


@dataclass(frozen=True)
class Ruleset:
    """All rules of one service (in order, across its files) plus the unmatched policy."""

    rules: tuple[Rule, ...] = ()
    unmatched_action: str = "discard"
    unmatched_summary: str = DEFAULT_SUMMARY
    unmatched_severity: str = "warning"
    strip_tags: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    filters: tuple[Filter, ...] = ()  # every one must pass (one per file at most)
    schedules: tuple[Schedule, ...] = ()  # config.toml's, for the `within` template name
    pagerduty_rules: tuple[PagerDutyRule, ...] = ()


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
    filtered: bool = False  # stopped by a [filter]: kept as `filtered`, nothing sent
    rest: tuple[tuple[str, str], ...] = ()  # REST actions, a note rendered
