"""`gateway render | notify`: a notification theme rendered for a case, printed or sent."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from email.message import EmailMessage
from pathlib import Path

from gateway.cli.common import (
    EX_OK,
    EX_USAGE,
    UsageError,
    add_command,
    config,
    reading_config,
    setup_logging,
)
from gateway.delivery import dispatch as delivery
from gateway.display import printable
from gateway.store import OutboxItem, Store, open_store


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers,
        "render",
        run_render,
        "print the email a notification theme renders for a case (JSON)",
        "gateway render case_new --case tests/fixtures/case29.json",
    )
    p.add_argument("theme", help="theme name (a folder in templates_dir)")
    p.add_argument("--case", required=True, type=Path, help="the context, a JSON object")
    p.add_argument("--to", help="override the To address")
    p.add_argument("--templates", type=Path, help="templates directory instead of the config's")

    p = add_command(
        subparsers,
        "notify",
        run_notify,
        "render a theme for a case and send it through [outgoing] (via the outbox)",
        "gateway notify case_new --case tests/fixtures/case29.json --to desk@localhost",
    )
    p.add_argument("theme", help="theme name (a folder in templates_dir)")
    p.add_argument("--case", required=True, type=Path, help="the context, a JSON object")
    p.add_argument("--to", help="override the To address (and the recipient)")


def run_render(args: argparse.Namespace) -> int:
    from gateway.config import OutgoingSettings
    from gateway.themes.render import POLICY

    settings = None if args.templates else reading_config(args)  # renders, sends nothing
    directory = args.templates or settings.gateway.templates_dir
    outgoing = (settings.outgoing if settings else None) or OutgoingSettings()
    msg = _render_case(args, directory, outgoing.from_addr)
    sys.stdout.write(msg.as_string(policy=POLICY.clone(linesep="\n")))
    return EX_OK


def run_notify(args: argparse.Namespace) -> int:
    from gateway.decide import outgoing_mail

    settings = config(args)
    if settings.outgoing is None:
        raise UsageError(f"{settings.path}: no [outgoing] section (set host, port and from)")
    setup_logging(settings, "warning")
    msg = _render_case(args, settings.gateway.templates_dir, settings.outgoing.from_addr)
    store = open_store(settings.store_location)
    try:
        sender = outgoing_mail.envelope_sender(settings.outgoing.from_addr)
        item = outgoing_mail.queue_mail(store, msg, mail_from=sender)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    seconds = 2 * settings.outgoing.timeout_seconds
    asyncio.run(delivery.deliver_due(settings, seconds))
    left = _after_others_are_done(store, item, time.monotonic() + seconds)
    if left is None:
        print(f"sent {msg['Message-ID']} to {', '.join(outgoing_mail.recipients(msg))}")
        return EX_OK
    if left.state == "dead":
        print(
            f"error: relay refused outbox item {item}: {printable(left.last_error)}",
            file=sys.stderr,
        )
        return EX_USAGE
    print(
        f"queued as outbox item {item}, not delivered yet ({printable(left.last_error)}); "
        "`gateway serve` retries it",
        file=sys.stderr,
    )
    return EX_OK


def _after_others_are_done(store: Store, item: int, deadline: float) -> OutboxItem | None:
    """The item if it is still pending or dead, None once delivered. A running `gateway serve`
    may have claimed it first: then wait (until `deadline`) for its attempt to finish."""
    while True:
        left = store.outbox_item(item)
        if left is None or left.state == "done":
            return None
        if not left.in_flight(time.time()) or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def _render_case(args: argparse.Namespace, directory: Path, default_from: str) -> EmailMessage:
    """Render args.theme with args.case; theme problems become one clear error (exit 1)."""
    from gateway.themes import render as themes

    try:
        context = themes.load_context(args.case)
        # a helpdesk's notification, sent on its behalf to be taken in: no loop stamp
        msg = themes.Themes(directory).render(
            args.theme, context, default_from=default_from, for_intake=True
        )
        if args.to:
            themes.replace_header(msg, "To", args.to)
    except themes.ThemeError as exc:
        raise UsageError(str(exc)) from None
    except RecursionError:  # absurdly nested JSON: the parser runs out of stack
        raise UsageError(f"{args.case}: JSON nested too deeply") from None
    return msg
