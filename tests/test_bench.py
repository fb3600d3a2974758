"""The benchmarks measure what they claim: matching mail, end-to-end delivery, the gateway's
whole process tree, a throttling PagerDuty. Short runs of the real scripts, no timing asserted."""

from __future__ import annotations

import http.client
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.clients import send_smtp_source
from bench.common import GatewayServer, tree_cpu
from bench.pd_sink import PdSink
from bench.workload import mixed, storm
from gateway.mail.parse import parse_message
from gateway.rules import evaluate, load_ruleset
from tests.postgres import require_postgres

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_RULES = ROOT / "parsing_rules" / "helpdesk.toml"
EXPECTED_ACTION = {"new": "trigger", "repeat": "trigger", "resolve": "resolve"}


def run_bench(script: str, *args: str, timeout: float = 180) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_benchmark_mail_matches_the_shipped_rules_as_new_repeat_and_resolve() -> None:
    ruleset = load_ruleset([SHIPPED_RULES])
    mails = mixed(400, "t") + storm(60, 5, "s")
    for mail in mails:
        decision = evaluate(ruleset, parse_message(mail.raw))
        assert not decision.unmatched, decision.reason
        assert decision.action == EXPECTED_ACTION[mail.kind]
        assert decision.incident_key == mail.subject
    kinds = {m.kind for m in mails}
    assert kinds == {"new", "repeat", "resolve"}
    assert len({m.raw for m in mails}) == len(mails)  # never a byte-identical duplicate


def test_a_repeat_or_resolve_never_comes_before_its_case_was_opened() -> None:
    opened: set[str] = set()
    for mail in mixed(2000, "t"):
        if mail.kind == "new":
            opened.add(mail.subject)
        else:
            assert mail.subject in opened


def test_throughput_benchmark_reports_delivery_of_matching_mail_end_to_end() -> None:
    out = run_bench(
        "smtp_throughput.py", "--messages", "40", "--client", "python-persistent", "--no-memory"
    )
    assert re.search(r"intake .*ratio [\d.]+ +\(goal >= 0.8", out), out
    events_for_new_and_resolve = sum(m.kind != "repeat" for m in mixed(40, "run"))
    for run in ("pacing off", "shipped \\(paced\\)"):
        delivered = re.search(rf"delivered +{run}: +\d+ msg/s end to end \((\d+) events\)", out)
        assert delivered, out
        assert int(delivered.group(1)) >= events_for_new_and_resolve
    assert "CPU/mail" in out


def test_smtp_source_client_sends_each_mail_to_be_decided_not_as_a_duplicate() -> None:
    if not (shutil.which("smtp-source") or Path("/usr/sbin/smtp-source").exists()):
        if os.environ.get("CI"):  # as tests/dovecot.py: CI installs it and must run this
            pytest.fail("smtp-source not installed: .ci/run installs postfix")
        pytest.skip("smtp-source not installed (apt-get install postfix)")
    mails = mixed(6, "c")
    with PdSink() as sink, GatewayServer(sink.url) as gateway:
        result = send_smtp_source(gateway.port, [m.raw for m in mails], sessions=3)
        assert len(result.sent_at) == 6 and result.client_cpu > 0
        assert gateway.wait_idle(60)
        totals = gateway.totals()
    assert totals["accepted"] == 6
    assert totals.get("duplicates", 0) == 0
    assert totals["decisions"] == 6


def test_gateway_cpu_counts_the_whole_process_tree() -> None:
    burn = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            f"child = subprocess.Popen([sys.executable, '-c', {burn!r}])\n"
            "print('started', flush=True)\nsys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "started\n"
        deadline = time.monotonic() + 30
        while tree_cpu(parent.pid).children < 0.25:  # the grandchild burns 0.3 s of CPU
            assert time.monotonic() < deadline, tree_cpu(parent.pid)
            time.sleep(0.05)
    finally:
        parent.communicate("\n", timeout=30)


def test_cpu_benchmark_reports_cpu_per_mail_split_and_latency_against_goals() -> None:
    out = run_bench(
        "cpu_per_message.py", "--messages", "40", "--only", "steady-100,burst,burst-unpaced"
    )
    assert re.search(r"CPU per mail, gateway process tree: [\d.]+ ms +\(goal <= 1.5 ms", out), out
    assert re.search(r"listener [\d.]+ ms, worker and children [\d.]+ ms", out), out
    assert re.search(r"p99 [\d.]+ ms.*\(goal p99 < 50 ms", out), out
    assert re.search(r"delivered \d+ msg/s end to end, [\d.]+x intake +\(goal >= 0.9x", out), out
    assert "intake paced (shipped default)" in out and "pacing off (baseline)" in out, out
    assert re.search(r"acceptance -> decision: p50 \d+ ms, p99 \d+ ms", out), out
    baseline = r"bare aiosmtpd [\d.]+ ms per mail at this rate \(the gateway: [\d.?]+x\), [\d.]+ ms"
    assert re.search(baseline + " in a burst", out), out
    # the CPU goal is for the steady 100 msg/s run alone
    assert len(re.findall(r"CPU per mail, gateway process tree: [\d.]+ ms\n", out)) == 2, out


