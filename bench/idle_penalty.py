"""What a wake-up after idling costs on this box: the same decisions, hot and after pauses.

    python bench/idle_penalty.py [--batch 2] [--batches 150] [--runs 2] [--keep-awake]

One `Processor` (the shipped rules, SQLite, the matching workload of `bench/decide_rate.py`)
decides batches of `--batch` jobs. Between batches its thread sleeps 0 (hot), 2, 5, 10, 20 or
50 ms; the pauses take turns, each on a fresh store, `--runs` times. Printed: the thread's CPU
time per decision, and the extra CPU each wake-up cost against the hot loop.

Why it exists: at a steady 100 msg/s every stage of the gateway wakes every 10-20 ms to handle
one or two mails, and its CPU per mail (`bench/cpu_per_message.py`) is 2-3 times a burst's. No
profile shows a hot spot for that difference; this shows where it is. On the project's box (a
Firecracker VM) code that slept for 10-20 ms runs at about half speed until its caches are warm
again, whatever the code. So the CPU per mail at a steady rate is the hot cost plus this figure
times the wake-ups per mail: the reason the gateway gathers mail into windows (`GATHER_SECONDS`
in gateway/runtime/worker.py), and a floor under CPU per mail at 100 msg/s that only fewer
wake-ups per mail lower.

`--keep-awake` runs a busy loop at SCHED_IDLE priority on every CPU meanwhile: the vCPUs then
never halt (the loops yield at once to real work). What is left of the extra cost then does
not come from the vCPU sleeping but from outside the VM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decide_rate import filled_spool

PAUSES_MS = (0, 2, 5, 10, 20, 50)
SPIN = "import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\nwhile True: pass"


@contextlib.contextmanager
def vcpus_kept_awake(keep: bool) -> Iterator[None]:
    """A busy loop at the lowest priority on every CPU, while the block runs (if `keep`)."""
    spinners = [
        subprocess.Popen([sys.executable, "-c", SPIN])
        for _ in range((os.cpu_count() or 1) if keep else 0)
    ]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def cpu_per_decision(pause: float, batch: int, batches: int) -> float:
    """Thread CPU ms per decision, deciding `batches` batches with `pause` s between them."""
    with tempfile.TemporaryDirectory(prefix="idle-penalty-") as tmp:
        store, processor = filled_spool(Path(tmp) / "g.sqlite3", batch * (batches + 1))
        try:
            processor.process_pending(batch)  # first use: imports, compiled templates
            decided, started = 0, time.thread_time()
            for _ in range(batches):
                decided += len(processor.process_pending(batch))
                if pause:
                    time.sleep(pause)
            return (time.thread_time() - started) / decided * 1000
        finally:
            store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="jobs per wake-up")
    parser.add_argument("--batches", type=int, default=150, help="wake-ups per measurement")
    parser.add_argument("--runs", type=int, default=2, help="rounds over all the pauses")
    parser.add_argument("--keep-awake", action="store_true", help="keep every vCPU from halting")
    args = parser.parse_args()
    results: dict[int, list[float]] = {pause: [] for pause in PAUSES_MS}
    with vcpus_kept_awake(args.keep_awake):
        for _ in range(args.runs):
            for pause in PAUSES_MS:  # in turns: a slow phase of the box touches every pause
                results[pause].append(cpu_per_decision(pause / 1000, args.batch, args.batches))
    hot = min(results[0])
    awake = ", vCPUs kept awake" if args.keep_awake else ""
    print(
        f"decisions in batches of {args.batch}{awake}, thread CPU per decision"
        f" (best of {args.runs}):"
    )
    for pause, runs in results.items():
        best = min(runs)
        extra = (best - hot) * args.batch
        print(
            f"  pause {pause:3d} ms: {best:.3f} ms per decision ({best / hot:.2f}x hot),"
            f" extra CPU per wake-up {extra:+.3f} ms   (runs: {', '.join(f'{r:.3f}' for r in runs)})"
        )
    print("(no goal: the cost of idling that a steady rate pays per wake-up, see the docstring)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
