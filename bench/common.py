"""Helpers shared by the benchmarks: servers under test, CPU accounting, waiting, percentiles."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.runtime.loop import run_event_loop
from gateway.store import open_store
from gateway.store.protocols import Store
from tests.net import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

ROUTING_KEY = "B0123456789abcdef0123456789abcde"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def wait_for_port(port: int, timeout: float = 20.0, *, greeting: bool = True) -> None:
    """Until something accepts on `port` (and, for SMTP, sends its greeting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                if greeting:
                    sock.recv(100)
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true (True) or the deadline passes (False)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


@dataclass(frozen=True)
class LoadResult:
    messages: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def smtp_source(
    port: int,
    *,
    messages: int,
    sessions: int = 16,
    size: int = 3072,
    persistent: bool = False,
    to: str = "desk@gateway.example",
) -> LoadResult:
    """Postfix's load generator with its own body ("XXX..." lines, which match no rule):
    only for measuring a bare listener (`parse_rules.py`); the gateway needs matching mail."""
    args = [
        smtp_source_binary(),
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-f",
        "bench@helpdesk.example",
        "-t",
        to,
    ]
    if persistent:
        args.append("-d")
    started = time.perf_counter()
    subprocess.run([*args, f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    return LoadResult(messages, time.perf_counter() - started)


def smtp_source_binary() -> str:
    binary = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not Path(binary).exists():
        raise SystemExit("smtp-source not found: apt-get install postfix (it ships smtp-source)")
    return binary


class BareSmtpd:
    """The bare aiosmtpd baseline in its own process (like the gateway is)."""

    def __enter__(self) -> BareSmtpd:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "bare_smtpd.py"), str(self.port)], stdout=subprocess.DEVNULL
        )
        wait_for_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class GatewayServer:
    """`gateway serve` as a child process, configured like the shipped `config.toml` (log level
    info, its SMTP limits, the web listener on) apart from ports, paths and the PagerDuty URL.

    `rate_limit_per_minute`: None leaves the gateway's default; the throughput benchmarks pass 0
    (off) because they measure the gateway against a local endpoint, not PagerDuty's quota.
    """

    def __init__(
        self,
        pd_url: str,
        *,
        log_level: str = "info",
        rate_limit_per_minute: int | None = 0,
        extra: str = "",
        smtp_extra: str = "",
        store_url: str | None = None,
        cpu_budget: CpuBudget | None = None,
    ) -> None:
        """`extra`: more config text (e.g. `[store]`); `smtp_extra`: more `[smtp]` keys;
        `store_url`: the PostgreSQL store the benchmark reads (None: the node's own SQLite
        file); `cpu_budget`: the process tree runs within it (a host of its own)."""
        self.cpu_budget = cpu_budget
        self.tmp = tempfile.TemporaryDirectory(prefix="gateway-bench-")
        self.dir = Path(self.tmp.name)
        self.port = free_port()
        limit = (
            ""
            if rate_limit_per_minute is None
            else f"rate_limit_per_minute = {rate_limit_per_minute}"
        )
        self.config = self.dir / "config.toml"
        self.config.write_text(
            f"""
[gateway]
data_dir = "data"
rules_dir = "{(ROOT / "parsing_rules").as_posix()}"
templates_dir = "{(ROOT / "templates").as_posix()}"
log_level = "{log_level}"
[smtp]
listen = ["127.0.0.1:{self.port}"]
hostname = "localhost"
max_message_bytes = 10485760
max_connections = 100
{smtp_extra}
[pagerduty]
events_url = "{pd_url}"
timeout_seconds = 10
max_retry_hours = 24
{limit}
[[service]]
name = "helpdesk"
addresses = ["desk@*"]
rules = ["helpdesk.toml"]
routing_key = "{ROUTING_KEY}"
[web]
listen = "127.0.0.1:{free_port()}"
{extra}
"""
        )
        self.db = self.dir / "data" / "gateway.sqlite3"
        self.location: str | Path = store_url or self.db

    def __enter__(self) -> GatewayServer:
        with open(self.dir / "log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "--config", str(self.config), "serve"],
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=ROOT,
                preexec_fn=self.cpu_budget.join if self.cpu_budget else None,
            )
        wait_for_port(self.port)
        self._store: Store | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._store is not None:
            self._store.close()
        self.proc.terminate()
        self.proc.wait(60)
        self.tmp.cleanup()

    @property
    def store(self) -> Store:
        """A read connection for the benchmark (its queries cost the benchmark's CPU, not the
        gateway's); opened once, before any load."""
        if self._store is None:
            self._store = open_store(self.location)
        return self._store

    def gauge(self, *names: str) -> int:
        """The store's levels of `names`, summed over labels."""
        gauges = self.store.metric_gauges()
        return int(sum(value for name, _labels, value in gauges if name in names))

    def backlog(self) -> int:
        """Jobs not decided plus outbox items not delivered: 0 once all work is done."""
        return self.gauge("jobs_pending", "outbox_depth")

    def totals(self) -> dict[str, float]:
        """The store's counters summed over labels: accepted, duplicates, decisions, ..."""
        totals: dict[str, float] = {}
        for name, _labels, value in self.store.metric_totals():
            totals[name] = totals.get(name, 0) + value
        return totals

    def wait_idle(self, timeout: float) -> bool:
        """Until every accepted mail is decided and every event delivered (False at the deadline)."""
        return wait_until(lambda: self.backlog() == 0, timeout)

    def cpu(self) -> TreeCpu:
        return tree_cpu(self.proc.pid)


