"""`gateway import pagerduty|opsgenie FILE.json [-o OUT.toml]`: a vendor's email integration as
one rule file. The file goes to stdout (or OUT.toml); every part without an exact equivalent is
one `warning:` line on stderr with its place in the JSON. The result is checked by the rule
loader before it is written, so what is written passes `gateway check`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.cli.common import EX_OK, EX_USAGE, UsageError, add_command, read_input
from gateway.display import printable
from gateway.errors import RuleError
from gateway.rules import load_ruleset
from gateway.rules.import_opsgenie import import_opsgenie
from gateway.rules.import_pagerduty import import_pagerduty
from gateway.rules.importing import (
    ImportedFile,
    ImportFailed,
    drop_bad_regexes,
    load_json,
    to_toml,
)

VENDORS: dict[str, tuple[Callable[[Any, str], ImportedFile], str]] = {
    "pagerduty": (
        import_pagerduty,
        "a PagerDuty email integration (GET /services/ID/integrations/ID)",
    ),
    "opsgenie": (
        import_opsgenie,
        "an Opsgenie integration's actions (GET /v2/integrations/ID/actions)",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers,
        "import",
        _usage,
        "convert a PagerDuty or Opsgenie email integration into one rule file",
        "gateway import pagerduty integration.json -o parsing_rules/from_pagerduty.toml",
    )
    vendors = parser.add_subparsers(metavar="VENDOR")
    for vendor, (_, what) in VENDORS.items():
        sub = vendors.add_parser(vendor, help=f"import {what}")
        sub.add_argument("file", help="the JSON the vendor's REST API returned, or - for stdin")
        sub.add_argument("-o", "--output", type=Path, help="write here instead of stdout")
        sub.set_defaults(handler=run, vendor=vendor)


def _usage(args: argparse.Namespace) -> int:
    raise UsageError("say which vendor: gateway import pagerduty|opsgenie FILE.json")


def run(args: argparse.Namespace) -> int:
    convert = VENDORS[args.vendor][0]
    raw = read_input(args.file)
    try:
        imported = convert(load_json(raw.decode("utf-8", "replace")), args.file)
    except ImportFailed as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    drop_bad_regexes(imported)
    text = to_toml(imported)
    _check(text)
    for warning in imported.warnings:
        print(f"warning: {printable(f'{args.file}: {warning}')}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(text)
    else:
        _write(args.output, text)
        print(
            f"wrote {args.output}: {len(imported.rules)} rule(s),"
            f" {len(imported.warnings)} warning(s)",
            file=sys.stderr,
        )
    return EX_OK if imported.rules or imported.filter_mode else EX_USAGE


def _check(text: str) -> None:
    """The rule loader's verdict on the text; a failure here is an importer bug, said plainly."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "imported.toml"
        path.write_text(text, encoding="utf-8")
        try:
            load_ruleset([path])
        except RuleError as exc:
            raise UsageError(
                f"the imported rules do not load (please report this): {exc}"
            ) from None


def _write(path: Path, text: str) -> None:
    """Whole or not at all: a temporary file beside it, renamed over it."""
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
