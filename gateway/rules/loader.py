"""Operator rule files (TOML) -> a validated, compiled Ruleset.

Every problem in every file is collected before raising one RuleError, and each names the file
and the line of the offending rule or key. tomllib reports no positions, so `_Locator` finds
them by scanning the source text (headers, `key =` lines, items of inline arrays).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jinja2
import regex
from jinja2 import meta, nodes

from gateway.errors import Problem, RuleError
from gateway.files import FileSnapshot
from gateway.mail.parse import AUTH_FIELDS, FIELDS
from gateway.rules.model import (
    ACTIONS,
    OPS,
    PAGERDUTY_ACTIONS,
    PAGERDUTY_FIELDS,
    REST_ACTIONS,
    SEVERITIES,
    TEMPLATE_NAMES,
    TIME_FIELD,
    TIME_OPS,
    TRIGGER_ONLY_REST,
    URGENCIES,
    Condition,
    Extractor,
    Filter,
    Link,
    PagerDutyRule,
    Rule,
    Ruleset,
    compile_regex,
)
from gateway.rules.templates import ENV, compile_template, is_template
from gateway.sandbox import BudgetExceeded
from gateway.schedules import Schedule
from gateway.toml_locator import TomlLocator

TOP_KEYS = ("rule", "pagerduty_rule", "unmatched", "keys", "filter")
PAGERDUTY_RULE_KEYS = ("name", "enabled", "match", "conditions", "action", "theme", "to")
RULE_KEYS = (
    "name",
    "enabled",
    "match",
    "conditions",
    "action",
    "incident_key",
    "summary",
    "severity",
    "details",
    "links",
    *REST_ACTIONS,
)
CONDITION_KEYS = ("field", "op", "value", "ignore_case")
EXTRACTOR_KEYS = ("field", "regex", "between", "after", "before", "ignore_case")
EXTRACTOR_HOWS = ("regex", "between", "after", "before")
LINK_KEYS = ("href", "text")
UNMATCHED_KEYS = ("action", "summary", "severity")
KEYS_KEYS = ("strip_tags",)
FILTER_KEYS = ("mode", "conditions")
SAMPLE_CONTEXT: dict[str, Any] = {  # what templates see on an empty mail
    **dict.fromkeys(TEMPLATE_NAMES, ""),
    "headers": {},
    "details": {},
    "subject": "Sample subject",
    "key": "Sample subject",
}
_HEADER_FIELD = re.compile(r"^[A-Za-z0-9-]+$")
_TOML_LINE = re.compile(r"at line (\d+)")


def _schedules_read(parsed: nodes.Template) -> set[str]:
    """The schedule names a template reads as `within.NAME` or `within["NAME"]`."""
    names = set()
    for node in parsed.find_all((nodes.Getattr, nodes.Getitem)):
        if isinstance(node.node, nodes.Name) and node.node.name == "within":
            if isinstance(node, nodes.Getattr):
                names.add(node.attr)
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                names.add(node.arg.value)
    return names


class _Checker:
    """Validation of one file: collects problems, locating each in the source text."""

    def __init__(
        self,
        file: str,
        text: str,
        problems: list[Problem],
        schedules: Mapping[str, Schedule] | None = None,
    ) -> None:
        self.file = file
        self.loc = TomlLocator(text)
        self.problems = problems
        self.schedules = schedules or {}  # config.toml's, for `time` conditions

    def add(self, message: str, line: int | None, key: str | None = None) -> None:
        self.problems.append(Problem(self.file, message, line, key))


class _Scope:
    """A table being validated (a rule, [unmatched], [keys]): locates its keys by path."""

    def __init__(self, chk: _Checker, span: tuple[int, int] | None, label: str) -> None:
        self.chk = chk
        self.span = span
        self.label = label

    @property
    def line(self) -> int | None:
        return None if self.span is None else self.span[0] + 1

    def at(self, *path: str | int) -> int | None:
        return self.chk.loc.locate(self.span, path) or self.line

    def add(self, message: str, *path: str | int) -> None:
        where = "".join(f"[{p + 1}]" if isinstance(p, int) else f".{p}" for p in path)
        self.chk.add(message, self.at(*path), f"{self.label}{where}" if path else self.label)

    def unknown(self, table: dict[str, Any], allowed: tuple[str, ...], *path: str | int) -> None:
        for key in table:
            if key not in allowed:
                self.add(f"unknown key {key!r}; allowed: {', '.join(allowed)}", *path, key)

    def string(self, table: dict[str, Any], key: str, *path: str | int) -> str | None:
        value = table.get(key)
        if value is not None and not isinstance(value, str):
            self.add(f"{key} must be a string, not {type(value).__name__}", *path, key)
            return None
        return value

    def boolean(self, table: dict[str, Any], key: str, *path: str | int) -> bool:
        value = table.get(key, key == "enabled")  # enabled defaults to true, flags to false
        if not isinstance(value, bool):
            self.add(f"{key} must be true or false", *path, key)
            return False
        return value

    def field(self, value: Any, *path: str | int, allowed: tuple[str, ...] = ()) -> bool:
        if allowed:  # a reverse rule's fields: the PagerDuty event's, no headers
            if isinstance(value, str) and value in allowed:
                return True
            self.add(f"unknown field {value!r}; use one of {', '.join(allowed)}", *path, "field")
            return False
        if isinstance(value, str) and (
            value in FIELDS
            or value in AUTH_FIELDS
            or (value.startswith("headers.") and _HEADER_FIELD.match(value[len("headers.") :]))
        ):
            return True
        allowed = ", ".join(FIELDS) + ", headers.<Name>, " + ", ".join(AUTH_FIELDS)
        self.add(f"unknown field {value!r}; use one of {allowed}", *path, "field")
        return False

    def regex(self, pattern: str, ignore_case: bool, *path: str | int) -> bool:
        try:
            compile_regex(pattern, ignore_case)
        except regex.error as exc:
            self.add(f"bad regex '{pattern}': {exc}", *path)
            return False
        return True

    def template(self, source: str, *path: str | int) -> bool:
        line = self.at(*path)
        if line is not None and re.search(r"(\"\"\"|''')\s*$", self.chk.loc.lines[line - 1]):
            line += 1  # a multi-line string starts on the next line
        try:
            parsed = ENV.parse(source)
            names = meta.find_undeclared_variables(parsed)
        except jinja2.TemplateSyntaxError as exc:
            where = None if line is None else line + (exc.lineno or 1) - 1
            self.chk.add(f"bad template: {exc.message}", where, self._key(path))
            return False
        unknown = sorted(names - set(TEMPLATE_NAMES) - set(ENV.globals))
        schedules = _schedules_read(parsed) - set(self.chk.schedules)
        if schedules:
            known = ", ".join(sorted(self.chk.schedules)) or "none"
            self.add(
                f"unknown schedule(s) {', '.join(sorted(schedules))} after within. (defined: {known})",
                *path,
            )
            return False
        if unknown:
            self.add(
                f"unknown template variable(s) {', '.join(unknown)}; "
                f"available: {', '.join(TEMPLATE_NAMES)}",
                *path,
            )
            return False
        return self._within_budget(source, *path)

    def _within_budget(self, source: str, *path: str | int) -> bool:
        """Render once on a sample mail: a template that cannot finish within its time and
        size budget there would quarantine every mail its rule matches, so refuse it now."""
        try:
            ENV.render(compile_template(source), SAMPLE_CONTEXT)
        except BudgetExceeded as exc:
            self.add(f"template exceeds its budget on a sample mail: {exc.message}", *path)
            return False
        except Exception:  # missing header, filter on empty text...: fine at check time
            pass
        return True

    def _key(self, path: tuple[str | int, ...]) -> str:
        return self.label + "".join(f"[{p + 1}]" if isinstance(p, int) else f".{p}" for p in path)

    def severity(self, table: dict[str, Any], default: str) -> str:
        value = self.string(table, "severity")
        if value is None:
            return default
        if is_template(value):
            self.template(value, "severity")
        elif value not in SEVERITIES:
            self.add(
                f"invalid severity {value!r}; use {', '.join(SEVERITIES)} or a {{{{ template }}}}",
                "severity",
            )
        return value

    def summary(self, table: dict[str, Any], default: str) -> str:
        value = self.string(table, "summary")
        if value is None:
            return default
        self.template(value, "summary")
        return value


# --------------------------------------------------------------------------- rules


def _condition(
    scope: _Scope, raw: Any, number: int, fields: tuple[str, ...] = ()
) -> Condition | None:
    path: tuple[str | int, ...] = ("conditions", number)
    if not isinstance(raw, dict):
        scope.add("a condition must be a table like { field = ..., op = ..., value = ... }", *path)
        return None
    before = len(scope.chk.problems)
    scope.unknown(raw, CONDITION_KEYS, *path)
    if raw.get("field") == TIME_FIELD:
        return _time_condition(scope, raw, path)
    op = raw.get("op")
    if op not in OPS:
        what = "missing op" if op is None else f"unknown op {op!r}"
        scope.add(f"{what}; use one of {', '.join(OPS)}", *path, *(("op",) if op else ()))
    ignore_case = scope.boolean(raw, "ignore_case", *path)
    if op == "always":
        ok = len(scope.chk.problems) == before
        return Condition(field="subject", op=op, line=scope.at(*path)) if ok else None
    if "field" not in raw:
        scope.add("missing field", *path)
    else:
        scope.field(raw["field"], *path, allowed=fields)
    value = scope.string(raw, "value", *path)
    if "value" not in raw and op in OPS:
        scope.add(f"missing value (required for op {op!r})", *path)
    elif op in ("matches", "not_matches") and value is not None:
        scope.regex(value, ignore_case, *path, "value")
    if len(scope.chk.problems) > before or value is None:
        return None
    return Condition(raw["field"], op, value, ignore_case, scope.at(*path))


def _time_condition(
    scope: _Scope, raw: dict[str, Any], path: tuple[str | int, ...]
) -> Condition | None:
    """{ field = "time", op = "within" | "outside", value = "<schedule in config.toml>" }."""
    before = len(scope.chk.problems)
    op, name = raw.get("op"), raw.get("value")
    if op not in TIME_OPS:
        scope.add(f"field time takes op within or outside, not {op!r}", *path, "op")
    schedule = scope.chk.schedules.get(name) if isinstance(name, str) else None
    if schedule is None:
        known = (
            ", ".join(sorted(scope.chk.schedules)) or "none; define [schedules.NAME] in config.toml"
        )
        scope.add(f"unknown schedule {name!r} (defined: {known})", *path, "value")
    if len(scope.chk.problems) > before or schedule is None:
        return None
    return Condition(TIME_FIELD, op, name, line=scope.at(*path), _schedule=schedule)


def _extractor(scope: _Scope, raw: Any, *path: str | int) -> Extractor | None:
    """An extractor table, or a bare field name as shorthand for the whole field."""
    if isinstance(raw, str):
        raw = {"field": raw}
    if not isinstance(raw, dict):
        scope.add("must be a table like { field = ..., regex = ... }", *path)
        return None
    ok = len(scope.chk.problems)
    scope.unknown(raw, EXTRACTOR_KEYS, *path)
    hows = [h for h in EXTRACTOR_HOWS if h in raw]
    if len(hows) > 1:
        scope.add(f"use at most one of regex, between, after, before (got {hows})", *path)
    ignore_case = scope.boolean(raw, "ignore_case", *path)
    if "field" not in raw:
        scope.add("missing field", *path)
    else:
        scope.field(raw["field"], *path)
    for how in ("regex", "after", "before"):
        value = scope.string(raw, how, *path)
        if value == "":
            scope.add(f"{how} must not be empty", *path, how)
    if isinstance(raw.get("regex"), str):
        scope.regex(raw["regex"], ignore_case, *path, "regex")
    between = raw.get("between")
    if between is not None and not (
        isinstance(between, list)
        and len(between) == 2
        and all(isinstance(b, str) and b for b in between)
    ):
        scope.add('between must be two non-empty strings, e.g. ["Case #", " "]', *path, "between")
    if len(scope.chk.problems) > ok:
        return None
    return Extractor(
        field=raw["field"],
        regex=raw.get("regex"),
        between=tuple(between) if between else None,
        after=raw.get("after"),
        before=raw.get("before"),
        ignore_case=ignore_case,
    )


def _details(scope: _Scope, raw: Any) -> tuple[tuple[str, Extractor | str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        scope.add("details must be a table of name = template or extractor", "details")
        return ()
    result: list[tuple[str, Extractor | str]] = []
    for name, spec in raw.items():
        if isinstance(spec, str):
            if scope.template(spec, "details", name):
                result.append((name, spec))
        elif (extractor := _extractor(scope, spec, "details", name)) is not None:
            result.append((name, extractor))
    return tuple(result)


def _links(scope: _Scope, raw: Any) -> tuple[Link, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        scope.add("links must be a list of { href = ..., text = ... }", "links")
        return ()
    result = []
    for number, link in enumerate(raw):
        path = ("links", number)
        if not isinstance(link, dict) or not isinstance(link.get("href"), str):
            scope.add("a link must be a table with a string href (and optional text)", *path)
            continue
        scope.unknown(link, LINK_KEYS, *path)
        text = scope.string(link, "text", *path) or ""
        if scope.template(link["href"], *path, "href") and scope.template(text, *path, "text"):
            result.append(Link(link["href"], text))
    return tuple(result)


def _conditions(scope: _Scope, raw: Any, fields: tuple[str, ...] = ()) -> tuple[Condition, ...]:
    if raw is None:
        scope.add('missing conditions; use [{ op = "always" }] to match every message')
        return ()
    if not isinstance(raw, list) or not raw:
        scope.add('conditions must be a non-empty list; [{ op = "always" }] matches all')
        return ()
    built = [_condition(scope, item, number, fields) for number, item in enumerate(raw)]
    return tuple(c for c in built if c is not None)


def _rule(chk: _Checker, index: int, raw: Any, names: dict[str, str]) -> Rule | None:
    span = chk.loc.span("rule", index)
    name = raw.get("name") if isinstance(raw, dict) else None
    label = f"rule {name!r}" if isinstance(name, str) and name else f"rule #{index + 1}"
    scope = _Scope(chk, span, label)
    if not isinstance(raw, dict):
        scope.add("[[rule]] must be a table")
        return None
    before = len(chk.problems)
    scope.unknown(raw, RULE_KEYS)
    _rule_name(scope, name, names)
    action = raw.get("action")
    if action not in ACTIONS:
        what = "missing action" if action is None else f"unknown action {action!r}"
        scope.add(f"{what}; use one of {', '.join(ACTIONS)}", *(("action",) if action else ()))
    match = raw.get("match", "all")
    if match not in ("all", "any"):
        scope.add(f'match must be "all" or "any", not {match!r}', "match")
    enabled = scope.boolean(raw, "enabled")
    conditions = _conditions(scope, raw.get("conditions"))
    key, fallbacks = _incident_key(scope, raw.get("incident_key", "subject"))
    summary = scope.summary(raw, "{{ subject }}")
    severity = scope.severity(raw, "critical")
    details, links = _details(scope, raw.get("details")), _links(scope, raw.get("links"))
    rest = _rest_actions(scope, raw, action)
    if len(chk.problems) > before or key is None:
        return None
    return Rule(
        name=name,
        conditions=conditions,
        action=action,
        match=match,
        incident_key=key,
        key_fallbacks=fallbacks,
        summary=summary,
        severity=severity,
        details=details,
        links=links,
        enabled=enabled,
        file=chk.file,
        line=scope.line,
        rest=rest,
    )


def _rest_actions(scope: _Scope, raw: dict[str, Any], action: Any) -> tuple[tuple[str, str], ...]:
    """`set_priority = "P1"`, `set_urgency = "high"`, `add_note = "{{ body }}"`,
    `reassign` / `add_responders = { escalation_policy = "PXXXXXX" }` (or `user = ...`)."""
    found: list[tuple[str, str]] = []
    for name in REST_ACTIONS:
        if name not in raw:
            continue
        if action == "discard" or (name in TRIGGER_ONLY_REST and action != "trigger"):
            needs = "trigger" if name in TRIGGER_ONLY_REST else "trigger, acknowledge or resolve"
            scope.add(f"{name} needs action {needs}", name)
            continue
        value = raw[name]
        if name in ("reassign", "add_responders"):
            target = _rest_target(scope, name, value)
            if target:
                found.append((name, target))
            continue
        if not isinstance(value, str) or not value.strip():
            scope.add(f"{name} must be a non-empty string", name)
        elif name == "set_urgency" and value not in URGENCIES:
            scope.add(f"set_urgency must be {' or '.join(URGENCIES)}, not {value!r}", name)
        elif name != "add_note" or scope.template(value, name):
            found.append((name, value))
    return tuple(found)


def _rest_target(scope: _Scope, name: str, value: Any) -> str | None:
    kinds = ("escalation_policy", "user")
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in kinds:
        scope.add(f'{name} must be {{ escalation_policy = "PXXXXXX" }} or {{ user = "PXXXXXX" }}',
                  name)  # fmt: skip
        return None
    kind, ident = next(iter(value.items()))
    if not isinstance(ident, str) or not re.fullmatch(r"[A-Z0-9]{2,20}", ident):
        scope.add(f"{name}.{kind} must be a PagerDuty id such as PABC123, not {ident!r}", name)
        return None
    return f"{kind}:{ident}"


def _pagerduty_rule(
    chk: _Checker, index: int, raw: Any, names: dict[str, str]
) -> PagerDutyRule | None:
    """A `[[pagerduty_rule]]`: conditions on a webhook event's fields, and what to do."""
    span = chk.loc.span("pagerduty_rule", index)
    name = raw.get("name") if isinstance(raw, dict) else None
    label = (
        f"pagerduty_rule {name!r}"
        if isinstance(name, str) and name
        else (f"pagerduty_rule #{index + 1}")
    )
    scope = _Scope(chk, span, label)
    if not isinstance(raw, dict):
        scope.add("[[pagerduty_rule]] must be a table")
        return None
    before = len(chk.problems)
    scope.unknown(raw, PAGERDUTY_RULE_KEYS)
    _rule_name(scope, name, names)
    action = raw.get("action", "notify")
    if action not in PAGERDUTY_ACTIONS:
        scope.add(f"unknown action {action!r}; use one of {', '.join(PAGERDUTY_ACTIONS)}", "action")
    match = raw.get("match", "all")
    if match not in ("all", "any"):
        scope.add(f'match must be "all" or "any", not {match!r}', "match")
    enabled = scope.boolean(raw, "enabled")
    conditions = _conditions(scope, raw.get("conditions"), PAGERDUTY_FIELDS)
    theme = scope.string(raw, "theme") or "incident_update"
    to = raw.get("to", [])
    to = [to] if isinstance(to, str) else to
    if not isinstance(to, list) or not all(isinstance(a, str) and "@" in a for a in to):
        scope.add('to must be a list of addresses, e.g. ["support@helpdesk.example"]', "to")
        to = []
    if action == "notify" and not to:
        scope.add('action "notify" needs to = ["address", ...]', *(("to",) if "to" in raw else ()))
    if len(chk.problems) > before:
        return None
    return PagerDutyRule(
        name=name,
        conditions=conditions,
        action=action,
        match=match,
        theme=theme,
        to=tuple(to),
        enabled=enabled,
        file=chk.file,
        line=scope.line,
    )


