"""Decisions per second from a spool that is already full: the decide stage alone.

    python bench/decide_rate.py [--messages 3000]

The matching workload (bench/workload.py) is accepted into the spool first; then one
`Processor` (the shipped rules, a routing key, so every action queues an outbox item) decides
it batch by batch until nothing is pending, on SQLite (the baseline, in the same run) and on
PostgreSQL (Debian's, started here in a temporary directory with fsync on). No SMTP, no
deliveries: what one node's decider can do, and its CPU per decision (this process, and the
PostgreSQL server's backends). On PostgreSQL the decider waits on round trips, so its rate is
what caps a node's end-to-end rate (`bench/ha.py`) while the cores are not all busy.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import TreeCpu, tree_cpu
from bench.workload import mixed
from gateway.config import PagerDutySettings, ServiceSettings
from gateway.decide.processor import Processor, load_services
from gateway.intake.spool import incoming
from gateway.store import Store, open_store
from tests.postgres import PostgresServer, pg_bin

ROOT = Path(__file__).resolve().parent.parent


def filled_spool(location: str | Path, messages: int) -> tuple[Store, Processor]:
    """A store holding `messages` accepted mails of the matching workload, and a processor
    with the shipped rules and a routing key (every action queues an outbox item)."""
    store = open_store(location)
    mails = mixed(messages, "decide")
    for start in range(0, messages, 100):
        batch = mails[start : start + 100]
        store.accept([incoming(m.raw, source="smtp", services=("helpdesk",)) for m in batch])
    rules = (ROOT / "parsing_rules" / "helpdesk.toml",)
    settings = ServiceSettings("helpdesk", ("desk@*",), rules, "R" * 32)
    return store, Processor(store, load_services((settings,)), PagerDutySettings())


def decide_all(
    location: str | Path, messages: int, db_pid: int | None
) -> tuple[float, float, float]:
    """(decisions/s, decider CPU ms per decision, database server CPU ms per decision)."""
    store, processor = filled_spool(location, messages)
    server_before = tree_cpu(db_pid) if db_pid else TreeCpu(0, 0)
    cpu_before, started = time.process_time(), time.perf_counter()
    decided = 0
    while batch_done := processor.process_pending():
        decided += len(batch_done)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    server = (tree_cpu(db_pid) - server_before).total if db_pid else 0.0
    store.close()
    if decided != messages:
        raise SystemExit(f"decided {decided} of {messages}")
    return decided / elapsed, cpu / decided * 1000, server / decided * 1000


def show(name: str, result: tuple[float, float, float], rates: dict[str, list[float]]) -> None:
    rate, cpu, db = result
    rates[name].append(rate)
    print(
        f"{name:11} {rate:6.0f} decisions/s  CPU per decision: decider {cpu:.2f} ms,"
        f" database server {db:.2f} ms",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=2, help="runs per backend (fresh store each)")
    args = parser.parse_args()
    bin_dir = pg_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    rates: dict[str, list[float]] = {"SQLite": [], "PostgreSQL": []}
    server = PostgresServer(bin_dir, fsync=True)
    server.start()
    try:
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="decide-rate-") as tmp:
                show("SQLite", decide_all(Path(tmp) / "g.sqlite3", args.messages, None), rates)
            result = decide_all(server.new_database(), args.messages, server.pid())
            show("PostgreSQL", result, rates)
    finally:
        server.stop()
        server.remove()
    ratio = max(rates["PostgreSQL"]) / max(rates["SQLite"])
    print(f"PostgreSQL / SQLite, best runs: {ratio:.2f}x (no goal: the figure HA work moves)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
