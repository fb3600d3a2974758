"""`gateway replay`: stored mail through the current or candidate rules (gateway/decide/replay.py);
shows what would change and never sends or changes anything."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.common import (
    EX_OK,
    UsageError,
    add_command,
    print_json_lines,
    print_table,
    reading_config,
    reading_store,
)
from gateway.config import LOOP_GUARD_MODES
from gateway.decide.processor import load_services
from gateway.display import iso_utc, when

if TYPE_CHECKING:
    from gateway.decide.replay import Replayed


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "replay",
        run,
        "re-run stored mail through the current or candidate rules and show what would change;"
        " never sends or changes anything",
        "gateway replay --since 2h --rules /tmp/new-rules/",
    )
    p.add_argument("--since", default="24h", help="how far back: 30m, 2h, 7d or an ISO date")
    p.add_argument(
        "--rules",
        nargs="+",
        type=Path,
        help="candidate rules: a directory (each service's file names) or files (all services)",
    )
    p.add_argument("--service", help="only this service")
    p.add_argument(
        "--loop-guard",
        choices=LOOP_GUARD_MODES,
        help="try this loop_guard setting on every service instead of its own",
    )
    p.add_argument("--all", action="store_true", help="also list messages that would not change")
    p.add_argument(
        "--dry-run", action="store_true", help="accepted for clarity: replay never acts anyway"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line, no summary")


def run(args: argparse.Namespace) -> int:
    from gateway.decide import replay

    settings = reading_config(args)  # replay only reads: no secrets, read-only store
    try:
        since = replay.parse_since(args.since)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    services = load_services(settings.services, schedules=settings.schedules)
    if args.rules:
        services = replay.candidate_rules(args.rules, services)
    if args.service:
        settings.service(args.service)  # KeyError names the configured services
    results = replay.replay(
        reading_store(settings),
        services,
        since,
        regex_timeout=settings.gateway.regex_timeout_seconds,
        only_service=args.service,
        loop_guard=args.loop_guard,
        installation_id=settings.gateway.installation_id,
    )
    shown = [r for r in results if r.changed or args.all]
    if args.json:
        print_json_lines(replayed_json(r) for r in shown)
        return EX_OK
    rows = [
        [r.message, when(r.received_at), r.service, r.subject[:50], str(r.old), str(r.new)]
        for r in shown
    ]
    headers = ["message", "received", "service", "subject", "stored decision", "would now be"]
    if any(r.loop_guard for r in shown):  # which loop-guard reason applied, and who decided
        rows = [[*row, r.loop_guard or "-"] for row, r in zip(rows, shown, strict=True)]
        headers.append("loop guard")
    print_table(rows, headers, "no differences")
    print(replay.summary(results))
    return EX_OK


def replayed_json(r: Replayed) -> dict[str, object]:
    """The `gateway replay --json` object (fields documented in the README)."""
    return {
        "message": r.message,
        "job": r.job,
        "received_at": iso_utc(r.received_at),
        "service": r.service,
        "subject": r.subject,
        "changed": r.changed,
        "stored": {"outcome": str(r.old.kind), "rule": r.old.rule, "key": r.old.key},
        "would_be": {"outcome": str(r.new.kind), "rule": r.new.rule, "key": r.new.key},
        "loop_guard": r.loop_guard or None,
    }
