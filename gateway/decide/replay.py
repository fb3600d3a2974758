"""Replay: run stored mail through the current or a candidate ruleset and report the changes.

How an operator tests a rule edit against real mail before deploying it. Replay only reads:
it never writes the store, never touches incidents and never sends anything.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gateway.config import DEFAULT_INSTALLATION_ID
from gateway.decide.authenticity import (
    NOT_CHECKED,
    AuthVerdict,
    check_authenticity,
    with_auth_fields,
)
from gateway.decide.senders import sender_refusal
from gateway.decide.verdicts import ServiceRuntime, non_action_outcome
from gateway.errors import RuleEvaluationError
from gateway.mail.loop_guard import loop_verdict
from gateway.mail.parse import parse_message
from gateway.outcomes import NON_ACTIONS, Outcome
from gateway.rules import Ruleset, evaluate, load_ruleset
from gateway.schedules import Schedule
from gateway.store import ReportStore

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class Effect:
    """What a ruleset does with a mail: trigger/acknowledge/resolve or a non-action."""

    kind: str
    rule: str | None
    key: str | None

    def __str__(self) -> str:
        parts = [self.kind]
        if self.rule:
            parts.append(f"rule={self.rule!r}")
        if self.key:
            parts.append(f"key={self.key!r}")
        return " ".join(parts)


@dataclass(frozen=True)
class Replayed:
    job: int
    message: int
    service: str
    received_at: float
    subject: str
    old: Effect
    new: Effect
    loop_guard: str = ""  # what the loop guard found and who decided (LoopVerdict.describe)

    @property
    def changed(self) -> bool:
        return self.old != self.new


def parse_since(text: str, now: float | None = None) -> float:
    """'90m', '2h', '1d', '1w' ago, or an ISO date/time -> epoch seconds."""
    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"--since {text!r}: use e.g. 30m, 2h, 7d or 2024-05-01T08:00") from None


def candidate_rules(
    paths: list[Path], services: Mapping[str, ServiceRuntime]
) -> dict[str, ServiceRuntime]:
    """Swap in candidate rules: a directory keeps each service's file names, files replace all.

    Raises RuleError (file:line) when a candidate file is invalid, like `gateway check`.
    """
    if len(paths) == 1 and paths[0].is_dir():
        directory = paths[0]
        rulesets = {
            name: load_ruleset(
                [directory / p.name for p in rt.settings.rules], schedules=_schedules(rt)
            )
            for name, rt in services.items()
        }
    else:
        first = next(iter(services.values()), None)
        shared = load_ruleset(paths, schedules=_schedules(first) if first else None)
        rulesets = dict.fromkeys(services, shared)
    return {name: ServiceRuntime(rt.settings, rulesets[name]) for name, rt in services.items()}


def _schedules(runtime: ServiceRuntime) -> dict[str, Schedule]:
    """The running config's schedules, which candidate rules' `time` conditions may name."""
    return {s.name: s for s in runtime.ruleset.schedules}


def replay(
    store: ReportStore,
    services: Mapping[str, ServiceRuntime],
    since: float,
    *,
    regex_timeout: float = 0.5,
    only_service: str | None = None,
    loop_guard: str | None = None,
    installation_id: str = DEFAULT_INSTALLATION_ID,
) -> list[Replayed]:
    """Every decided job of mail received since `since`, with its stored and its new verdict.

    `loop_guard` ("strict" | "replies") tries that setting on every service instead of its own.
    """
    results = []
    for row in store.replay_candidates(since):
        if only_service and row["service"] != only_service:
            continue
        runtime = services.get(row["service"])
        if runtime is None:
            continue  # service no longer configured: nothing to compare with
        mode = loop_guard or runtime.settings.loop_guard
        results.append(_replay_one(row, runtime, regex_timeout, mode, installation_id))
    return results


def _replay_one(
    row: Mapping, runtime: ServiceRuntime, regex_timeout: float, mode: str, installation_id: str
) -> Replayed:
    mail = parse_message(row["raw"], row["mail_from"])
    loop = loop_verdict(mail, mode=mode, installation_id=installation_id)
    if sender_refusal(runtime.settings, row["raw"], row["mail_from"]) is not None:
        new = Effect(Outcome.SENDER_REFUSED, None, None)  # as the processor decides it
    elif loop.ignored:
        new = Effect(Outcome.LOOP_IGNORED, None, None)
    elif (auth := _authenticity(runtime, row)) is None:
        new = Effect(Outcome.UNAUTHENTICATED, None, None)
    else:
        new = _effect(
            runtime.ruleset, with_auth_fields(mail, auth), regex_timeout, row["received_at"]
        )
    return Replayed(
        job=row["job"],
        message=row["message"],
        service=row["service"],
        received_at=row["received_at"],
        subject=mail.subject,
        old=stored_effect(row["outcome"], row["action"], row["rule"], row["incident_key"]),
        new=new,
        loop_guard=loop.describe(),
    )


def _authenticity(runtime: ServiceRuntime, row: Mapping) -> AuthVerdict | None:
    """The sender check as replay can know it; None: the mail stays `unauthenticated`.

    `trusted_header` reads only the mail, so it is re-run. `verify` would need today's DNS for
    yesterday's mail (keys rotate): its stored verdict stands, and `auth.*` read 'none'."""
    settings = runtime.settings.authentication
    if settings.require != "verify":
        verdict = check_authenticity(settings, row["raw"], _no_dns)
        return None if verdict.refusal is not None else verdict
    if row["outcome"] == Outcome.UNAUTHENTICATED:
        return None
    return NOT_CHECKED


def _no_dns(name: str, timeout: float) -> bytes | None:
    raise AssertionError("replay never asks DNS")  # trusted_header needs none


def _effect(ruleset: Ruleset, mail, regex_timeout: float, at: float) -> Effect:
    try:
        decision = evaluate(ruleset, mail, regex_timeout=regex_timeout, at=at)
    except RuleEvaluationError as exc:
        return Effect(Outcome.QUARANTINED, exc.rule, None)
    if decision.action == "discard" or decision.incident_key is None:
        return Effect(non_action_outcome(decision), decision.rule, None)
    return Effect(decision.action, decision.rule, decision.incident_key)


def stored_effect(
    outcome: str | None, action: str | None, rule: str | None, key: str | None
) -> Effect:
    """The stored decision in the same terms (outcomes like trigger_duplicate -> trigger).
    A trigger a maintenance window suppressed is still what the rules decided: replay
    compares rules, and windows are configuration."""
    if outcome == Outcome.MAINTENANCE and action is not None:
        return Effect(action, rule, key)
    if outcome in NON_ACTIONS or action in (None, "discard"):
        kind = outcome if outcome in NON_ACTIONS else Outcome.DISCARDED
        return Effect(kind, rule, None)
    return Effect(action, rule, key)


def summary(results: Iterable[Replayed]) -> str:
    results = list(results)
    changed = sum(r.changed for r in results)
    return f"{len(results)} message(s) replayed, {changed} would change (nothing was sent)"
