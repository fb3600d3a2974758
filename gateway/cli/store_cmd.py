"""`gateway store copy`: move an installation from its SQLite file to PostgreSQL."""

from __future__ import annotations

import argparse

from gateway.cli.common import EX_OK, add_command
from gateway.store import copy_store


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "store",
        run,
        "copy the whole store (pending mail and outbox, incidents, history) from SQLite into"
        " an empty PostgreSQL database; stop the gateway first",
        "gateway store copy --from sqlite:///var/lib/gateway/gateway.sqlite3"
        " --to postgresql://gateway@db/gateway",
    )
    parser.add_argument("action", choices=["copy"], help="what to do (copy)")
    parser.add_argument("--from", dest="source", required=True, help="sqlite:///path (or a path)")
    parser.add_argument("--to", dest="target", required=True, help="postgresql://user@host/db")


def run(args: argparse.Namespace) -> int:
    counts = copy_store(args.source, args.target)
    rows = ", ".join(f"{table} {count}" for table, count in counts.items())
    print(f"OK: copied {rows}")
    return EX_OK
