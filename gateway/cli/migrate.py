"""`gateway migrate`: bring the configured store's schema up to this gateway's version.

`serve` and the writing commands migrate on their own too; this command lets an operator do it
once, before starting several nodes of a new version. A schema newer than this gateway's is
refused (exit 75): an older gateway must not write to it.
"""

from __future__ import annotations

import argparse

from gateway.cli.common import EX_OK, add_command, config
from gateway.store import migrate_store


def register(subparsers: argparse._SubParsersAction) -> None:
    add_command(
        subparsers,
        "migrate",
        run,
        "apply the store's schema migrations ([store] url, else the SQLite file in data_dir)",
        "gateway migrate",
    )


def run(args: argparse.Namespace) -> int:
    settings = config(args)
    before, after = migrate_store(settings.store_location)
    if before == after:
        print(f"OK: schema version {after}, nothing to do")
    else:
        print(f"OK: schema migrated from version {before} to {after}")
    return EX_OK
