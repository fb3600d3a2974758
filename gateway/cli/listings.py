"""`gateway incidents | messages | outbox`: tables over the store (the outbox can also retry
dead letters and flush what is due)."""

from __future__ import annotations

import argparse
import asyncio

from gateway.cli.common import EX_OK, EX_USAGE, UsageError, add_command, config, print_table
from gateway.delivery import dispatch as delivery
from gateway.delivery.paging import delivery_of, local_services
from gateway.display import when
from gateway.store import open_store


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "incidents",
        run_incidents,
        "list the local incident mirror",
        "gateway incidents --open",
    )
    p.add_argument("--open", action="store_true", help="only triggered/acknowledged incidents")
    p.add_argument("--service", help="only this service")

    p = add_command(
        subparsers,
        "messages",
        run_messages,
        "list recent messages with their decision and reason",
        "gateway messages --outcome unmatched quarantined",
    )
    p.add_argument("--outcome", nargs="+", help="only these outcomes")
    p.add_argument("--limit", type=int, default=50)

    p = add_command(
        subparsers,
        "outbox",
        run_outbox,
        "list pending and dead outbox items",
        "gateway outbox retry --all",
    )
    p.add_argument("action", nargs="?", choices=["list", "retry", "flush"], default="list")
    p.add_argument("id", nargs="?", type=int, help="item to retry")
    p.add_argument("--all", action="store_true", help="retry every dead letter")


def run_incidents(args: argparse.Namespace) -> int:
    settings = config(args)
    store = open_store(settings.db_path)
    local = local_services(settings.services)
    rows = [
        [
            i.service,
            i.incident_key,
            i.state,
            i.trigger_count,
            i.acknowledge_count,
            i.resolve_count,
            when(i.first_seen),
            when(i.last_seen),
            str(delivery_of(store, i, local))[:90],
        ]
        for i in store.incidents(open_only=args.open)
        if not args.service or i.service == args.service
    ]
    headers = ["service", "key", "state", "triggers", "acks", "resolves", "first seen", "last seen"]
    headers.append("PagerDuty")  # what PagerDuty was told: delivered / pending / NOT DELIVERED
    print_table(rows, headers, "no incidents")
    return EX_OK


def run_messages(args: argparse.Namespace) -> int:
    store = open_store(config(args).db_path)
    rows = [
        [
            j.message,
            when(j.received_at),
            j.source,
            j.service,
            j.outcome or "pending",
            j.rule or "-",
            j.incident_key or "-",
            j.reason or "",
        ]
        for j in store.jobs(outcomes=args.outcome, limit=args.limit)
    ]
    headers = ["message", "received", "source", "service", "outcome", "rule", "key", "reason"]
    print_table(rows, headers, "no messages")
    return EX_OK


def run_outbox(args: argparse.Namespace) -> int:
    settings = config(args)
    store = open_store(settings.db_path)
    if args.action == "retry":
        if args.id is None and not args.all:
            raise UsageError("outbox retry needs an item ID or --all")
        count = store.requeue_outbox(None if args.all else args.id)
        print(f"re-queued {count} item(s)")
        return EX_OK if count or args.all else EX_USAGE
    if args.action == "flush":
        asyncio.run(delivery.deliver_due(settings, 60))
    rows = [
        [
            o.id,
            o.kind,
            o.service,
            o.state,
            o.attempts,
            when(o.created_at),
            when(o.next_attempt_at) if o.state == "pending" else "-",
            (o.last_error or "")[:80],
            _describe(o.payload),
        ]
        for o in store.outbox()
    ]
    headers = [
        "id",
        "kind",
        "service",
        "state",
        "attempts",
        "created",
        "next try",
        "last error",
        "item",
    ]
    print_table(rows, headers, "outbox is empty")
    return EX_OK


def _describe(payload: dict) -> str:
    """One line for an outbox item: a PagerDuty event's action and key, or a mail's subject."""
    if "event_action" in payload:
        return f"{payload['event_action']} {payload.get('dedup_key', '')}"[:60]
    return str(payload.get("subject", ""))[:60]
