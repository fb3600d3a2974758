"""`gateway incidents | messages | outbox`: listings over the store (the outbox can also retry
dead letters and flush what is due).

Listings only read: they load the config without its secrets and open the store read-only,
so they run with read access alone. Every listing has `--json` (one object per line, the
fields documented in the README) and `--limit` / `--all`; human tables end with
"showing N of M". Values from mail are escaped in both (`gateway.display`).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator

from gateway.cli.common import (
    EX_OK,
    EX_USAGE,
    UsageError,
    add_command,
    add_listing_options,
    check_choice,
    check_service,
    config,
    print_json_lines,
    print_table,
    reading_config,
    reading_store,
    showing,
)
from gateway.delivery import dispatch as delivery
from gateway.display import iso_utc, when
from gateway.mail.summary import subject_and_from
from gateway.outcomes import Outcome
from gateway.store import Incident, ListedJob, ReportStore, open_store

PAGE = 1000  # jobs read per query for --all
OUTCOMES = (*(o.value for o in Outcome), "pending")  # what --outcome accepts


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
    add_listing_options(p)

    p = add_command(
        subparsers,
        "messages",
        run_messages,
        "list recent messages (by message id, as SMTP's `queued as N`) with sender, subject,"
        " decision and reason",
        "gateway messages --outcome unmatched quarantined",
    )
    p.add_argument("--outcome", nargs="+", help=f"only these outcomes ({', '.join(OUTCOMES)})")
    p.add_argument("--service", help="only this service")
    add_listing_options(p)

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
    settings = reading_config(args)
    store = reading_store(settings)
    service = check_service(args.service, settings, store)
    total = store.count_incidents(open_only=args.open, service=service)
    limit = max(total, 1) if args.all else args.limit
    incidents = store.incidents(open_only=args.open, limit=limit, service=service)
    if args.json:
        print_json_lines(incident_json(i) for i in incidents)
        return EX_OK
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
        ]
        for i in incidents
    ]
    headers = ["service", "key", "state", "triggers", "acks", "resolves", "first seen", "last seen"]
    print_table(rows, headers, "no incidents")
    if rows:
        print(showing(len(rows), total, "incidents"))
    return EX_OK


def incident_json(i: Incident) -> dict[str, object]:
    """The `gateway incidents --json` object (fields documented in the README)."""
    return {
        "service": i.service,
        "key": i.incident_key,
        "state": i.state,
        "summary": i.summary,
        "triggers": i.trigger_count,
        "acknowledges": i.acknowledge_count,
        "resolves": i.resolve_count,
        "times_opened": i.times_opened,
        "first_seen": iso_utc(i.first_seen),
        "last_seen": iso_utc(i.last_seen),
        "opened_at": iso_utc(i.opened_at),
        "resolved_at": iso_utc(i.resolved_at),
        "last_message": i.last_message,
    }


def run_messages(args: argparse.Namespace) -> int:
    outcomes = [check_choice("outcome", o, OUTCOMES) for o in args.outcome or ()] or None
    settings = reading_config(args)
    store = reading_store(settings)
    service = check_service(args.service, settings, store)
    total = store.count_jobs(outcomes=outcomes, service=service)
    listed = _listed_jobs(store, outcomes, service, None if args.all else args.limit)
    if args.json:
        print_json_lines(message_json(item) for item in listed)
        return EX_OK
    rows = [_message_row(item) for item in listed]
    headers = ["message", "received", "source", "service", "from", "subject", "outcome"]
    print_table(rows, [*headers, "rule", "key", "reason"], "no messages")
    if rows:
        print(showing(len(rows), total, "messages"))
    return EX_OK


def _listed_jobs(
    store: ReportStore, outcomes: list[str] | None, service: str | None, limit: int | None
) -> Iterator[ListedJob]:
    """Newest first, page by page (--all on a big spool never holds every mail head at once)."""
    before = None
    while limit is None or limit > 0:
        size = PAGE if limit is None else min(PAGE, limit)
        page = store.list_jobs(outcomes=outcomes, service=service, before_job=before, limit=size)
        yield from page
        if len(page) < size:
            return
        before = page[-1].job.id
        limit = None if limit is None else limit - len(page)


def _message_row(item: ListedJob) -> list[object]:
    j = item.job
    subject, from_ = subject_and_from(item.head)
    return [
        j.message,
        when(j.received_at),
        j.source,
        j.service,
        _cut(from_ or item.mail_from or "", 40),
        _cut(subject, 50),
        j.outcome or "pending",
        j.rule or "-",
        j.incident_key or "-",
        j.reason or "",
    ]


def message_json(item: ListedJob) -> dict[str, object]:
    """The `gateway messages --json` object (fields documented in the README)."""
    j = item.job
    subject, from_ = subject_and_from(item.head)
    return {
        "message": j.message,
        "job": j.id,
        "received_at": iso_utc(j.received_at),
        "source": j.source,
        "service": j.service,
        "sender": item.mail_from,
        "from": from_,
        "subject": subject,
        "state": j.state,
        "outcome": j.outcome,
        "rule": j.rule,
        "action": j.action,
        "key": j.incident_key,
        "summary": j.summary,
        "reason": j.reason,
    }


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def run_outbox(args: argparse.Namespace) -> int:
    listing = args.action == "list"  # read-only: no secrets, no write access needed
    settings = reading_config(args) if listing else config(args)
    store = reading_store(settings) if listing else open_store(settings.db_path)
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
