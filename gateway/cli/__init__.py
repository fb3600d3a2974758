"""The `gateway` command: builds objects, calls one library function, maps errors to exit codes.

Each command lives in its own module with `register(subparsers)` and `run(args) -> int`;
shared helpers are in `common`. Exit codes: 0 ok, 1 usage or validation error, 75
(EX_TEMPFAIL) transient failure in `ingest` so that an MTA pipe (Postfix `pipe`, procmail,
fetchmail) retries the delivery later.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from gateway import __version__
from gateway.cli import (
    check,
    hash_password,
    imap_once,
    ingest,
    listings,
    purge,
    replay,
    rules_cmd,
    serve,
    themes_cmd,
)
from gateway.cli.common import EX_OK, EX_TEMPFAIL, EX_USAGE, UsageError
from gateway.errors import ConfigError, RuleError, StoreError, ThemeError

__all__ = ["EX_OK", "EX_TEMPFAIL", "EX_USAGE", "build_parser", "main"]

# in the order `gateway --help` lists them
COMMANDS = (
    serve,
    check,
    rules_cmd,
    ingest,
    imap_once,
    listings,
    themes_cmd,
    hash_password,
    purge,
    replay,
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.log_format:  # through the environment so the worker child process follows
        os.environ["GATEWAY_LOG_FORMAT"] = args.log_format
    if not hasattr(args, "handler"):
        parser.print_help()
        return EX_USAGE
    try:
        return args.handler(args)
    except (ConfigError, RuleError, ThemeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_USAGE
    except (UsageError, KeyError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return EX_USAGE
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Email-parsing gateway: helpdesk mail -> parsing rules -> PagerDuty.",
    )
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument(
        "--config", help="config file (default: $GATEWAY_CONFIG, else ./config.toml)"
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "human", "json"],
        help="override [gateway] log_format (auto: JSON lines under systemd or when piped)",
    )
    subparsers = parser.add_subparsers(metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser
