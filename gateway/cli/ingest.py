"""`gateway ingest`: accept one email from a file or an MTA pipe, then process and deliver it.

Exit 0 only once the mail is durable; 75 (EX_TEMPFAIL) when it is not, so the MTA retries.
"""

from __future__ import annotations

import argparse
import sys

from gateway.cli.common import (
    EX_OK,
    EX_TEMPFAIL,
    add_command,
    config,
    process_and_deliver,
    read_input,
    setup_logging,
)
from gateway.decide.processor import load_services
from gateway.errors import ConfigError, RuleError
from gateway.intake import spool as intake
from gateway.store import open_store


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "ingest",
        run,
        "accept one email (exit 0 once durable, 75 to retry later), process and deliver it",
        "gateway ingest mail.eml --service helpdesk",
    )
    p.add_argument("file", help="an .eml file, or - for standard input")
    p.add_argument("--service", required=True, help="service the mail is for")
    p.add_argument("--sender", default=None, help="envelope sender (empty string for bounces)")
    p.add_argument("--no-deliver", action="store_true", help="only accept; leave the rest to serve")


def run(args: argparse.Namespace) -> int:
    try:
        settings = config(args)
        services = load_services(settings.services, schedules=settings.schedules)
    except (ConfigError, RuleError) as exc:
        # A broken config is the operator's to fix; the MTA must keep the mail and retry.
        print(f"error: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    setup_logging(settings, "warning")
    settings.service(args.service)
    raw = read_input(args.file)
    mail = intake.incoming(raw, source="cli", services=(args.service,), mail_from=args.sender)
    store = open_store(settings.store_location)
    [accepted] = store.accept([mail])  # one durable commit: only then exit 0
    if accepted.duplicate_of is not None:
        print(f"accepted as message {accepted.id} (duplicate of {accepted.duplicate_of})")
        return EX_OK
    print(f"accepted as message {accepted.id}")
    if not args.no_deliver:
        process_and_deliver(settings, services, store)
    return EX_OK
