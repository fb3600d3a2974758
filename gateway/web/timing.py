"""The status page's time section: maintenance windows (active now or not, what they did) and
heartbeats (expected mail: last seen, next deadline, missing or not).

The configuration says what exists; the store says what happened (suppressed mail, heartbeat
state), so a window or heartbeat shows even before its first mail.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config_time import HeartbeatSettings
from gateway.decide import heartbeats
from gateway.outcomes import Outcome
from gateway.schedules import MaintenanceWindow
from gateway.store import HeartbeatState, ReportStore


@dataclass(frozen=True)
class WindowRow:
    window: MaintenanceWindow
    active: bool
    suppressed: int  # mail of its service recorded as maintenance_suppressed (kept, listed)


@dataclass(frozen=True)
class HeartbeatRow:
    beat: HeartbeatSettings
    state: HeartbeatState | None
    deadline: float | None  # when it counts as missing; None before the gateway first looked

    @property
    def missing(self) -> bool:
        return self.state is not None and self.state.missing_since is not None


def maintenance_rows(
    store: ReportStore, windows: Sequence[MaintenanceWindow], now: float
) -> list[WindowRow]:
    counts: dict[str, int] = {}
    rows = []
    for window in windows:
        if window.service not in counts:
            counts[window.service] = store.count_jobs(
                outcomes=[Outcome.MAINTENANCE], service=window.service
            )
        rows.append(WindowRow(window, window.active_at(now), counts[window.service]))
    return rows


def heartbeat_rows(store: ReportStore, beats: Sequence[HeartbeatSettings]) -> list[HeartbeatRow]:
    if not beats:
        return []
    states = {s.name: s for s in store.mail_heartbeats()}
    rows = []
    for beat in beats:
        state = states.get(beat.name)
        deadline = None if state is None else heartbeats.deadline(beat, state)
        rows.append(HeartbeatRow(beat, state, deadline))
    return rows
