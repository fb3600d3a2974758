"""Several nodes on PostgreSQL (`[store] url`): `gateway serve` end to end on a real server."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from gateway.config import load_config
from gateway.delivery.outbox import LEAVE_NEW_SECONDS
from gateway.errors import ConfigError
from gateway.runtime.worker import ASK_OTHER_NODES_SECONDS
from gateway.store import OutboxItem, Store, open_store
from gateway.store.postgres.connection import close_pool
from gateway.store.postgres.wakeups import WORKER_SESSION
from tests.conftest import ROOT, GatewayProcess, desk_mail, free_port, wait_until, write_config
from tests.ops_support import WebGateway, running, worker_pid
from tests.pdserver import PagerDutyStandIn
from tests.postgres import PostgresServer, require_postgres


def pg_config(directory: Path, pd_url: str, url: str, node: str = "", web: bool = False) -> Path:
    store = f'[store]\nurl = "{url}"\n' + (f'node = "{node}"\n' if node else "")
    web_part = f'[web]\nlisten = "127.0.0.1:{free_port()}"\n' if web else ""
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory, pd_url=pd_url, smtp_port=free_port(), extra=store + web_part)


def smtp_port(config: Path) -> int:
    return int(load_config(config).smtp.listen[0].rpartition(":")[2])


def test_serve_on_postgresql_accepts_and_delivers_without_a_sqlite_file(
    tmp_path: Path, pd: PagerDutyStandIn, postgres_url: str
) -> None:
    config = pg_config(tmp_path, pd.url, postgres_url)
    gateway = GatewayProcess(config, smtp_port(config)).start()
    try:
        WebGateway(config, gateway.port, 0).send(desk_mail("Printer on fire", "New"))
        [event] = pd.wait_for(1)
        assert event["event_action"] == "trigger"
        assert gateway.stop() == 0
    finally:
        if gateway.proc is not None and gateway.proc.poll() is None:
            gateway.kill()
    assert not (tmp_path / "data" / "gateway.sqlite3").exists()


def test_store_url_takes_secrets_from_the_environment(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, extra='[store]\nurl = "postgresql://gw:${PGPASS}@db.example/gateway"\n'
    )
    loaded = load_config(config, {"PGPASS": "s3cret"})
    assert loaded.store_location == "postgresql://gw:s3cret@db.example/gateway"
    assert load_config(write_config(tmp_path)).store_location == tmp_path / "data/gateway.sqlite3"


def test_a_store_url_that_is_not_postgresql_is_a_config_error_with_its_line(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, extra='[store]\nurl = "mysql://db.example/gateway"\n')
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    text = str(raised.value)
    assert "store.url" in text and "postgresql://" in text
    line = next(n for n, t in enumerate(config.read_text().splitlines(), 1) if "mysql" in t)
    assert f":{line}:" in text or f"line {line}" in text


def test_gateway_migrate_creates_the_postgresql_schema(tmp_path: Path, postgres_url: str) -> None:
    config = pg_config(tmp_path, "http://127.0.0.1:9/", postgres_url)

    def migrate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.cli", "--config", str(config), "migrate"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )

    first = migrate()
    assert first.returncode == 0, first.stderr
    assert "migrated from version 0" in first.stdout
    again = migrate()
    assert again.returncode == 0 and "nothing to do" in again.stdout


def smtp_data_reply(port: int, raw: bytes) -> tuple[int, bytes]:
    """The reply to DATA (or the first refusal before it)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
        client.ehlo()
        for code, text in (
            client.mail("support@helpdesk.example"),
            client.rcpt("desk@gateway.example"),
        ):
            if code >= 400:
                return code, text
        return client.data(raw)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[PostgresServer]:
    """A server of this test's own: it is taken away and brought back."""
    server = PostgresServer(require_postgres())
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(RuntimeError):
            server.stop()
        server.remove()


def test_postgresql_going_away_answers_451_never_250_and_service_resumes(
    tmp_path: Path, pd: PagerDutyStandIn, own_server: PostgresServer
) -> None:
    url = own_server.new_database()
    config = pg_config(tmp_path, pd.url, url, web=True)
    web_port = int(load_config(config).web.listen.rpartition(":")[2])
    with running(config, smtp_port(config), web_port) as gateway:
        assert smtp_data_reply(gateway.port, desk_mail("Before", "New"))[0] == 250
        pd.wait_for(1)
        reader = open_store(url, read_only=True)
        wait_until(lambda: reader.outbox_stats()[0] == 0, message="delivery never recorded")
        own_server.stop()  # immediate: the database is gone
        code, text = smtp_data_reply(gateway.port, desk_mail("During", "New"))
        assert (code, text[:5]) == (451, b"4.3.0"), (code, text)
        failing = wait_until(
            lambda: (answer := gateway.get("/healthz"))[0] == 503 and answer,
            60,
            message="healthz stayed ok",
        )
        assert json.loads(failing[1])["store"]["ok"] is False
        own_server.start()
        wait_until(
            lambda: smtp_data_reply(gateway.port, desk_mail("After", "New"))[0] == 250,
            60,
            interval=0.5,
            message="no 250 after the database came back",
        )
        events = pd.wait_for(2, timeout=60)
        assert [e["dedup_key"] for e in events] == ["Before", "After"]
        wait_until(lambda: gateway.get("/healthz")[0] == 200, 60, message="healthz stayed failing")
        # the outage is told in one line per attempt, never as a stack trace to the operator
        assert "Traceback" not in gateway.output(), gateway.output()
    close_pool(url)