def test_pd_sink_throttles_to_its_rate_and_answers_429_beyond() -> None:
    with PdSink(rate=1) as sink:
        connection = http.client.HTTPConnection("127.0.0.1", sink.port, timeout=10)
        statuses = []
        for n in range(10):  # one keep-alive connection, as the gateway uses
            body = f'{{"event_action":"trigger","dedup_key":"k{n}"}}'
            connection.request("POST", "/v2/enqueue", body=body)
            answer = connection.getresponse()
            answer.read()
            statuses.append(answer.status)
        connection.close()
        log = sink.requests()
    assert statuses[0] == 202 and 429 in statuses
    assert [r.status for r in log] == statuses
    assert [r.key for r in log] == [f"k{n}" for n in range(10)]
    accepted = [r.at for r in log if r.status == 202]
    assert all(b - a >= 0.99 for a, b in itertools.pairwise(accepted))


def test_storm_benchmark_reports_its_goals_and_that_nothing_was_lost() -> None:
    out = run_bench("storm.py", "--messages", "24", "--cases", "4", "--timeout", "120")
    for goal in (
        r"events offered per case: [\d.]+ .*\(goal <= 2",
        r"429 answers: \d+ +\(goal <= 5",
        r"every case paged after [\d.]+ s +\(goal <= 30 s",
        r"late new case paged after [\d.]+ s +\(goal <= 2 s",
    ):
        assert re.search(goal, out), out
    assert "nothing lost: every mail decided and visible: met (26/26 accepted" in out, out


def test_short_runs_and_help_work_for_every_benchmark() -> None:
    for script in ("smtp_throughput.py", "cpu_per_message.py", "storm.py", "pd_sink.py", "ha.py"):
        assert "usage:" in run_bench(script, "--help", timeout=60)


def test_thread_benchmark_splits_the_cpu_per_mail_by_thread() -> None:
    out = run_bench("thread_cpu.py", "--messages", "30", "--rate", "50")
    assert re.search(r"gateway CPU [\d.]+ ms per mail \(listener [\d.]+, worker [\d.]+\)", out), out
    assert re.search(r"listener threads \(ms per mail\): \S+ [\d.]+ \([\d.]+ switches\)", out), out
    assert re.search(r"worker threads \(ms per mail\): \S", out), out
    assert "usage:" in run_bench("thread_cpu.py", "--help", timeout=60)


def test_idle_penalty_benchmark_prints_each_pause_against_the_hot_loop() -> None:
    out = run_bench("idle_penalty.py", "--batches", "3", "--runs", "1")
    for pause in (0, 2, 5, 10, 20, 50):
        line = rf"pause +{pause} ms: [\d.]+ ms per decision \([\d.]+x hot\), extra CPU per wake-up"
        assert re.search(line, out), out
    awake = run_bench("idle_penalty.py", "--batches", "2", "--runs", "1", "--keep-awake")
    assert "vCPUs kept awake" in awake and "pause  50 ms" in awake, awake
    assert "usage:" in run_bench("idle_penalty.py", "--help", timeout=60)


def test_ha_benchmark_compares_the_setups_and_prints_the_box_ceiling() -> None:
    require_postgres()
    out = run_bench("ha.py", "--messages", "40", "--sessions", "4", timeout=300)
    for setup in ("1 node, SQLite", "1 node, PostgreSQL", "2 nodes, PostgreSQL"):
        assert re.search(rf"{setup} +intake +\d+ msg/s +delivered +\d+ msg/s", out), out
    assert re.search(r"two nodes / one PostgreSQL node: [\d.]+x \(goal >= 1.6x\)", out), out
    assert re.search(r"this box's ceiling: \d+ cores / [\d.]+ ms CPU per mail = \d+ msg/s", out), (
        out
    )


def test_decide_rate_benchmark_decides_every_spooled_mail_on_both_backends() -> None:
    require_postgres()
    out = run_bench("decide_rate.py", "--messages", "40", "--runs", "1", timeout=300)
    for backend in ("SQLite", "PostgreSQL"):
        assert re.search(rf"{backend} +\d+ decisions/s  CPU per decision: decider [\d.]+ ms", out)
    assert re.search(r"PostgreSQL / SQLite, best runs: [\d.]+x", out), out
    assert "usage:" in run_bench("decide_rate.py", "--help", timeout=60)
