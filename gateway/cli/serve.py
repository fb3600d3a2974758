"""`gateway serve`: the long-running service (SMTP, IMAP, processor, dispatchers, web)."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from gateway.cli.common import EX_USAGE, add_command, config, setup_logging
from gateway.display import printable

UNIT = "systemd/gateway.service"
log = logging.getLogger(__name__)


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
    try:
        return service.run(settings)
    except OSError as exc:  # a listener could not bind: the operator's to fix, in one line
        log.debug("serve stopped by an OSError", exc_info=True)  # the traceback, if asked for
        print(f"error: {printable(start_failure(exc))}", file=sys.stderr)
        return EX_USAGE


def start_failure(exc: OSError) -> str:
    """What went wrong and what to do, for an OSError that stopped `serve` from starting
    (the listener names the address in `strerror`)."""
    what = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return f"{what}: another process listens there (`ss -ltnp` shows which)"
    if exc.errno == errno.EACCES:
        return (
            f"{what}: ports below 1024 need the CAP_NET_BIND_SERVICE capability; the systemd"
            f" unit ({UNIT}) grants it (AmbientCapabilities=CAP_NET_BIND_SERVICE): run"
            " `systemctl start gateway`, or listen on a port above 1023 such as 2525"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{what}: no interface of this host has that address"
    return what
