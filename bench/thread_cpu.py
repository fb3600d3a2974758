"""CPU per mail of each thread of the listener and the worker, at a steady rate.

    python bench/thread_cpu.py [--messages 1500] [--rate 100] [--sessions 8] [--py-spy DIR]

One run of `bench/cpu_per_message.py`'s steady load (matching mail, shipped settings, after a
warm-up) against a fresh `gateway serve`, with the CPU time (user + system) of every thread
from /proc/<pid>/task/*/stat before and after, divided by the mails sent: which thread the
per-mail cost sits in (SMTP event loop, spool writer, decider, deliveries, outbox store).
Thread names come from `py-spy dump` when py-spy is installed (else the thread ids are shown).
`--py-spy DIR` also records both processes (raw collapsed stacks, DIR/listener.txt and
DIR/worker.txt) while the load runs. CPU time, unlike latency, stays meaningful on a shared box,
though not exact: compare runs alternating with the code you compare against.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import send_python
from bench.common import GatewayServer, descendants
from bench.measure import run_load, warm_up
from bench.pd_sink import PdSink
from bench.workload import mixed

TICKS = os.sysconf("SC_CLK_TCK")


def task_files(pid: int, name: str) -> dict[int, str]:
    """The text of /proc/<pid>/task/<tid>/<name> of each thread of `pid`, by thread id."""
    texts: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            texts[int(task.name)] = (task / name).read_text()
        except OSError:  # the thread ended meanwhile
            continue
    return texts


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid`, by thread id."""
    seconds: dict[int, float] = {}
    for tid, stat in task_files(pid, "stat").items():
        fields = stat.rsplit(")", 1)[1].split()
        seconds[tid] = (int(fields[11]) + int(fields[12])) / TICKS
    return seconds


def thread_switches(pid: int) -> dict[int, int]:
    """Context switches (voluntary + forced) of each thread of `pid`: how often it slept and woke."""
    return {
        tid: sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)
        for tid, status in task_files(pid, "status").items()
    }


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by thread id, from `py-spy dump` (empty without py-spy)."""
    if shutil.which("py-spy") is None:
        return {}
    dump = subprocess.run(["py-spy", "dump", "-p", str(pid)], capture_output=True, text=True)
    names: dict[int, str] = {}
    for line in dump.stdout.splitlines():
        if line.startswith("Thread ") and '"' in line:
            ident = line.split()[1]
            names[int(ident, 16) if ident.startswith("0x") else int(ident)] = line.split('"')[1]
    return names


def worker_pid(gateway: GatewayServer) -> int:
    """The `spawn` child that decides and delivers (the other child is the resource tracker)."""
    for pid in descendants(gateway.proc.pid):
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    raise SystemExit("no worker process found")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1500)
    parser.add_argument("--rate", type=float, default=100.0, help="mails per second")
    parser.add_argument("--sessions", type=int, default=8, help="persistent SMTP sessions")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for delivery")
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="also record both processes")
    args = parser.parse_args()
    mails = mixed(args.messages, "run")
    with PdSink() as sink, GatewayServer(sink.url) as gateway:
        warm_up(gateway)
        processes = {"listener": gateway.proc.pid, "worker": worker_pid(gateway)}
        names = {role: thread_names(pid) for role, pid in processes.items()}
        spies = []
        if args.py_spy:
            args.py_spy.mkdir(parents=True, exist_ok=True)
            seconds = str(int(args.messages / args.rate) + 5)
            for role, pid in processes.items():
                out = args.py_spy / f"{role}.txt"
                command = ["py-spy", "record", "-p", str(pid), "-r", "250", "-f", "raw"]
                command += ["--nonblocking", "-o", str(out), "-d", seconds]
                spies.append(subprocess.Popen(command, stdout=subprocess.DEVNULL))
        before = {role: thread_cpu(pid) for role, pid in processes.items()}
        woken = {role: thread_switches(pid) for role, pid in processes.items()}
        send = partial(send_python, gateway.port, sessions=args.sessions, rate=args.rate)
        run = run_load(gateway, sink, mails, send, args.timeout)
        after = {role: thread_cpu(pid) for role, pid in processes.items()}
        switches = {
            role: {
                tid: (count - woken[role].get(tid, 0)) / args.messages
                for tid, count in thread_switches(pid).items()
            }
            for role, pid in processes.items()
        }
        for spy in spies:
            spy.wait()
    print(
        f"{args.messages} mails at {args.rate:.0f} msg/s over {args.sessions} sessions:"
        f" gateway CPU {run.cpu_ms_per_mail():.3f} ms per mail"
        f" (listener {run.cpu_ms_per_mail('root'):.3f}, worker {run.cpu_ms_per_mail('children'):.3f})"
    )
    for role in processes:
        spent = {
            tid: 1000 * (cpu - before[role].get(tid, 0.0)) / args.messages
            for tid, cpu in after[role].items()
        }
        shown = ", ".join(
            f"{names[role].get(tid, tid)} {ms:.3f} ({switches[role].get(tid, 0):.1f} switches)"
            for tid, ms in sorted(spent.items(), key=lambda item: -item[1])
            if ms >= 0.005
        )
        print(f"  {role} threads (ms per mail): {shown}")


if __name__ == "__main__":
    main()
