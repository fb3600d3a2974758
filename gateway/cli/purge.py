"""`gateway purge`: apply the retention policy now (gateway/runtime/retention.py)."""

from __future__ import annotations

import argparse

from gateway.cli.common import EX_OK, add_command, reading_config, reading_store
from gateway.store import open_store


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "purge",
        run,
        "delete stored mail, decisions and events older than retention_days"
        " (open incidents, pending jobs and outbox items are kept)",
        "gateway purge --dry-run",
    )
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("--days", type=int, help="override [gateway] retention_days")


def run(args: argparse.Namespace) -> int:
    from gateway.runtime import retention

    settings = reading_config(args)  # purging needs no secret
    days = settings.gateway.retention_days if args.days is None else args.days
    if days <= 0:
        print("retention_days is 0: everything is kept, nothing to purge")
        return EX_OK
    store = reading_store(settings) if args.dry_run else open_store(settings.store_location)
    if args.dry_run:
        counts = retention.plan(store, days)
        print(f"would delete (older than {days} days): {retention.describe(counts)}")
        return EX_OK
    counts = retention.purge(store, days)
    print(f"deleted (older than {days} days): {retention.describe(counts)}")
    return EX_OK
