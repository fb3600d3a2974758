"""An Opsgenie email integration's actions (REST API `GET /v2/integrations/{id}/actions`) ->
a rule file.

As Opsgenie documents its integration actions: they are tried in order, the first action whose
filter matches is executed and ends the processing, and a mail no action matches does nothing.
That is the gateway's first-match-wins, with `[unmatched] action = "discard"`. Each action type
becomes: ignore -> discard, create -> trigger, close -> resolve, acknowledge -> acknowledge;
addNote has no PagerDuty equivalent and becomes discard (the mail still stops there, as in
Opsgenie), with a warning. Order: ignore, create, close, acknowledge, addNote, each by `order`.

A filter (`match-all`, `match-any-condition`, `match-all-conditions`) becomes the rule's
conditions; `alias` (Opsgenie's de-duplication key) becomes the incident key; `message` the
summary; `priority` the severity (P1 critical, P2 error, P3 warning, P4/P5 info); description,
entity, source and tags become custom details.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.rules.importing import (
    ALWAYS,
    Cond,
    Extract,
    ImportedFile,
    ImportFailed,
    RuleDraft,
    regex_ok,
)

ACTION_TYPES = (  # Opsgenie action list -> gateway action, in the order they are written
    ("ignore", "discard"),
    ("create", "trigger"),
    ("close", "resolve"),
    ("acknowledge", "acknowledge"),
    ("addNote", "discard"),
)
SEVERITIES = {"P1": "critical", "P2": "error", "P3": "warning", "P4": "info", "P5": "info"}
FROM_ADDRESS = r"[^\s<>\"]+@[^\s<>\"]+"
# template name -> (rule field, extractor regex on it or None for the whole field, jinja name)
NAMES: dict[str, tuple[str, str | None, str]] = {
    "subject": ("subject", None, "subject"),
    "message": ("body", None, "body"),
    "from_address": ("from", FROM_ADDRESS, "from_addr"),
    "from_name": ("from", r'^\s*"?([^"<]*?)"?\s*<', "from_"),
}
_PLACEHOLDER = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.DOTALL)
_CALL = re.compile(
    r"^(\w+)\.(extract|substringAfter|substringBefore|substringBetween)\((.*)\)$", re.DOTALL
)
_STRING_ARG = re.compile(r'\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def import_opsgenie(data: Any, source: str = "") -> ImportedFile:
    """The integration's rule file; ImportFailed when `data` is not an actions listing."""
    actions = data.get("data", data) if isinstance(data, dict) else None
    if not isinstance(actions, dict) or not any(kind in actions for kind, _ in ACTION_TYPES):
        raise ImportFailed(
            "not Opsgenie integration actions: expected the JSON of GET /v2/integrations/{id}/"
            "actions (a 'data' object with create, close, acknowledge, addNote, ignore lists)"
        )
    parent = actions.get("_parent") or {}
    name = parent.get("name") if isinstance(parent, dict) else None
    out = ImportedFile(
        f"Imported from the Opsgenie integration {name or source or 'actions'!r}"
        " by `gateway import opsgenie`."
    )
    out.notes += [
        "Opsgenie runs the first action whose filter matches; here the first matching rule",
        "decides. Actions are written ignore, create, close, acknowledge, addNote, each by order.",
        "A mail that no action matches does nothing in Opsgenie: [unmatched] discards it.",
    ]
    for kind, action in ACTION_TYPES:
        items = actions.get(kind) or []
        if not isinstance(items, list):
            out.warn(kind, "not a list: skipped")
            continue
        numbered = sorted(enumerate(items), key=lambda pair: _order(pair[1], pair[0]))
        for index, item in numbered:
            _action(item, kind, action, f"{kind}[{index}]", out)
    return out


def _order(item: Any, index: int) -> tuple[float, int]:
    order = item.get("order") if isinstance(item, dict) else None
    return (float(order) if isinstance(order, int | float) else float("inf"), index)


def _action(item: Any, kind: str, action: str, where: str, out: ImportedFile) -> None:
    if not isinstance(item, dict):
        out.warn(where, "not an object: skipped")
        return
    name = out.unique_name(f"{kind}: {item.get('name') or where}")
    match, conditions, ok = _filter(item.get("filter"), f"{where}.filter", out)
    rule = RuleDraft(name, action, conditions, match=match, enabled=ok)
    if not ok:
        rule.note = "DISABLED: its filter has a condition with no exact equivalent"
    if kind == "addNote":
        out.warn(where, "add note has no equivalent: the mail is discarded here (no note added)")
    if action in ("trigger", "resolve", "acknowledge"):
        rule.incident_key = _alias(item, kind, where, rule, out)
    if action == "trigger":
        _alert_fields(item, where, rule, out)
    for key in ("responders", "visibleTo"):
        if item.get(key):
            out.warn(f"{where}.{key}", "who is notified is PagerDuty's escalation policy: ignored")
    out.rules.append(rule)