def _incident_key(scope: _Scope, raw: Any) -> tuple[Extractor | None, tuple[Extractor, ...]]:
    """One extractor, or a list tried in order (the first that finds a key wins), so a ticket
    number can come from the subject or, failing that, from a link in the body."""
    if not isinstance(raw, list):
        return _extractor(scope, raw, "incident_key"), ()
    if not raw:
        scope.add("incident_key must not be an empty list", "incident_key")
        return None, ()
    built = [_extractor(scope, item, "incident_key", n) for n, item in enumerate(raw)]
    if any(ex is None for ex in built):
        return None, ()
    return built[0], tuple(ex for ex in built[1:] if ex is not None)


def _rule_name(scope: _Scope, name: Any, names: dict[str, str]) -> None:
    """Names must be present and unique across all of a service's files (traces use them)."""
    if not isinstance(name, str) or not name.strip():
        if name is None:
            scope.add("missing name")
        else:
            scope.add("name must be a non-empty string", "name")
        return
    first = names.get(name.casefold())
    if first is not None:
        scope.add(f"duplicate rule name {name!r} (first defined at {first})", "name")
    else:
        names[name.casefold()] = f"{scope.chk.file}:{scope.line}"


# --------------------------------------------------------------------------- files


class _Collected:
    """What the files contribute to one Ruleset."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []
        self.names: dict[str, str] = {}
        self.unmatched: dict[str, Any] | None = None
        self.unmatched_at = ""
        self.unmatched_values: tuple[str, str, str] = ("discard", "{{ subject }}", "warning")
        self.tags: list[str] = []
        self.filters: list[Filter] = []
        self.schedules: Mapping[str, Schedule] = {}
        self.pagerduty_rules: list[PagerDutyRule] = []


def _unmatched(chk: _Checker, raw: Any, out: _Collected) -> None:
    scope = _Scope(chk, chk.loc.span("unmatched"), "unmatched")
    if out.unmatched is not None:
        scope.add(f"[unmatched] is already defined at {out.unmatched_at}; keep only one")
        return
    if not isinstance(raw, dict):
        scope.add("[unmatched] must be a table")
        return
    out.unmatched, out.unmatched_at = raw, f"{chk.file}:{scope.line}"
    scope.unknown(raw, UNMATCHED_KEYS)
    action = raw.get("action", "discard")
    if action not in ("discard", "trigger"):
        scope.add(f'action must be "discard" or "trigger", not {action!r}', "action")
    out.unmatched_values = (
        action,
        scope.summary(raw, "{{ subject }}"),
        scope.severity(raw, "warning"),
    )


def _filter(chk: _Checker, raw: Any, out: _Collected) -> None:
    """`[filter]`: mode = "all" | "any" and conditions in the rule syntax."""
    scope = _Scope(chk, chk.loc.span("filter"), "filter")
    if not isinstance(raw, dict):
        scope.add("[filter] must be a table with mode and conditions")
        return
    before = len(chk.problems)
    scope.unknown(raw, FILTER_KEYS)
    mode = raw.get("mode", "all")
    if mode not in ("all", "any"):
        scope.add(f'mode must be "all" or "any", not {mode!r}', "mode")
    conditions = _conditions(scope, raw.get("conditions"))
    if len(chk.problems) == before:
        out.filters.append(Filter(conditions, mode, chk.file, scope.line))


def _keys(chk: _Checker, raw: Any, out: _Collected) -> None:
    scope = _Scope(chk, chk.loc.span("keys"), "keys")
    if not isinstance(raw, dict):
        scope.add("[keys] must be a table")
        return
    scope.unknown(raw, KEYS_KEYS)
    tags = raw.get("strip_tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        scope.add('strip_tags must be a list of non-empty strings, e.g. ["[Desk]"]', "strip_tags")
        return
    out.tags.extend(t for t in tags if t not in out.tags)


def _display(path: Path) -> str:
    """The path as the operator would type it: relative to the working directory when inside."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def _check_file(path: Path, problems: list[Problem], out: _Collected, files: FileSnapshot) -> None:
    file = _display(path)
    try:
        text = files.read_text(path)
        data = tomllib.loads(text)
    except OSError as exc:
        problems.append(Problem(file, f"cannot read rule file: {exc.strerror or exc}"))
        return
    except UnicodeDecodeError as exc:
        problems.append(Problem(file, f"rule file is not UTF-8: {exc}"))
        return
    except tomllib.TOMLDecodeError as exc:
        found = _TOML_LINE.search(str(exc))
        line = int(found.group(1)) if found else None
        problems.append(Problem(file, f"TOML syntax error: {exc}", line))
        return
    chk = _Checker(file, text, problems, out.schedules)
    _sections(chk, data, out)


