"""The PostgreSQL backend: several gateway nodes sharing one database (`[store] url`).

`PostgresStore` composes one part per responsibility, like `gateway.store.sqlite`, and passes
the same contract suite (`tests/store_contract/`):

    connection.py  the pool, migrations, transactions, errors (and why sync psycopg + a pool)
    schema.py      the numbered migrations, mirroring SQLite's versions
    spool.py       acceptance; duplicates by UNIQUE constraint   events.py  the event log
    decisions.py   jobs claimed with SKIP LOCKED, incident locks   outbox.py  heads, leases
    imap.py        IMAP positions, owed UIDs                      reports.py listings, metrics
    retention.py   batched purges
    heartbeats.py  expected mail                                  pagerduty.py webhook deliveries
"""

from __future__ import annotations

from gateway.store.postgres.decisions import DecisionQueries
from gateway.store.postgres.heartbeats import HeartbeatQueries
from gateway.store.postgres.outbox import OutboxQueries
from gateway.store.postgres.pagerduty import PagerDutyQueries
from gateway.store.postgres.reports import ReportQueries
from gateway.store.postgres.retention import RetentionQueries
from gateway.store.postgres.spool import SpoolQueries


class PostgresStore(
    SpoolQueries,
    DecisionQueries,
    OutboxQueries,
    ReportQueries,
    RetentionQueries,
    HeartbeatQueries,
    PagerDutyQueries,
):
    """A store object on the shared PostgreSQL database, for use by one thread."""


__all__ = ["PostgresStore"]