# --------------------------------------------------------------------------- filters


def _filter(raw: Any, where: str, out: ImportedFile) -> tuple[str, list[Cond], bool]:
    """(match, conditions, exact) of an action filter."""
    if raw is None:
        return "all", [ALWAYS], True
    if not isinstance(raw, dict):
        out.warn(where, "not an object")
        return "all", [ALWAYS], False
    kind = raw.get("conditionMatchType") or raw.get("type") or "match-all"
    if kind == "match-all":
        return "all", [ALWAYS], True
    if kind not in ("match-any-condition", "match-all-conditions"):
        out.warn(f"{where}.conditionMatchType", f"unknown value {kind!r}")
        return "all", [ALWAYS], False
    conditions: list[Cond] = []
    exact = True
    raw_conditions = raw.get("conditions") or []
    ordered = sorted(enumerate(raw_conditions), key=lambda pair: _order(pair[1], pair[0]))
    for index, item in ordered:
        condition = _condition(item, f"{where}.conditions[{index}]", out)
        if condition is None:
            exact = False
        else:
            conditions.append(condition)
    return ("any" if kind == "match-any-condition" else "all"), conditions or [ALWAYS], exact


def _condition(raw: Any, where: str, out: ImportedFile) -> Cond | None:
    if not isinstance(raw, dict):
        out.warn(where, "not an object")
        return None
    field_name, operation = raw.get("field"), raw.get("operation")
    value = str(raw.get("expectedValue") or "")
    negated = bool(raw.get("not"))
    if field_name not in ("subject", "message", "from_address", "from_name"):
        out.warn(where, f"field {field_name!r} has no equivalent in a mail")
        return None
    target = {"subject": "subject", "message": "body"}.get(field_name, "from")
    if target == "from":
        return _from_condition(field_name, operation, value, negated, where, out)
    return _text_condition(target, operation, value, negated, where, out)


def _text_condition(
    target: str, operation: Any, value: str, negated: bool, where: str, out: ImportedFile
) -> Cond | None:
    plain = {"contains": ("contains", "not_contains"), "equals": ("equals", "not_equals")}
    if operation in plain:
        return {"field": target, "op": plain[operation][negated], "value": value}
    if operation in ("starts-with", "ends-with") and not negated:
        return {"field": target, "op": operation.replace("-", "_"), "value": value}
    pattern = _pattern(operation, value)
    if pattern is None:
        out.warn(where, f"operation {operation!r} has no equivalent on mail text")
        return None
    if not regex_ok(pattern, f"{where}.expectedValue", out):
        return None
    return {"field": target, "op": "not_matches" if negated else "matches", "value": pattern}


def _pattern(operation: Any, value: str) -> str | None:
    """The regex that does what an Opsgenie operation does (on the whole field)."""
    if operation == "matches":  # Java's String.matches: the whole value
        return rf"(?s)\A(?:{value})\Z"
    if operation == "starts-with":
        return r"\A\s*" + re.escape(value)
    if operation == "ends-with":
        return re.escape(value) + r"\s*\Z"
    if operation == "is-empty":
        return r"\A\s*\Z"
    if operation == "equals-ignore-whitespace":
        return r"\A\s*" + r"\s*".join(re.escape(c) for c in value if not c.isspace()) + r"\s*\Z"
    if operation == "equals":
        return r"\A\s*" + re.escape(value) + r"\s*\Z"
    if operation == "contains":
        return re.escape(value)
    return None


def _from_condition(
    name: str, operation: Any, value: str, negated: bool, where: str, out: ImportedFile
) -> Cond | None:
    """from_address / from_name: their part of the From header ('Name <address>')."""
    op = "not_matches" if negated else "matches"
    escaped = re.escape(value)
    if name == "from_address":
        around = {
            "contains": escaped,
            "equals": rf"(?:^|<)\s*{escaped}\s*(?:>|$)",
            "starts-with": rf"(?:^|<)\s*{escaped}",
            "ends-with": rf"{escaped}\s*(?:>|$)",
        }
        if operation in around:
            return {"field": "from", "op": op, "value": around[operation], "ignore_case": True}
    elif operation in ("contains", "equals", "starts-with"):
        shapes = {
            "contains": rf"^[^<]*{escaped}[^<]*<",
            "equals": rf'^\s*"?{escaped}"?\s*<',
            "starts-with": rf'^\s*"?{escaped}',
        }
        return {"field": "from", "op": op, "value": shapes[operation]}
    out.warn(where, f"operation {operation!r} on {name} has no equivalent")
    return None