class CpuBudget:
    """A CPU quota (a cgroup's CFS quota) that the processes started in it share, to play a
    host of `cores` cores on this one box: each node of `bench/ha.py` gets its own, so one node
    cannot borrow the cores another node leaves idle. Needs root and a writable cgroup file
    system (v1's `cpu` hierarchy, or v2 with the `cpu` controller)."""

    PERIOD_US = 100_000

    def __init__(self, name: str, cores: float) -> None:
        self.cores = cores
        quota = int(cores * self.PERIOD_US)
        v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
        try:
            if (v1 / "cpu.cfs_quota_us").exists():
                self.dir = v1 / name
                self.dir.mkdir(exist_ok=True)
                (self.dir / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                (self.dir / "cpu.cfs_quota_us").write_text(str(quota))
            elif "cpu" in (v2 / "cgroup.controllers").read_text().split():
                self.dir = v2 / name
                self.dir.mkdir(exist_ok=True)
                (self.dir / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
            else:
                raise OSError("no cgroup cpu controller")
        except OSError as exc:
            raise SystemExit(
                f"cannot set up a CPU budget (root and cgroups needed): {exc}"
            ) from None

    def join(self) -> None:
        """Move the calling process (and so its future children) into the budget."""
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def throttled_seconds(self) -> float:
        """How long the quota held the processes back so far."""
        stat = dict(line.split() for line in (self.dir / "cpu.stat").read_text().splitlines())
        if "throttled_usec" in stat:
            return int(stat["throttled_usec"]) / 1e6
        return int(stat.get("throttled_time", 0)) / 1e9

    def remove(self) -> None:
        """Once its processes ended."""
        with contextlib.suppress(OSError):
            self.dir.rmdir()


@dataclass(frozen=True)
class TreeCpu:
    """CPU seconds (user + system) of a process tree, split into the root and its descendants."""

    root: float
    children: float

    @property
    def total(self) -> float:
        return self.root + self.children

    def __sub__(self, other: TreeCpu) -> TreeCpu:
        return TreeCpu(self.root - other.root, self.children - other.children)


def tree_cpu(pid: int) -> TreeCpu:
    """utime+stime from /proc of `pid` (all its threads) and of every live descendant, plus the
    cutime+cstime of children that already exited and were waited for."""
    return TreeCpu(_process_cpu(pid), sum(_process_cpu(p) for p in descendants(pid)))


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for tid_dir in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (tid_dir / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def _process_cpu(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # exited in between
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / CLOCK_TICKS


def serve_on_port(serve: Callable[[int], Awaitable[None]]) -> None:
    """Run `serve(port)` (port from argv) on the gateway's own event loop runner."""
    run_event_loop(serve(int(sys.argv[1])))