_SECTIONS: dict[str, Callable[[_Checker, Any, _Collected], None]] = {
    "unmatched": _unmatched,
    "keys": _keys,
    "filter": _filter,
}


def _sections(chk: _Checker, data: dict[str, Any], out: _Collected) -> None:
    for key, value in data.items():
        if key == "rule":
            _rules(chk, value, out)
        elif key == "pagerduty_rule":
            _pagerduty_rules(chk, value, out)
        elif key in _SECTIONS:
            _SECTIONS[key](chk, value, out)
        else:
            chk.add(
                f"unknown top-level key {key!r}; allowed: {', '.join(TOP_KEYS)}",
                chk.loc.top(key),
                key,
            )


def _rules(chk: _Checker, value: Any, out: _Collected) -> None:
    if not isinstance(value, list):
        chk.add("rules are written [[rule]] (double brackets), one per rule", chk.loc.top("rule"))
        return
    for index, raw in enumerate(value):
        rule = _rule(chk, index, raw, out.names)
        if rule is not None:
            out.rules.append(rule)


def _pagerduty_rules(chk: _Checker, value: Any, out: _Collected) -> None:
    if not isinstance(value, list):
        chk.add(
            "reverse rules are written [[pagerduty_rule]] (double brackets), one per rule",
            chk.loc.top("pagerduty_rule"),
        )
        return
    for index, raw in enumerate(value):
        rule = _pagerduty_rule(chk, index, raw, out.names)
        if rule is not None:
            out.pagerduty_rules.append(rule)


