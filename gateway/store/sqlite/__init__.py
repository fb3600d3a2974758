"""The SQLite backend (the embedded default): one file in `data_dir`, WAL, one writer.

`SQLiteStore` composes one part per responsibility, each a `Connection` subclass holding its
queries; together they satisfy every protocol in `gateway.store.protocols`:

    connection.py  open, pragmas (WAL, synchronous FULL|NORMAL), migrations, transactions
    schema.py      the numbered migrations
    spool.py       acceptance and duplicates          events.py     the event log
    decisions.py   pending jobs, decisions, incidents outbox.py     queue, leases, results
    imap.py        IMAP positions, owed UIDs          reports.py    listings, health, metrics
    retention.py   batched purges                     checkpoint.py background WAL checkpoints
    heartbeats.py  expected mail: last seen, missing
    pagerduty.py   webhook deliveries, incidents by PagerDuty id

Consumers open it through `gateway.store.open_store`; only the wiring (the service's
`Checkpointer`) imports this package directly.
"""

from __future__ import annotations

from gateway.store.sqlite.checkpoint import Checkpointer
from gateway.store.sqlite.connection import AUTOCHECKPOINT_PAGES
from gateway.store.sqlite.decisions import DecisionQueries
from gateway.store.sqlite.heartbeats import HeartbeatQueries
from gateway.store.sqlite.imap import ImapQueries
from gateway.store.sqlite.outbox import OutboxQueries
from gateway.store.sqlite.pagerduty import PagerDutyQueries
from gateway.store.sqlite.reports import ReportQueries
from gateway.store.sqlite.retention import RetentionQueries
from gateway.store.sqlite.spool import SpoolQueries


class SQLiteStore(
    SpoolQueries,
    DecisionQueries,
    OutboxQueries,
    ImapQueries,
    ReportQueries,
    RetentionQueries,
    HeartbeatQueries,
    PagerDutyQueries,
):
    """A connection to the gateway's SQLite database, for use by one thread."""


__all__ = ["AUTOCHECKPOINT_PAGES", "Checkpointer", "SQLiteStore"]