def test_two_nodes_keep_one_rate_limit_per_routing_key_between_them(
    tmp_path: Path, pd: PagerDutyStandIn, postgres_url: str
) -> None:
    """`rate_limit_per_minute` is PagerDuty's rate per routing key, so it must hold for the
    cluster: the send slots are in the shared store, not in each node's memory. At 60 a
    minute, six new cases sent to two nodes at once go out about a second apart, not in pairs."""
    nodes = []
    for name in ("a", "b"):
        config = pg_config(tmp_path / name, pd.url, postgres_url, node=name)
        text = config.read_text().replace("rate_limit_per_minute = 0", "rate_limit_per_minute = 60")
        config.write_text(text)
        nodes.append(GatewayProcess(config, smtp_port(config)).start())
    try:
        for n in range(6):
            node = nodes[n % 2]
            WebGateway(node.config, node.port, 0).send(desk_mail(f"Case {n}", "New"))
        pd.wait_for(6, timeout=30)
        times = sorted(request["at"] for request in pd.requests)
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert min(gaps) > 0.8, gaps  # two per-node budgets would send pairs ~0 s apart
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.kill()


def worker_sessions(url: str) -> set[str]:
    """The nodes whose workers are connected (their LISTEN sessions)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE %s",
            (WORKER_SESSION + "%",),
        ).fetchall()
    return {name.removeprefix(WORKER_SESSION) for (name,) in rows}


def first_attempts(store: Store, done: int) -> list[tuple[OutboxItem, float]]:
    """Once `done` items are recorded done: each with its first attempt's time."""
    wait_until(lambda: len(store.outbox(("done",))) == done, message="results not recorded")
    items = store.outbox(("done",))
    first: dict[int, float] = {}
    for attempt in store.outbox_attempts([item.id for item in items]):
        first.setdefault(attempt.item, attempt.at)
    return [(item, first[item.id]) for item in items]


def delivered_new(store: Store, done: int) -> dict[str, int]:
    """Per node: the PagerDuty events it delivered less than `LEAVE_NEW_SECONDS` after they
    were queued (the items only a node not leaving new items may take)."""
    counts: dict[str, int] = {}
    for item, at in first_attempts(store, done):
        if at - item.created_at < LEAVE_NEW_SECONDS:
            counts[item.delivered_by] = counts.get(item.delivered_by, 0) + 1
    return counts


def send_to(node: GatewayProcess, cases: range) -> None:
    for n in cases:
        WebGateway(node.config, node.port, 0).send(desk_mail(f"Case {n}", "New"))


def test_the_deciding_node_leaves_new_deliveries_to_the_other_node(
    tmp_path: Path, pd: PagerDutyStandIn, postgres_url: str
) -> None:
    """The node holding the decide turn decides every node's mail: while the other node's
    worker is up, that node delivers the new items, and the deciding one takes only items
    that waited `LEAVE_NEW_SECONDS`: the most a frozen node (SIGSTOP) delays a page. Once the
    other node is gone, the deciding node delivers at once again."""
    nodes = {}
    for name in ("a", "b"):
        config = pg_config(tmp_path / name, pd.url, postgres_url, node=name)
        nodes[name] = GatewayProcess(config, smtp_port(config)).start()
    store = open_store(postgres_url)
    frozen: list[int] = []
    try:
        wait_until(lambda: worker_sessions(postgres_url) >= {"a", "b"}, message="workers not up")
        time.sleep(2 * ASK_OTHER_NODES_SECONDS)  # the deciding node asks once a second who is up
        for n in range(10):
            send_to(nodes["ab"[n % 2]], range(n, n + 1))
        pd.wait_for(10, timeout=30)
        delivering = delivered_new(store, 10)
        assert len(delivering) == 1, delivering  # the deciding node took no new item
        (deliverer,) = delivering
        decider = "b" if deliverer == "a" else "a"

        parent = nodes[deliverer].proc
        assert parent is not None
        frozen = [p for p in (parent.pid, worker_pid(parent.pid)) if p is not None]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)  # up (its sessions stay) but stuck
        send_to(nodes[decider], range(10, 13))
        pd.wait_for(13, timeout=30)
        late_cases = {f"Case {n}" for n in range(10, 13)}
        late = [
            (i, at) for i, at in first_attempts(store, 13) if i.payload["dedup_key"] in late_cases
        ]
        assert len(late) == 3
        assert {item.delivered_by for item, _ in late} == {decider}
        waited = [at - item.created_at for item, at in late]
        assert all(LEAVE_NEW_SECONDS <= w < LEAVE_NEW_SECONDS + 5 for w in waited), waited
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        frozen = []

        nodes[deliverer].kill()
        wait_until(lambda: deliverer not in worker_sessions(postgres_url), message="still up")
        time.sleep(2 * ASK_OTHER_NODES_SECONDS)
        send_to(nodes[decider], range(13, 16))
        pd.wait_for(16, timeout=30)
        assert delivered_new(store, 16).get(decider) == 3
    finally:
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        store.close()
        for gateway in nodes.values():
            if gateway.proc is not None and gateway.proc.poll() is None:
                gateway.kill()
