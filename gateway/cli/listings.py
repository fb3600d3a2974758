"""`gateway incidents | messages | outbox`: listings over the store; the outbox can also retry
dead letters and flush what is due, and an incident can be resolved by hand.

Listings only read: they load the config without its secrets and open the store read-only,
so they run with read access alone. Every listing has `--json` (one object per line, the
fields documented in the README); incidents and messages take `--limit` / `--all` and their
human tables end with "showing N of M". Values from mail are escaped in both
(`gateway.display`).
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import sys
import time
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
from gateway.decide.manual import ResolveRefused, resolve_incident
from gateway.delivery import dispatch as delivery
from gateway.delivery.paging import delivery_of, local_services
from gateway.display import iso_utc, when
from gateway.mail.summary import subject_and_from
from gateway.outcomes import Outcome
from gateway.store import Incident, ListedJob, OutboxItem, ReportStore, Store, open_store

PAGE = 1000  # jobs read per query for --all
OUTCOMES = (*(o.value for o in Outcome), "pending")  # what --outcome accepts


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "incidents",
        run_incidents,
        "list the local incident mirror, or resolve a stuck incident by hand",
        "gateway incidents --open",
    )
    p.add_argument("--open", action="store_true", help="only triggered/acknowledged incidents")
    p.add_argument("--service", help="only this service")
    p.add_argument(
        "action", nargs="?", choices=["list", "resolve"], default="list", help="resolve SERVICE KEY"
    )
    p.add_argument("target", nargs="*", metavar="SERVICE KEY", help="the incident to resolve")
    p.add_argument(
        "--send", action="store_true", help="resolve: also send the resolve event to PagerDuty"
    )
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
        "list pending and dead outbox items; retry dead letters; flush what is due",
        "gateway outbox retry --all",
    )
    p.add_argument("action", nargs="?", choices=["list", "retry", "flush"], default="list")
    p.add_argument("id", nargs="?", type=int, help="item to retry")
    p.add_argument(
        "--all",
        action="store_true",
        help="retry: every dead letter; flush: also the items waiting for their next try",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="retry: re-queue even after a later item of its key went out (out of order)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per item and line")


def run_incidents(args: argparse.Namespace) -> int:
    if args.action == "resolve":
        return run_resolve(args)
    settings = reading_config(args)
    store = reading_store(settings)
    service = check_service(args.service, settings, store)
    local = local_services(settings.services)
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
            i.coalesced,
            when(i.first_seen),
            when(i.last_seen),
            str(delivery_of(store, i, local))[:90],
        ]
        for i in incidents
    ]
    headers = ["service", "key", "state", "triggers", "acks", "resolves", "coalesced"]
    headers += ["first seen", "last seen"]
    headers.append("PagerDuty")  # what PagerDuty was told: delivered / pending / NOT DELIVERED
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
        "coalesced": i.coalesced,  # repeat triggers absorbed since it (last) opened
        "coalesced_at": iso_utc(i.coalesced_at),
        "latest_details": _json_or_none(i.latest_details),
    }


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


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
    store = reading_store(settings) if listing else open_store(settings.store_location)
    if args.action == "retry":
        return _retry(store, args)
    if args.action == "flush":
        if args.all:
            store.expedite_outbox(time.time())
        asyncio.run(delivery.deliver_due(settings, 60))
    items = store.outbox()
    if args.json:
        now = time.time()
        print_json_lines(_outbox_record(item, now) for item in items)
        return EX_OK
    print_table([_outbox_row(o) for o in items], OUTBOX_HEADERS, "outbox is empty")
    return EX_OK


OUTBOX_HEADERS = [
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


def _outbox_row(o: OutboxItem) -> list[object]:
    if o.in_flight(time.time()):
        next_try = f"in flight ({o.lease_owner})"
    else:
        next_try = when(o.next_attempt_at) if o.state == "pending" else "-"
    return [
        o.id,
        o.kind,
        o.service,
        o.state,
        o.attempts,
        when(o.created_at),
        next_try,
        (o.last_error or "")[:80],
        o.describe()[:60],
    ]


def _outbox_record(o: OutboxItem, now: float) -> dict[str, object]:
    """One `outbox --json` line; the fields are documented in the README."""
    payload = o.payload
    if o.kind == "mail":  # the rendered message can be large: its envelope and subject
        payload = {k: payload.get(k) for k in ("mail_from", "rcpt_tos", "subject")}
    if "routing_key" in payload:  # an incident's opening key (routing-key fidelity): a secret
        payload = {**payload, "routing_key": "(the key that opened the incident)"}
    return {
        "id": o.id,
        "kind": o.kind,
        "service": o.service,
        "order_key": o.order_key,
        "state": o.state,
        "in_flight": o.in_flight(now),
        "lease_owner": o.lease_owner or None,
        "attempts": o.attempts,
        "created_at": iso_utc(o.created_at),
        "requeued_at": iso_utc(o.requeued_at),
        "next_attempt_at": iso_utc(o.next_attempt_at) if o.state == "pending" else None,
        "item": o.describe(),
        "last_error": o.last_error,
        "response": o.response,
        "payload": payload,
    }


def _retry(store: Store, args: argparse.Namespace) -> int:
    """Re-queue one dead letter or all; say why for each one that was not (exit 1 then)."""
    if args.id is None and not args.all:
        raise UsageError("outbox retry needs an item ID or --all")
    if args.id is not None and args.all:
        raise UsageError("outbox retry takes an item ID or --all, not both")
    outcome = store.retry_outbox(None if args.all else args.id, force=args.force)
    if args.id is not None and outcome.refused:
        print(f"error: {outcome.refused[0].reason}", file=sys.stderr)
        return EX_USAGE
    for forced in outcome.forced:
        print(f"warning: re-queued out of order: {forced.reason}", file=sys.stderr)
    items = ", ".join(f"#{i}" for i in outcome.requeued)
    print(f"re-queued {len(outcome.requeued)} item(s){': ' + items if items else ''}")
    for refusal in outcome.refused:
        print(f"refused: {refusal.reason}", file=sys.stderr)
    if outcome.requeued:
        print("`gateway serve` sends them within seconds (or run `gateway outbox flush`)")
    return EX_USAGE if outcome.refused else EX_OK


def run_resolve(args: argparse.Namespace) -> int:
    """`gateway incidents resolve SERVICE KEY [--send]`."""
    if len(args.target) != 2:
        raise UsageError("incidents resolve needs SERVICE and KEY (quote a key with spaces)")
    service, key = args.target
    settings = config(args)
    known = {s.name: s for s in settings.services}
    store = open_store(settings.store_location)
    try:
        done = resolve_incident(store, service, key, send=args.send, settings=known.get(service))
    except ResolveRefused as exc:
        hint = _did_you_mean(store, service, key)
        if service not in known:
            hint += f" (services in {settings.path.name}: {', '.join(sorted(known))})"
        print(f"error: {exc}{hint}", file=sys.stderr)
        return EX_USAGE
    state = (
        "resolved" if done.was_open else f"was already resolved ({when(done.incident.resolved_at)})"
    )
    print(f"{service}: {key!r} {state} in the local mirror")
    if done.queued is not None:
        asyncio.run(delivery.deliver_due(settings, 2 * settings.pagerduty.timeout_seconds))
        print(_resolve_delivery(store, done.queued))
    return EX_OK


def _resolve_delivery(store: Store, item: int) -> str:
    sent = store.outbox_item(item)
    if sent is not None and sent.state == "done":
        return f"resolve event sent to PagerDuty (outbox #{item})"
    if sent is not None and sent.last_error:
        why = f": {sent.last_error}"
    else:
        why = " (it waits for the earlier items of its key)"
    return f"resolve event queued as outbox #{item}, not sent yet{why}; `gateway serve` retries"


def _did_you_mean(store: Store, service: str, key: str) -> str:
    keys = [i.incident_key for i in store.incidents(open_only=True) if i.service == service]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    return f" (open incidents like it: {', '.join(repr(k) for k in close)})" if close else ""