# --------------------------------------------------------------------------- alert fields


def _alias(item: dict, kind: str, where: str, rule: RuleDraft, out: ImportedFile) -> Extract:
    """The incident key from `alias`; an empty alias on create: one incident per mail."""
    alias = str(item.get("alias") or "").strip()
    if not alias:
        if kind != "create":
            out.warn(f"{where}.alias", "no alias: nothing to close or acknowledge; rule disabled")
            rule.enabled, rule.note = False, "DISABLED: no alias, so no incident to act on"
        return {"field": "headers.Message-ID"}
    extractor = _template_extractor(alias)
    if extractor is not None:
        return extractor
    out.warn(
        f"{where}.alias",
        f"alias {alias!r} is not one value the gateway can extract (one field, or one of its"
        " extract / substringAfter / substringBefore / substringBetween)"
        + ("; keyed by the subject" if kind == "create" else "; rule disabled"),
    )
    if kind != "create":
        rule.enabled, rule.note = False, "DISABLED: its alias has no exact equivalent"
    return {"field": "subject"}


def _template_extractor(template: str) -> Extract | None:
    """`{{subject}}`, `{{message.extract(/re/)}}`, ... as one extractor; None otherwise."""
    found = _PLACEHOLDER.fullmatch(template.strip())
    if found is None:
        return None
    expr = found.group(1).strip()
    if expr in NAMES:
        target, regex, _ = NAMES[expr]
        return {"field": target} if regex is None else {"field": target, "regex": regex}
    call = _CALL.match(expr)
    if call is None or call.group(1) not in NAMES or NAMES[call.group(1)][1] is not None:
        return None  # from_address / from_name are already a regex: no second one
    target, method, args = NAMES[call.group(1)][0], call.group(2), call.group(3).strip()
    if method == "extract":
        regex = re.fullmatch(r"/(.*)/", args, re.DOTALL)
        return {"field": target, "regex": regex.group(1)} if regex else None  # checked later
    strings = _strings(args)
    if method == "substringBetween" and strings is not None and len(strings) == 2:
        return {"field": target, "between": strings}
    if strings is None or len(strings) != 1:
        return None
    how = "after" if method == "substringAfter" else "before"
    return {"field": target, how: strings[0]}


def _strings(args: str) -> list[str] | None:
    values, rest = [], args
    while rest.strip():
        found = _STRING_ARG.match(rest)
        if found is None:
            return None
        values.append(found.group(1).replace('\\"', '"'))
        rest = rest[found.end() :]
    return values if all(values) else None


def _alert_fields(item: dict, where: str, rule: RuleDraft, out: ImportedFile) -> None:
    message = str(item.get("message") or "").strip()
    if message and message != "{{subject}}":
        rule.summary = _jinja(message, f"{where}.message", out)
    priority = str(item.get("priority") or "").strip()
    if priority:
        if priority in SEVERITIES:
            rule.severity = SEVERITIES[priority]
        else:
            out.warn(f"{where}.priority", f"priority {priority!r} is not P1..P5: default severity")
    for key in ("description", "entity", "source"):
        text = str(item.get(key) or "").strip()
        if text:
            translated = _jinja(text, f"{where}.{key}", out)
            if translated is not None:
                rule.details[key] = translated
    tags = item.get("tags") or []
    if isinstance(tags, list) and tags:
        rule.details["tags"] = ", ".join(str(t) for t in tags)
    extra = item.get("extraProperties") or {}
    if isinstance(extra, dict):
        for key, value in extra.items():
            translated = _jinja(str(value), f"{where}.extraProperties.{key}", out)
            if translated is not None:
                rule.details[str(key)] = translated


def _jinja(template: str, where: str, out: ImportedFile) -> str | None:
    """An Opsgenie template with plain placeholders as a gateway template; None otherwise."""
    unknown = [m for m in _PLACEHOLDER.findall(template) if m.strip() not in NAMES]
    if unknown:
        out.warn(where, f"template {template!r} uses {unknown[0]!r}, which has no equivalent")
        return None
    parts, last = [], 0
    for found in _PLACEHOLDER.finditer(template):
        parts.append(_literal(template[last : found.start()]))
        parts.append("{{ " + NAMES[found.group(1).strip()][2] + " }}")
        last = found.end()
    parts.append(_literal(template[last:]))
    return "".join(parts)


def _literal(text: str) -> str:
    """Plain text that must stay plain in a Jinja template."""
    if not any(mark in text for mark in ("{{", "{%", "{#", "}}")):
        return text
    return "{{ " + repr(text) + " }}"