def load_ruleset(
    paths: list[Path],
    *,
    files: FileSnapshot | None = None,
    schedules: Mapping[str, Schedule] | None = None,
) -> Ruleset:
    """Validate every file, then raise one RuleError with all problems, or return the Ruleset.

    `files` records what was read (and, frozen, replaces the disk): see `gateway.files`.
    `schedules` are config.toml's, which `time` conditions name."""
    files = FileSnapshot() if files is None else files
    problems: list[Problem] = []
    out = _Collected()
    out.schedules = schedules or {}
    for path in paths:
        _check_file(Path(path), problems, out, files)
    if problems:
        raise RuleError(problems)
    action, summary, severity = out.unmatched_values
    return Ruleset(
        rules=tuple(out.rules),
        unmatched_action=action,
        unmatched_summary=summary,
        unmatched_severity=severity,
        strip_tags=tuple(out.tags),
        files=tuple(str(p) for p in paths),
        filters=tuple(out.filters),
        schedules=tuple(out.schedules.values()),
        pagerduty_rules=tuple(out.pagerduty_rules),
    )


def load_conditions(
    file: str,
    text: str,
    table: str,
    nth: int,
    raw: Any,
    *,
    label: str,
    schedules: Mapping[str, Schedule] | None = None,
) -> tuple[Condition, ...]:
    """Conditions written outside a rule file (config.toml's `[[heartbeat]]`), with a rule's
    checks and file:line errors: `table`/`nth` locate them in `text`. Raises RuleError."""
    problems: list[Problem] = []
    chk = _Checker(file, text, problems, schedules)
    conditions = _conditions(_Scope(chk, chk.loc.span(table, nth), label), raw)
    if problems:
        raise RuleError(problems)
    return conditions
