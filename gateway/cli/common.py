"""What every command uses: exit codes, the subparser recipe, config, logging, input, tables."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from tabulate import tabulate

from gateway.config import Config, find_config_path, load_config
from gateway.decide.processor import ServiceRuntime, build_processor
from gateway.delivery import dispatch as delivery
from gateway.errors import GatewayError
from gateway.logs import setup_logging as _setup_logging
from gateway.store import Store

EX_OK, EX_USAGE, EX_TEMPFAIL = 0, 1, 75

Run = Callable[[argparse.Namespace], int]


class UsageError(GatewayError):
    """Bad arguments: printed as one line, exit 1."""


def add_command(
    subparsers: argparse._SubParsersAction, name: str, run: Run, help_text: str, example: str
) -> argparse.ArgumentParser:
    """One subcommand: its help line, a description ending in an example, and its `run`."""
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description=f"{help_text}\n\nExample:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=run)
    return parser


def config(args: argparse.Namespace) -> Config:
    return load_config(find_config_path(args.config))


def setup_logging(config: Config, default: str | None = None) -> None:
    _setup_logging(default or config.gateway.log_level, config.gateway.log_format)


def read_input(name: str) -> bytes:
    """The bytes of a file, or of standard input for `-`."""
    if name == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror}") from None


def print_table(rows: list[list[object]], headers: list[str], empty: str) -> None:
    print(tabulate(rows, headers=headers) if rows else empty)


def process_and_deliver(
    config: Config, services: Mapping[str, ServiceRuntime], store: Store
) -> None:
    """After acceptance: decide, then try to deliver once. Failures only defer the work (the
    mail is durable): `gateway serve` or `gateway outbox flush` picks it up later."""
    try:
        for outcome in build_processor(config, store, services).process_all():
            print(f"{outcome.service}: {outcome.outcome} ({outcome.reason})")
        asyncio.run(delivery.deliver_due(config, 2 * config.pagerduty.timeout_seconds))
    except GatewayError as exc:
        print(f"warning: accepted, processing deferred: {exc}", file=sys.stderr)
