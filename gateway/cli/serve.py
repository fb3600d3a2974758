"""`gateway serve`: the long-running service (SMTP, IMAP, processor, dispatchers, web)."""

from __future__ import annotations

import argparse

from gateway.cli.common import add_command, config, setup_logging


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers,
        "serve",
        run,
        "run the SMTP listener, processor and dispatchers",
        "gateway serve",
    )


def run(args: argparse.Namespace) -> int:
    from gateway.runtime import service  # imported lazily: aiosmtpd is only needed here

    settings = config(args)
    setup_logging(settings)
    return service.run(settings)
