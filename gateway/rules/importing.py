"""What the importers (`gateway import pagerduty|opsgenie`) build, and the rule file it becomes.

An importer turns a vendor's JSON into one `ImportedFile`: rules, an optional `[filter]` and
`[unmatched]`, plus a warning, with its location in the JSON, for everything that has no exact
equivalent. The text written here is a rule file in the loader's syntax (README "Parsing
rules"), so `gateway check` judges the result like any hand-written file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import regex

from gateway.rules.model import compile_regex

Cond = dict[str, Any]  # one condition in rule syntax: field, op, value[, ignore_case]
Extract = dict[str, Any]  # one extractor in rule syntax: field[, regex | between | after | before]


class ImportFailed(ValueError):
    """The input is not a configuration this importer understands (bad JSON, wrong shape)."""


@dataclass(frozen=True)
class Unrepresentable:
    """Something the gateway cannot do exactly as the vendor did, and where it was."""

    where: str  # JSON path, e.g. 'email_parsers[2].match_predicate.children[1]'
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class RuleDraft:
    """A rule as it will be written; `note` becomes a comment above it."""

    name: str
    action: str
    conditions: list[Cond]
    match: str = "all"
    incident_key: Extract | None = None
    summary: str | None = None
    severity: str | None = None
    details: dict[str, Extract | str] = field(default_factory=dict)
    enabled: bool = True
    note: str = ""


@dataclass
class ImportedFile:
    """One rule file: what the vendor's configuration becomes."""

    source: str  # one line: what was imported
    rules: list[RuleDraft] = field(default_factory=list)
    filter_mode: str | None = None  # None: no [filter]
    filter_conditions: list[Cond] = field(default_factory=list)
    unmatched_action: str = "discard"
    warnings: list[Unrepresentable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # header comments: how it maps

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(Unrepresentable(where, message))

    def unique_name(self, name: str) -> str:
        taken = {rule.name.casefold() for rule in self.rules}
        candidate, number = name, 2
        while candidate.casefold() in taken:
            candidate, number = f"{name} ({number})", number + 1
        return candidate


ALWAYS: Cond = {"op": "always"}


def load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ImportFailed(f"not JSON: {exc}") from None
    except RecursionError:
        raise ImportFailed("JSON nested too deeply to be an integration's configuration") from None


# --------------------------------------------------------------------------- TOML


def to_toml(imported: ImportedFile) -> str:
    """The rule file's text: header comments, [filter], rules, [unmatched]."""
    lines = [f"# {imported.source}", "#"]
    lines += [f"# {note}" if note else "#" for note in imported.notes]
    if imported.warnings:
        lines += ["#", "# Not imported exactly (also printed on stderr):"]
        lines += [f"#   {_one_line(str(w))}" for w in imported.warnings]
    lines.append("")
    if imported.filter_mode is not None:
        lines += ["[filter]", f"mode = {_str(imported.filter_mode)}"]
        lines += [*_conditions(imported.filter_conditions), ""]
    for rule in imported.rules:
        lines += [*_rule(rule), ""]
    lines += ["[unmatched]", f"action = {_str(imported.unmatched_action)}", ""]
    return "\n".join(lines)


def _rule(rule: RuleDraft) -> list[str]:
    lines = [f"# {_one_line(text)}" for text in rule.note.splitlines() if text.strip()]
    lines += ["[[rule]]", f"name = {_str(rule.name)}"]
    if not rule.enabled:
        lines.append("enabled = false")
    if rule.match != "all":
        lines.append(f"match = {_str(rule.match)}")
    lines += _conditions(rule.conditions or [ALWAYS])
    lines.append(f"action = {_str(rule.action)}")
    if rule.incident_key is not None:
        lines.append(f"incident_key = {_inline(rule.incident_key)}")
    if rule.summary is not None:
        lines.append(f"summary = {_str(rule.summary)}")
    if rule.severity is not None:
        lines.append(f"severity = {_str(rule.severity)}")
    if rule.details:
        lines.append(
            "details = { "
            + ", ".join(
                f"{_key(name)} = {_inline(spec) if isinstance(spec, dict) else _str(spec)}"
                for name, spec in rule.details.items()
            )
            + " }"
        )
    return lines


def _conditions(conditions: list[Cond]) -> list[str]:
    return ["conditions = ["] + [f"  {_inline(c)}," for c in conditions] + ["]"]


def _inline(table: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in table.items()) + " }"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return _str(str(value))


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(name: str) -> str:
    return name if _BARE_KEY.match(name) else _str(name)


def _str(text: str) -> str:
    """A TOML literal string when it can be one (regexes stay readable), else a basic one."""
    if "'" not in text and not any(ord(c) < 32 or ord(c) == 127 for c in text):
        return f"'{text}'"
    return json.dumps(text, ensure_ascii=False)  # JSON's escapes are valid TOML escapes


def _one_line(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- regex check


def drop_bad_regexes(imported: ImportedFile) -> None:
    """A vendor regex the gateway's engine rejects is reported, and its rule disabled (the
    loader refuses a file with a bad regex, even in a disabled rule, so it is left out)."""
    for number, rule in enumerate(imported.rules):
        where = f"rule {rule.name!r}"
        kept = [c for c in rule.conditions if _regex_ok(c, "value", where, imported)]
        if len(kept) != len(rule.conditions):
            rule.conditions, rule.enabled = kept or [ALWAYS], False
            rule.note = (rule.note + "\nDISABLED: a regex was left out").strip()
        if rule.incident_key is not None and not _regex_ok(
            rule.incident_key, "regex", where, imported
        ):
            rule.incident_key, rule.enabled = {"field": "subject"}, False
        for name, spec in list(rule.details.items()):
            if isinstance(spec, dict) and not _regex_ok(spec, "regex", where, imported):
                del rule.details[name]
        imported.rules[number] = rule
    if not all(_regex_ok(c, "value", "[filter]", imported) for c in imported.filter_conditions):
        imported.filter_mode, imported.filter_conditions = None, []
        imported.warn("[filter]", "not written: one of its regexes is not valid here")


def regex_ok(pattern: str, where: str, imported: ImportedFile, ignore_case: bool = False) -> bool:
    """Whether the gateway's regex engine takes a vendor's pattern; if not, a warning."""
    try:
        compile_regex(pattern, ignore_case)
    except regex.error as exc:
        imported.warn(where, f"regex {pattern!r} is not valid in the gateway's engine: {exc}")
        return False
    return True


def _regex_ok(table: dict[str, Any], key: str, where: str, imported: ImportedFile) -> bool:
    if key == "value" and table.get("op") not in ("matches", "not_matches"):
        return True
    pattern = table.get(key)
    return pattern is None or regex_ok(
        str(pattern), where, imported, bool(table.get("ignore_case"))
    )
