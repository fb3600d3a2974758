"""A PagerDuty email integration (REST API `GET /services/{id}/integrations/{id}`) -> a rule file.

How PagerDuty documents it, and what each part becomes:

* `email_incident_creation`: `on_new_email` (every mail opens an incident: keyed here by its
  Message-ID), `on_new_email_subject` (one per subject: keyed by the subject),
  `only_if_no_open_incidents` (one at a time: keyed by the integration address in To),
  `use_rules` (the `email_parsers`, below);
* `email_filter_mode` with `email_filters`: `all-email` (no filter), `and-rules-email` (every
  filter must match) and `or-rules-email` (one must); each filter tests subject, body and from
  address with `always`, `match` (regex) or `no-match`. This becomes `[filter]`;
* `email_parsers`, tried in order: `action` trigger or resolve; `match_predicate` a tree of
  `all` / `any` / `not` over `contains` / `exactly` / `regex` on subject, body or
  from_addresses (written here as one rule, or one rule per alternative); `value_extractors`
  (`entire`, `regex`, `between`), the one named `incident_key` keying the incident and the
  others becoming custom details;
* `email_parsing_fallback`: `open_new_incident` (a last rule keyed by Message-ID) or `discard`.
"""

from __future__ import annotations

import itertools
import math
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

PARTS = {"subject": "subject", "body": "body", "from_addresses": "from"}
MAX_ALTERNATIVES = 16  # rules one parser may become (its predicate in disjunctive normal form)
MAX_DEPTH = 20  # nesting of all / any / not followed
MESSAGE_ID: Extract = {"field": "headers.Message-ID"}


def import_pagerduty(data: Any, source: str = "") -> ImportedFile:
    """The integration's rule file; ImportFailed when `data` is not an email integration."""
    integration = data.get("integration", data) if isinstance(data, dict) else None
    if not isinstance(integration, dict) or not _is_email(integration):
        raise ImportFailed(
            "not a PagerDuty email integration: expected the JSON of GET /services/{id}/"
            "integrations/{id} (an 'integration' with email_incident_creation, email_parsers...)"
        )
    name = integration.get("name") or integration.get("summary") or "email integration"
    out = ImportedFile(
        f"Imported from the PagerDuty email integration {name!r}"
        f" ({integration.get('integration_email') or integration.get('id') or source})"
        " by `gateway import pagerduty`."
    )
    _filters(integration, out)
    creation = integration.get("email_incident_creation") or "on_new_email"
    out.notes.append(f"email_incident_creation = {creation!r}")
    if creation == "use_rules":
        _parsers(integration, out)
    else:
        _creation(creation, integration, out)
    return out


def _is_email(integration: dict[str, Any]) -> bool:
    kind = str(integration.get("type", ""))
    return kind.startswith("generic_email") or any(
        key.startswith("email_") or key == "integration_email" for key in integration
    )


# --------------------------------------------------------------------------- filters


def _filters(integration: dict[str, Any], out: ImportedFile) -> None:
    mode = integration.get("email_filter_mode") or "all-email"
    out.notes.append(f"email_filter_mode = {mode!r}")
    filters = integration.get("email_filters") or []
    if mode == "all-email" or not filters:
        return
    if mode not in ("and-rules-email", "or-rules-email"):
        out.warn("email_filter_mode", f"unknown mode {mode!r}: no [filter] written")
        return
    tests = [_filter_tests(f, f"email_filters[{n}]", out) for n, f in enumerate(filters)]
    if any(t is None for t in tests):
        out.warn("email_filters", "a filter could not be read: no [filter] written")
        return
    if mode == "and-rules-email":
        out.filter_mode, out.filter_conditions = "all", [c for t in tests for c in t or []]
    elif any(not t for t in tests):
        return  # one filter accepts every mail: nothing is filtered
    elif all(len(t or []) == 1 for t in tests):
        out.filter_mode, out.filter_conditions = "any", [t[0] for t in tests if t]
    else:
        out.warn(
            "email_filters",
            "or-rules-email over filters that each test several parts is 'any of (all of ...)',"
            " which one [filter] cannot say: no [filter] written, every mail reaches the rules",
        )
    if out.filter_mode is not None and not out.filter_conditions:
        out.filter_mode = None  # only 'always' parts


def _filter_tests(raw: Any, where: str, out: ImportedFile) -> list[Cond] | None:
    if not isinstance(raw, dict):
        return None
    tests = []
    for part, field_name in (("subject", "subject"), ("body", "body"), ("from_email", "from")):
        mode = raw.get(f"{part}_mode") or "always"
        regex = raw.get(f"{part}_regex")
        if mode == "always":
            continue
        if mode not in ("match", "no-match") or not isinstance(regex, str):
            out.warn(f"{where}.{part}_mode", f"unknown mode {mode!r} or missing regex")
            return None
        if not regex_ok(regex, f"{where}.{part}_regex", out):
            return None
        op = "matches" if mode == "match" else "not_matches"
        tests.append({"field": field_name, "op": op, "value": regex})
        if field_name == "from":
            _from_regex_warning(regex, f"{where}.{part}_regex", out)
    return tests


