"""`gateway imap-once`: one fetch cycle of one [[imap]] account (for cron), then process and
deliver like `ingest`; 75 (EX_TEMPFAIL) if the mailbox failed or a message could not be read
(it is retried on the next run), 1 if it refused the login."""

from __future__ import annotations

import argparse
import sys

from gateway.cli.common import (
    EX_OK,
    EX_TEMPFAIL,
    EX_USAGE,
    UsageError,
    add_command,
    config,
    process_and_deliver,
    setup_logging,
)
from gateway.decide.processor import load_services
from gateway.display import printable
from gateway.store import open_store


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "imap-once",
        run,
        "fetch new mail from one [[imap]] account once (for cron), process and deliver it",
        "gateway imap-once desk-mailbox",
    )
    p.add_argument("name", help="the name of an [[imap]] account in the config")
    p.add_argument("--no-deliver", action="store_true", help="only accept; leave the rest to serve")


def run(args: argparse.Namespace) -> int:
    from gateway.intake import imap  # imported lazily: only this command and serve need imapclient

    settings = config(args)
    services = load_services(settings.services, schedules=settings.schedules)
    setup_logging(settings, "warning")
    account = next((a for a in settings.imap if a.name == args.name), None)
    if account is None:
        known = ", ".join(a.name for a in settings.imap) or "none"
        raise UsageError(f"unknown imap account {args.name!r} (configured: {known})")
    store = open_store(settings.store_location)
    try:
        result = imap.run_once(account, store)
    except imap.ImapAuthError as exc:  # the server's words: escaped like mail
        print(f"error: imap {account.name}: {printable(exc)}", file=sys.stderr)
        return EX_USAGE
    except (imap.ImapError, OSError, imap.IMAPClient.Error) as exc:
        print(f"error: imap {account.name}: {printable(exc)}", file=sys.stderr)
        return EX_TEMPFAIL
    unread = f", {result.failed} could not be read (retried next run)" if result.failed else ""
    print(
        f"{account.name}: accepted {result.accepted} message(s) ({result.duplicates} duplicate),"
        f" {result.oversize} left in place as too big{unread}"
    )
    if not args.no_deliver:
        process_and_deliver(settings, services, store)
    return EX_TEMPFAIL if result.failed else EX_OK  # cron should hear of an unread message
