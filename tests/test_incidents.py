"""Incident mirror semantics: duplicates counted, harmless resolves, reopen after resolve."""

from __future__ import annotations

from gateway.decide.incidents import apply_action
from gateway.outcomes import Outcome


def act(existing, action: str, now: float = 1.0):
    return apply_action(existing, service="s", key="k", action=action, now=now, summary="sum")


def test_trigger_opens_then_counts_duplicates() -> None:
    opened, outcome = act(None, "trigger")
    assert (opened.state, opened.trigger_count, outcome) == ("triggered", 1, Outcome.TRIGGERED)
    again, outcome = act(opened, "trigger", 2.0)
    assert (again.trigger_count, again.last_seen, outcome) == (2, 2.0, Outcome.DUPLICATE)


def test_acknowledge_and_resolve_an_open_incident() -> None:
    opened, _ = act(None, "trigger")
    acked, outcome = act(opened, "acknowledge")
    assert (acked.state, outcome) == ("acknowledged", Outcome.ACKNOWLEDGED)
    resolved, outcome = act(acked, "resolve", 5.0)
    assert (resolved.state, resolved.resolved_at, outcome) == ("resolved", 5.0, Outcome.RESOLVED)


def test_resolve_without_open_incident_is_harmless() -> None:
    assert act(None, "resolve") == (None, Outcome.RESOLVE_NO_INCIDENT)
    opened, _ = act(None, "trigger")
    resolved, _ = act(opened, "resolve")
    unchanged, outcome = act(resolved, "resolve")
    assert unchanged == resolved and outcome == Outcome.RESOLVE_NO_INCIDENT
    assert act(None, "acknowledge") == (None, Outcome.ACK_NO_INCIDENT)


def test_trigger_after_resolve_reopens() -> None:
    opened, _ = act(None, "trigger", 1.0)
    resolved, _ = act(opened, "resolve", 2.0)
    reopened, outcome = act(resolved, "trigger", 3.0)
    assert outcome == Outcome.TRIGGERED
    assert (reopened.times_opened, reopened.trigger_count, reopened.first_seen) == (2, 1, 1.0)
    assert reopened.resolved_at is None