def _from_regex_warning(regex: str, where: str, out: ImportedFile) -> None:
    if re.search(r"(?<!\\)[$^]|\\[AZz]", regex):
        out.warn(
            where,
            "anchored regex on the from address: the gateway matches the whole From header"
            " ('Name <addr>'), so ^ and $ may not sit where PagerDuty's did",
        )


# --------------------------------------------------------------------------- creation modes


def _creation(creation: str, integration: dict[str, Any], out: ImportedFile) -> None:
    if creation == "on_new_email":
        note = "every mail opens its own incident (keyed by its Message-ID)"
        out.rules.append(
            RuleDraft(
                "every mail opens an incident",
                "trigger",
                [ALWAYS],
                incident_key=MESSAGE_ID,
                note=note,
            )
        )
    elif creation == "on_new_email_subject":
        note = "one incident per subject while it is open (Re:/Fwd: prefixes are ignored)"
        out.rules.append(
            RuleDraft(
                "one incident per subject",
                "trigger",
                [ALWAYS],
                incident_key={"field": "subject"},
                note=note,
            )
        )
    elif creation == "only_if_no_open_incidents":
        address = str(integration.get("integration_email") or "")
        if not address:
            out.warn(
                "integration_email", "needed to key every mail alike; keyed by subject instead"
            )
            key: Extract = {"field": "subject"}
        else:
            key = {"field": "to", "regex": re.escape(address), "ignore_case": True}
            out.warn(
                "email_incident_creation",
                "only_if_no_open_incidents: every mail is keyed by the integration address in"
                " To; mail that reached it by Bcc is keyed by its subject ([unmatched])",
            )
        out.rules.append(RuleDraft("one incident at a time", "trigger", [ALWAYS], incident_key=key))
    else:
        out.warn("email_incident_creation", f"unknown value {creation!r}: treated as on_new_email")
        _creation("on_new_email", integration, out)
        return
    out.unmatched_action = "trigger"


# --------------------------------------------------------------------------- parsers


def _parsers(integration: dict[str, Any], out: ImportedFile) -> None:
    parsers = integration.get("email_parsers") or []
    if not isinstance(parsers, list):
        raise ImportFailed("email_parsers must be a list")
    for number, parser in enumerate(parsers):
        _parser(parser, number, out)
    fallback = integration.get("email_parsing_fallback") or "open_new_incident"
    out.notes.append(f"email_parsing_fallback = {fallback!r}")
    if fallback == "open_new_incident":
        out.rules.append(
            RuleDraft(
                out.unique_name("fallback: open a new incident"),
                "trigger",
                [ALWAYS],
                incident_key=MESSAGE_ID,
                note="email_parsing_fallback = open_new_incident: a mail no parser matched"
                " opens its own incident",
            )
        )
        out.unmatched_action = "trigger"  # a mail without Message-ID: keyed by its subject
    elif fallback != "discard":
        out.warn(
            "email_parsing_fallback", f"unknown value {fallback!r}: unmatched mail is discarded"
        )


def _parser(parser: Any, number: int, out: ImportedFile) -> None:
    where = f"email_parsers[{number}]"
    if not isinstance(parser, dict):
        out.warn(where, "not an object: skipped")
        return
    action = parser.get("action")
    if action not in ("trigger", "resolve"):
        out.warn(f"{where}.action", f"unknown action {action!r}: parser skipped")
        return
    key, details = _extractors(parser.get("value_extractors") or [], where, out)
    alternatives = _dnf(parser.get("match_predicate"), f"{where}.match_predicate", out)
    base = f"parser {number + 1}: {action}"
    enabled = alternatives is not None
    if alternatives is None:
        alternatives = [[ALWAYS]]  # written, but disabled: the operator rewrites it
    drafts = _as_rules(alternatives)
    for index, (match, conditions) in enumerate(drafts):
        suffix = f" (alternative {index + 1} of {len(drafts)})" if len(drafts) > 1 else ""
        out.rules.append(
            RuleDraft(
                out.unique_name(base + suffix),
                action,
                conditions,
                match=match,
                incident_key=key,
                details=details,
                enabled=enabled,
                note="" if enabled else "DISABLED: its match_predicate has no exact equivalent",
            )
        )


def _as_rules(alternatives: list[list[Cond]]) -> list[tuple[str, list[Cond]]]:
    """One rule when possible: all-of one list, or any-of single conditions."""
    if len(alternatives) == 1:
        return [("all", alternatives[0] or [ALWAYS])]
    if all(len(a) == 1 for a in alternatives):
        return [("any", [a[0] for a in alternatives])]
    return [("all", a or [ALWAYS]) for a in alternatives]


