"""The `gateway` command: builds objects, calls one library function, maps errors to exit codes.

Each command lives in its own module with `register(subparsers)` and `run(args) -> int`;
shared helpers are in `common`. Exit codes: 0 ok, 1 usage or validation error, 75
(EX_TEMPFAIL) transient failure in `ingest` so that an MTA pipe (Postfix `pipe`, procmail,
fetchmail) retries the delivery later, 141 when the reader of the output went away
(`gateway messages | head`). An operator's mistake is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from gateway.cli import (
    check,
    hash_password,
    imap_once,
    import_cmd,
    ingest,
    listings,
    migrate,
    purge,
    replay,
    rules_cmd,
    serve,
    store_cmd,
    themes_cmd,
    webhooks,
)
from gateway.cli.common import (
    EX_OK,
    EX_PIPE,
    EX_TEMPFAIL,
    EX_USAGE,
    UsageError,
    add_global_options,
)
from gateway.display import printable
from gateway.errors import ConfigError, RuleError, StoreError, StoreMissing, ThemeError

__all__ = ["EX_OK", "EX_PIPE", "EX_TEMPFAIL", "EX_USAGE", "build_parser", "main"]

# in the order `gateway --help` lists them
COMMANDS = (
    serve,
    check,
    migrate,
    rules_cmd,
    ingest,
    imap_once,
    listings,
    themes_cmd,
    hash_password,
    purge,
    replay,
    store_cmd,
    import_cmd,
    webhooks,
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
        code = args.handler(args)
        if sys.stdout is not None:  # None: started with stdout closed (`>&-`)
            sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _discard_stdout()
        return EX_PIPE
    except (ConfigError, RuleError, ThemeError) as exc:
        return _fail(str(exc), EX_USAGE)
    except (UsageError, KeyError) as exc:
        return _fail(str(exc.args[0] if exc.args else exc), EX_USAGE)
    except StoreMissing as exc:
        return _fail(
            f"{exc}: nothing was received with this config yet, or it is the wrong one"
            f" {_CONFIG_HINT}"
        )
    except StoreError as exc:
        return _fail(str(exc), EX_TEMPFAIL)
    except KeyboardInterrupt:
        return 130


_CONFIG_HINT = "(the config is --config PATH, else $GATEWAY_CONFIG, else ./config.toml)"


def _fail(message: str, code: int = EX_USAGE) -> int:
    """One `error:` line (several for a list of problems), escaped: it may quote mail or
    file content."""
    print(f"error: {printable(message, keep_newlines=True)}", file=sys.stderr)
    return code


def _discard_stdout() -> None:
    """The reader closed the pipe: send what Python still holds to /dev/null, so the flush at
    exit cannot fail again with a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    with contextlib.suppress(AttributeError, OSError, ValueError):  # no usable stdout at all
        os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="Email-parsing gateway: helpdesk mail -> parsing rules -> PagerDuty.",
    )
    add_global_options(parser)  # also accepted after the subcommand (`add_command`)
    subparsers = parser.add_subparsers(metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    return parser
