"""What every command uses: exit codes, the global options and the subparser recipe, config
(with or without secrets), the store (read-only for listings), logging, input, tables and
JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from tabulate import tabulate

from gateway.config import Config, find_config_path, load_config
from gateway.decide.processor import build_processor
from gateway.decide.verdicts import ServiceRuntime
from gateway.delivery import dispatch as delivery
from gateway.display import json_line, printable
from gateway.errors import GatewayError
from gateway.logs import setup_logging as _setup_logging
from gateway.node import set_node
from gateway.store import ReportStore, Store, open_store

EX_OK, EX_USAGE, EX_TEMPFAIL = 0, 1, 75
EX_PIPE = 141  # the reader went away (`| head`): what a command killed by SIGPIPE exits with

Run = Callable[[argparse.Namespace], int]


class UsageError(GatewayError):
    """Bad arguments: printed as one line, exit 1."""


def add_global_options(parser: argparse.ArgumentParser, *, suppress: bool = False) -> None:
    """--version, --config and --log-format; on every subcommand too (`suppress`: absent
    there, so the value given before the subcommand is kept), so they work anywhere."""
    from gateway import __version__

    unset = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    parser.add_argument(
        "--config", help="config file (default: $GATEWAY_CONFIG, else ./config.toml)", **unset
    )
    parser.add_argument(
        "--log-format",
        choices=["auto", "human", "json"],
        help="override [gateway] log_format (auto: JSON lines under systemd or when piped)",
        **unset,
    )


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
    add_global_options(parser, suppress=True)
    parser.set_defaults(handler=run)
    return parser


def add_listing_options(parser: argparse.ArgumentParser, default_limit: int = 50) -> None:
    """--json, --limit and --all, the same on every listing."""
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--limit",
        type=_positive,
        default=default_limit,
        help=f"at most N (default {default_limit})",
    )
    parser.add_argument("--all", action="store_true", help="no limit")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def config(args: argparse.Namespace) -> Config:
    """The whole config, secrets expanded: for commands that send, fetch or serve."""
    loaded = load_config(find_config_path(args.config))
    set_node(loaded.store.node)
    return loaded


def reading_config(args: argparse.Namespace) -> Config:
    """The config with its secrets left unexpanded: for commands that only read, so an
    on-call engineer can run them without the service's environment."""
    return load_config(find_config_path(args.config), secrets=False)


def reading_store(settings: Config) -> Store:
    """The store opened read-only: works with read access alone and never changes it."""
    return open_store(settings.store_location, read_only=True)


def check_choice(kind: str, value: str, known: Iterable[str]) -> str:
    """`value` if it is one of `known`; else a UsageError naming the known values."""
    known = list(known)
    if value in known:
        return value
    guess = difflib.get_close_matches(value, known, n=1)
    hint = f" (did you mean {guess[0]!r}?)" if guess else ""
    raise UsageError(f"unknown {kind} {value!r}{hint}; known: {', '.join(known) or 'none'}")


def check_service(name: str | None, settings: Config, store: ReportStore) -> str | None:
    """A --service value: a configured service, or one the store still has data of."""
    if name is None:
        return None
    configured = [s.name for s in settings.services]
    if name in configured:
        return name
    return check_choice("service", name, dict.fromkeys(configured + store.known_services()))


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
    """A table of mail-derived values: every cell escaped (`printable`), and shown as written
    (no number parsing: the key `0012` stays `0012`)."""
    if not rows:
        print(empty)
        return
    cells = [[printable(c) if isinstance(c, str) else c for c in row] for row in rows]
    print(tabulate(cells, headers=headers, disable_numparse=True))


def print_json_lines(objects: Iterable[Mapping[str, object]]) -> None:
    """One JSON object per line (`--json`), control characters escaped."""
    for obj in objects:
        print(json_line(obj))


def showing(shown: int, total: int, noun: str) -> str:
    """The line under a listing: `showing 50 of 3,012 messages (--limit N or --all for more)`."""
    more = " (--limit N or --all for more)" if shown < total else ""
    return f"showing {shown:,} of {total:,} {noun}{more}"


def process_and_deliver(
    config: Config, services: Mapping[str, ServiceRuntime], store: Store
) -> None:
    """After acceptance: decide, then try to deliver once. Failures only defer the work (the
    mail is durable): `gateway serve` or `gateway outbox flush` picks it up later."""
    try:
        for outcome in build_processor(config, store, services).process_all():
            print(f"{outcome.service}: {outcome.outcome} ({printable(outcome.reason)})")
        asyncio.run(delivery.deliver_due(config, 2 * config.pagerduty.timeout_seconds))
    except GatewayError as exc:
        print(f"warning: accepted, processing deferred: {printable(exc)}", file=sys.stderr)