def _dnf(
    node: Any, where: str, out: ImportedFile, negated: bool = False, depth: int = 0
) -> list[list[Cond]] | None:
    """The predicate as 'any of (all of conditions)'; None (with a warning) if it cannot be."""
    if depth > MAX_DEPTH:
        out.warn(where, f"nested deeper than {MAX_DEPTH} levels")
        return None
    if not isinstance(node, dict):
        out.warn(where, "missing or not an object")
        return None
    kind = node.get("type")
    children = node.get("children") or node.get("predicate") or []
    if kind == "not":
        if not isinstance(children, list) or len(children) != 1:
            out.warn(where, "'not' needs exactly one child")
            return None
        return _dnf(children[0], f"{where}.children[0]", out, not negated, depth + 1)
    if kind in ("all", "any"):
        parts = [
            _dnf(child, f"{where}.children[{n}]", out, negated, depth + 1)
            for n, child in enumerate(children)
        ]
        if any(p is None for p in parts):
            return None
        conjunction = (kind == "all") != negated  # De Morgan under a 'not'
        if not parts and not conjunction:
            out.warn(where, "an empty 'any' matches no mail")
            return None
        if not parts:
            return [[]]
        if not conjunction:
            return [term for part in parts for term in part or []]
        count = math.prod(len(p or []) for p in parts)  # before building any of them
        if count > MAX_ALTERNATIVES:
            out.warn(where, f"expands to {count} alternatives (more than {MAX_ALTERNATIVES})")
            return None
        return [
            [c for term in combo for c in term]
            for combo in itertools.product(*[p or [] for p in parts])
        ]
    condition = _leaf(node, where, out, negated)
    return None if condition is None else [[condition]]


_OPS = {
    "contains": ("contains", "not_contains"),
    "exactly": ("equals", "not_equals"),
    "regex": ("matches", "not_matches"),
}


def _leaf(node: dict[str, Any], where: str, out: ImportedFile, negated: bool) -> Cond | None:
    kind, part, matcher = node.get("type"), node.get("part"), node.get("matcher")
    if kind not in _OPS or part not in PARTS or not isinstance(matcher, str):
        out.warn(where, f"predicate type {kind!r} on part {part!r} has no equivalent")
        return None
    field_name = PARTS[part]
    if kind == "regex" and not regex_ok(matcher, f"{where}.matcher", out):
        return None
    if field_name == "from" and kind == "exactly":  # the address, within 'Name <addr>'
        pattern = r"(?:^|<)\s*" + re.escape(matcher) + r"\s*(?:>|$)"
        return {
            "field": "from",
            "op": _OPS["regex"][negated],
            "value": pattern,
            "ignore_case": True,
        }
    if field_name == "from" and kind == "regex":
        _from_regex_warning(matcher, f"{where}.matcher", out)
    return {"field": field_name, "op": _OPS[kind][negated], "value": matcher}


def _extractors(
    raw: Any, where: str, out: ImportedFile
) -> tuple[Extract | None, dict[str, Extract | str]]:
    key: Extract | None = None
    details: dict[str, Extract | str] = {}
    for number, extractor in enumerate(raw if isinstance(raw, list) else []):
        at = f"{where}.value_extractors[{number}]"
        spec = _extractor(extractor, at, out)
        name = extractor.get("value_name") if isinstance(extractor, dict) else None
        if spec is None or not isinstance(name, str) or not name:
            continue
        if name == "incident_key":
            key = spec
        else:
            details[name] = spec
    if key is None:
        out.warn(f"{where}.value_extractors", "no incident_key extractor: keyed by the subject")
    return key, details


def _extractor(raw: Any, where: str, out: ImportedFile) -> Extract | None:
    if not isinstance(raw, dict):
        out.warn(where, "not an object: skipped")
        return None
    kind, part = raw.get("type"), raw.get("part")
    if part not in PARTS:
        out.warn(where, f"part {part!r} has no equivalent: skipped")
        return None
    field_name = PARTS[part]
    if kind == "entire":
        return {"field": field_name}
    if kind == "regex" and isinstance(raw.get("regex"), str):
        if not regex_ok(raw["regex"], f"{where}.regex", out):
            return None
        return {"field": field_name, "regex": raw["regex"]}
    start, end = raw.get("starts_after"), raw.get("ends_before")
    if kind == "between" and isinstance(start, str) and start and isinstance(end, str) and end:
        return {"field": field_name, "between": [start, end]}
    if kind == "between" and isinstance(start, str) and start:
        return {"field": field_name, "after": start}
    out.warn(where, f"extractor type {kind!r} (or its parameters) has no equivalent: skipped")
    return None
