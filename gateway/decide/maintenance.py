"""Maintenance windows: while one of its service's windows is active, a trigger is suppressed
(recorded as `maintenance_suppressed`, nothing sent, no incident) or downgraded (sent with the
window's severity, the reason saying so). Acknowledges and resolves always go through, so an
incident opened before the window can still be closed during it.

The instant judged is when the mail was accepted, like `time` conditions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from gateway.rules import Decision
from gateway.schedules import MaintenanceWindow

_RANK = {"critical": 0, "error": 1, "warning": 2, "info": 3}  # higher is milder


def milder(severity: str, other: str) -> str:
    """The milder of two PagerDuty severities (info < warning < error < critical)."""
    return max(severity, other, key=lambda s: _RANK.get(s, 0))


def active_window(
    windows: Iterable[MaintenanceWindow], service: str, at: float
) -> MaintenanceWindow | None:
    """The first of the service's windows active at `at`; suppressing ones win over others."""
    active = [w for w in windows if w.service == service and w.active_at(at)]
    suppressing = [w for w in active if w.mode == "suppress"]
    return (suppressing or active or [None])[0]


def during_maintenance(
    decision: Decision, window: MaintenanceWindow | None
) -> tuple[Decision, bool]:
    """(the decision to act on, whether it is suppressed); only triggers are affected."""
    if window is None or decision.action != "trigger":
        return decision, False
    if window.mode == "suppress":
        reason = f"{decision.reason}; suppressed by maintenance window {window.name!r}"
        return replace(decision, reason=reason), True
    if milder(decision.severity, window.severity) == decision.severity:
        return decision, False  # already as low or lower: a window never raises severity
    reason = (
        f"{decision.reason}; severity {decision.severity} downgraded to {window.severity}"
        f" by maintenance window {window.name!r}"
    )
    return replace(decision, severity=window.severity, reason=reason), False
