"""`gateway webhooks`: the PagerDuty webhook deliveries the gateway stored, newest first, and
what deciding each one did (mirrored, notified, unknown_key, ... or still pending).

Read-only like the other listings (`gateway.cli.listings`): the config without its secrets,
the store opened read-only, so an on-call engineer needs only read access. `--json` prints
one object per line (fields documented in the README); values from PagerDuty are escaped.
"""

from __future__ import annotations

import argparse

from gateway.cli.common import (
    EX_OK,
    add_command,
    add_listing_options,
    check_choice,
    print_json_lines,
    print_table,
    reading_config,
    reading_store,
    showing,
)
from gateway.decide.pagerduty_side import WEBHOOK_OUTCOMES
from gateway.display import iso_utc, when
from gateway.store import PagerDutyEvent

OUTCOMES = (*WEBHOOK_OUTCOMES, "pending")  # what --outcome accepts
HEADERS = ["id", "received", "type", "key", "service", "outcome", "detail"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "webhooks",
        run,
        "list PagerDuty webhook deliveries (newest first) and what deciding each one did",
        "gateway webhooks --outcome unknown_key",
    )
    p.add_argument("--outcome", help=f"only this outcome ({', '.join(OUTCOMES)})")
    add_listing_options(p)


def run(args: argparse.Namespace) -> int:
    outcome = check_choice("outcome", args.outcome, OUTCOMES) if args.outcome else None
    settings = reading_config(args)
    store = reading_store(settings)
    total = store.count_pagerduty_events(outcome=outcome)
    limit = max(total, 1) if args.all else args.limit
    events = store.pagerduty_events(outcome=outcome, limit=limit)
    if args.json:
        print_json_lines(webhook_json(e) for e in events)
        return EX_OK
    print_table([_row(e) for e in events], HEADERS, "no webhook deliveries")
    if events:
        print(showing(len(events), total, "webhook deliveries"))
    return EX_OK


def _row(e: PagerDutyEvent) -> list[object]:
    return [
        e.id,
        when(e.received_at),
        e.event_type,
        e.incident_key or e.pd_incident or "-",
        e.service or "-",
        e.outcome if e.state == "done" else "pending",
        e.detail[:80],
    ]


def webhook_json(e: PagerDutyEvent) -> dict[str, object]:
    """The `gateway webhooks --json` object (fields documented in the README)."""
    return {
        "id": e.id,
        "received_at": iso_utc(e.received_at),
        "webhook_id": e.webhook_id,
        "event_id": e.event_id,
        "event_type": e.event_type,
        "key": e.incident_key or None,
        "pd_incident": e.pd_incident or None,
        "service": e.service or None,
        "state": e.state,
        "outcome": e.outcome if e.state == "done" else None,
        "detail": e.detail,
    }
