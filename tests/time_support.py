"""Fixed clocks for the time features: mail accepted at a chosen instant, a processor whose
`now` the test moves, and instants written as Berlin wall-clock time."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import gateway.store.sqlite.spool as spool_module
from gateway.config import Config, load_config
from gateway.decide.processor import Processor, load_services
from gateway.intake.spool import incoming
from gateway.store import Store
from tests.conftest import write_config

BERLIN = ZoneInfo("Europe/Berlin")


def berlin(text: str) -> float:
    """'2026-12-23T10:00' as Berlin wall-clock time -> Unix time."""
    return datetime.fromisoformat(text).replace(tzinfo=BERLIN).timestamp()


class Clock:
    """A clock that only moves when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:  # stands in for the `time` module where the store reads it
        return self.now


def accept_at(
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    at: float,
    *mails: bytes,
    service: str = "helpdesk",
) -> None:
    """Spool `mails` as if they were accepted at `at` (the instant time features judge)."""
    with monkeypatch.context() as patch:
        patch.setattr(spool_module, "time", Clock(at))
        store.accept([incoming(raw, source="cli", services=(service,)) for raw in mails])


def config(tmp_path: Path, extra: str, *, routing_key: str | None = "R" * 32) -> Config:
    return load_config(write_config(tmp_path, routing_key=routing_key, extra=extra))


def processor(store: Store, settings: Config, clock: Clock) -> Processor:
    services = load_services(settings.services, schedules=settings.schedules)
    return Processor(
        store,
        services,
        settings.pagerduty,
        clock=clock,
        maintenance=settings.maintenance,
        heartbeats=settings.heartbeats,
    )
