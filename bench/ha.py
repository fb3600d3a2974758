"""End-to-end delivered/s: one node on SQLite, one node on PostgreSQL, two nodes on PostgreSQL.

    python bench/ha.py [--messages 3000] [--sessions 16] [--node-cores N] [--runs N]

The same matching workload (bench/workload.py) for each setup, in the same run: the SMTP
client (16 persistent sessions, split evenly over the nodes) sends every mail; a run counts
until the store shows nothing pending, and delivered/s is mails / (first mail sent -> last
event at the PagerDuty endpoint, bench/pd_sink.py). PostgreSQL is Debian's, started here in a
temporary directory with fsync on (like production; `synchronous_commit = on`). Also printed:
CPU per mail of the gateway nodes and of the PostgreSQL server, from /proc, which is the
honest figure on a shared box, and the box's ceiling: every core busy at one PostgreSQL node's CPU
cost per mail, as a multiple of that node's rate. Goal (issue 13): two nodes >= 1.6x one
PostgreSQL node.

On this box the nodes share its cores with each other, the database, the client and the
stand-in, so a second node adds no cores. `--node-cores N` gives each node a CPU budget of its
own (a cgroup quota; needs root), as if each ran on a host of its own with the database and the
client elsewhere: then the ratio shows what a second node adds, and "cores busy per node" which
node limits the cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import SendResult, send_python
from bench.common import CpuBudget, GatewayServer, TreeCpu, tree_cpu, verdict
from bench.measure import warm_up
from bench.pd_sink import PdSink
from bench.workload import Mail, mixed
from tests.postgres import PostgresServer, pg_bin


@contextlib.contextmanager
def nodes(
    sink: PdSink, url: str | None, count: int, cores: float | None = None
) -> Iterator[list[GatewayServer]]:
    """`count` nodes on `url`; with `cores`, each node within a CPU budget of its own."""
    with contextlib.ExitStack() as stack:
        servers = []
        for n in range(count):
            store = f'\n[store]\nurl = "{url}"\nnode = "node{n + 1}"\n' if url else ""
            budget = None
            if cores:
                budget = CpuBudget(f"gateway-bench-node{n + 1}-{os.getpid()}", cores)
                stack.callback(budget.remove)  # after the node stopped (callbacks run LIFO)
            server = GatewayServer(sink.url, extra=store, store_url=url, cpu_budget=budget)
            servers.append(stack.enter_context(server))
        yield servers


def send_split(servers: list[GatewayServer], mails: list[Mail], sessions: int) -> SendResult:
    """Mail i to node i mod N, all nodes at once; the span from the first start to the last end."""
    results: list[SendResult] = []
    share = max(1, sessions // len(servers))

    def send(index: int, server: GatewayServer) -> None:
        mine = [m.raw for m in mails[index :: len(servers)]]
        results.append(send_python(server.port, mine, sessions=share))

    threads = [threading.Thread(target=send, args=(i, s)) for i, s in enumerate(servers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return SendResult(
        min(r.started for r in results),
        max(r.finished for r in results),
        [t for r in results for t in r.sent_at],
        sum(r.client_cpu for r in results),
    )


def measure(
    name: str, servers: list[GatewayServer], sink: PdSink, args: argparse.Namespace, db_pid: int
) -> tuple[float, float] | None:
    """(delivered msg/s, CPU seconds per mail of the gateway nodes and PostgreSQL together)."""
    for server in servers:  # every node: a node whose worker still imports is not measured
        warm_up(server, count=100)
    mails = mixed(args.messages, name.replace(" ", "-"))
    before = [s.cpu() for s in servers], tree_cpu(db_pid) if db_pid else TreeCpu(0, 0)
    sent = send_split(servers, mails, args.sessions)
    drained = servers[0].wait_idle(args.timeout)
    node_cpu = [(s.cpu() - b).total for s, b in zip(servers, before[0], strict=True)]
    gateway_cpu = sum(node_cpu)
    db_cpu = (tree_cpu(db_pid) - before[1]).total if db_pid else 0.0
    requests = [r for r in sink.requests() if r.at >= sent.started]
    last = max((r.at for r in requests), default=None)
    if not drained or last is None:
        print(f"{name:24} did not drain within {args.timeout:.0f} s")
        return None
    span = max(last, sent.finished) - sent.started
    rate = len(mails) / span
    busy = ", ".join(f"{cpu / span:.2f}" for cpu in node_cpu)
    print(
        f"{name:24} intake {len(mails) / (sent.finished - sent.started):7.0f} msg/s"
        f"  delivered {rate:7.0f} msg/s  CPU/mail: gateway {gateway_cpu / len(mails) * 1000:5.2f} ms"
        f", PostgreSQL {db_cpu / len(mails) * 1000:5.2f} ms; cores busy per node: {busy}",
        flush=True,
    )
    return rate, (gateway_cpu + db_cpu) / len(mails)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--node-cores",
        type=float,
        metavar="N",
        help="give each node a CPU budget of N cores (a cgroup quota; root): nodes as on hosts"
        " of their own, instead of sharing this box's cores with each other",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="measure one and two PostgreSQL nodes this many times, alternating; the ratio is"
        " of the median rates (one run moves it by about 0.1)",
    )
    args = parser.parse_args()
    bin_dir = pg_bin()
    if bin_dir is None:
        raise SystemExit("PostgreSQL is not installed (apt-get install postgresql)")
    server = PostgresServer(bin_dir, fsync=True)
    server.start()
    one_node: list[tuple[float, float] | None] = []
    two_nodes: list[tuple[float, float] | None] = []
    try:
        with PdSink() as sink:
            cores = args.node_cores
            if cores:
                print(
                    f"each node within {cores:g} core(s) of CPU, as on a host of its own",
                    flush=True,
                )
            with nodes(sink, None, 1, cores) as one:
                measure("1 node, SQLite", one, sink, args, 0)
            for _ in range(args.runs):
                with nodes(sink, server.new_database(), 1, cores) as one:
                    one_node.append(measure("1 node, PostgreSQL", one, sink, args, server.pid()))
                with nodes(sink, server.new_database(), 2, cores) as two:
                    two_nodes.append(measure("2 nodes, PostgreSQL", two, sink, args, server.pid()))
    finally:
        server.stop()
        server.remove()
    print_ratio(one_node, two_nodes, box_ceiling=not args.node_cores)
    return 0


def print_ratio(
    one_node: list[tuple[float, float] | None],
    two_nodes: list[tuple[float, float] | None],
    *,
    box_ceiling: bool,
) -> None:
    """Two nodes / one, of the median rates when there were several runs."""
    ones = [run for run in one_node if run is not None]
    twos = [run for run in two_nodes if run is not None]
    if len(ones) < len(one_node) or len(twos) < len(two_nodes):
        print("a run did not drain: no ratio")
        return
    one = statistics.median(rate for rate, _ in ones)
    two = statistics.median(rate for rate, _ in twos)
    if len(ones) > 1:
        each = ", ".join(f"{b[0] / a[0]:.2f}x" for a, b in zip(ones, twos, strict=True))
        print(f"runs: {each}; median rates: one node {one:.0f} msg/s, two nodes {two:.0f} msg/s")
    ratio = two / one
    print(f"two nodes / one PostgreSQL node: {ratio:.2f}x (goal >= 1.6x) {verdict(ratio >= 1.6)}")
    if box_ceiling:
        print_box_ceiling(one, statistics.median(cpu for _, cpu in ones))


def print_box_ceiling(one_node_rate: float, cpu_per_mail: float) -> None:
    """What this box could show at best: all its cores busy at one node's CPU cost per mail
    (gateway + PostgreSQL; the load generator and the PagerDuty stand-in not even counted)."""
    cores = os.cpu_count() or 1
    ceiling = cores / cpu_per_mail
    print(
        f"this box's ceiling: {cores} cores / {cpu_per_mail * 1000:.2f} ms CPU per mail"
        f" = {ceiling:.0f} msg/s = {ceiling / one_node_rate:.2f}x one node, with perfect scaling"
    )


if __name__ == "__main__":
    raise SystemExit(main())
