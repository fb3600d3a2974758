"""The outbox and incident tools an on-call engineer uses: `gateway outbox [retry|flush]`,
`--json`, and `gateway incidents resolve`. Real SQLite, the real CLI entry point, and the
PagerDuty stand-in."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest

from gateway.cli import EX_OK, EX_USAGE, main
from gateway.config import WebSettings
from gateway.store import OutboxResult, Store, StoreThread, open_store
from gateway.web.status import WebApp
from tests.conftest import ROUTING_KEY, desk_mail, write_config
from tests.pdserver import PagerDutyStandIn, Scripted


class Cli:
    """`gateway ...` in-process against one config: (exit code, stdout, stderr)."""

    def __init__(self, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.config = config
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--config", str(self.config), *args])
        out = self.capsys.readouterr()
        return code, out.out, out.err

    def ingest(self, raw: bytes) -> None:
        path = self.config.parent / "in.eml"
        path.write_bytes(raw)
        assert self("ingest", str(path), "--service", "helpdesk")[0] == EX_OK

    @property
    def store(self) -> Store:
        return open_store(self.config.parent / "data" / "gateway.sqlite3")


@pytest.fixture
def cli(tmp_path: Path, pd: PagerDutyStandIn, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(write_config(tmp_path, pd_url=pd.url), capsys)


def sent(pd: PagerDutyStandIn) -> list[tuple[str, str]]:
    return [(e["event_action"], e["dedup_key"]) for e in pd.events]


def dead_trigger_after_its_resolve(cli: Cli, pd: PagerDutyStandIn) -> int:
    """PagerDuty refused the trigger (400, a dead letter); the resolve went out after it."""
    pd.fail_next(1, 400)
    cli.ingest(desk_mail("VPN down"))
    cli.ingest(desk_mail("VPN down", "Resolved"))
    assert sent(pd) == [("resolve", "VPN down")]
    [dead] = cli.store.outbox(("dead",))
    return dead.id


# -- item 4: a dead letter is never re-queued behind a later item that went out -----------------


def test_retry_refuses_a_dead_trigger_after_its_resolve_was_delivered(
    cli: Cli, pd: PagerDutyStandIn
) -> None:
    trigger = dead_trigger_after_its_resolve(cli, pd)
    code, _, err = cli("outbox", "retry", str(trigger))
    assert code == EX_USAGE
    assert f"#{trigger} (trigger VPN down) would be sent after" in err
    assert "already delivered" in err and "--force" in err
    cli("outbox", "flush")
    assert sent(pd) == [("resolve", "VPN down")], "PagerDuty was left with an open incident"
    assert [o.id for o in cli.store.outbox(("dead",))] == [trigger]


def test_retry_force_sends_it_anyway_with_a_warning(cli: Cli, pd: PagerDutyStandIn) -> None:
    trigger = dead_trigger_after_its_resolve(cli, pd)
    code, out, err = cli("outbox", "retry", str(trigger), "--force")
    assert code == EX_OK and f"re-queued 1 item(s): #{trigger}" in out
    assert err.startswith("warning: re-queued out of order:")
    cli("outbox", "flush")
    assert sent(pd) == [("resolve", "VPN down"), ("trigger", "VPN down")]


def test_retry_all_requeues_the_rest_and_lists_what_it_refused(
    cli: Cli, pd: PagerDutyStandIn
) -> None:
    trigger = dead_trigger_after_its_resolve(cli, pd)
    pd.fail_next(1, 400)
    cli.ingest(desk_mail("Printer on fire"))
    [other] = [o.id for o in cli.store.outbox(("dead",)) if o.id != trigger]
    code, out, err = cli("outbox", "retry", "--all")
    assert code == EX_USAGE  # something was refused: a script notices
    assert f"re-queued 1 item(s): #{other}" in out and f"refused: #{trigger} " in err
    cli("outbox", "flush")
    assert sent(pd)[-1] == ("trigger", "Printer on fire")


def test_the_status_page_retry_button_follows_the_same_rule(cli: Cli, pd: PagerDutyStandIn) -> None:
    trigger = dead_trigger_after_its_resolve(cli, pd)
    store = StoreThread(cli.config.parent / "data" / "gateway.sqlite3", "web-test")
    web = WebApp(store, WebSettings(token="t"))

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
            return await client.post(f"/outbox/{trigger}/retry", data={"token": "t"})

    try:
        response = asyncio.run(post())
    finally:
        store.close()
    assert response.status_code == 409 and "already delivered" in response.text
    assert [o.id for o in cli.store.outbox(("dead",))] == [trigger]


# -- item 22: retry says why, flush --all, the created time, --json -----------------------------


def test_retry_says_why_it_does_nothing(cli: Cli, pd: PagerDutyStandIn) -> None:
    code, _, err = cli("outbox", "retry", "42")
    assert code == EX_USAGE and err.strip() == "error: no outbox item #42"
    pd.fail_next(1, 500)
    cli.ingest(desk_mail("Disk full"))  # one failed attempt: pending, waiting for its retry
    [waiting] = cli.store.outbox(("pending",))
    code, _, err = cli("outbox", "retry", str(waiting.id))
    assert code == EX_USAGE and "is still pending (not dead): nothing to retry" in err
    cli.store.conn.execute("UPDATE outbox SET next_attempt_at = 0")  # type: ignore[attr-defined]
    cli("outbox", "flush")
    code, _, err = cli("outbox", "retry", str(waiting.id))
    assert code == EX_USAGE and "was delivered: nothing to retry" in err


def test_retry_keeps_the_original_created_time(cli: Cli, pd: PagerDutyStandIn) -> None:
    pd.fail_next(1, 400)
    cli.ingest(desk_mail("Bad event"))
    [dead] = cli.store.outbox(("dead",))
    time.sleep(1.1)  # the CLI shows created times to the second
    assert cli("outbox", "retry", str(dead.id))[0] == EX_OK
    [again] = cli.store.outbox(("pending",))
    assert again.created_at == dead.created_at
    record = json.loads(cli("outbox", "--json")[1])
    assert record["created_at"] < record["requeued_at"]


def test_flush_all_also_tries_items_not_yet_due(cli: Cli, pd: PagerDutyStandIn) -> None:
    pd.fail_next(1, 503)
    cli.ingest(desk_mail("Outage"))
    store = cli.store
    [item] = store.outbox(("pending",))
    later = time.time() + 3600  # as after many failures: the next try is an hour away
    store.record_outbox([OutboxResult(item.id, "pending", error="503", next_attempt_at=later)])
    cli("outbox", "flush")
    assert sent(pd) == []  # not due
    code, out, _ = cli("outbox", "flush", "--all")
    assert code == EX_OK and sent(pd) == [("trigger", "Outage")]
    assert "outbox is empty" in out


def test_outbox_json_shows_the_last_error_whole(cli: Cli, pd: PagerDutyStandIn) -> None:
    errors = ["'payload.summary' is missing or too long", "'payload.severity' is invalid"]
    body = {"status": "invalid event", "message": "Event object is invalid", "errors": errors}
    pd.script.append(Scripted(400, json.dumps(body)))
    cli.ingest(desk_mail("Bad event"))
    [dead] = cli.store.outbox(("dead",))
    assert len(dead.last_error) > 80  # longer than the table shows
    code, out, _ = cli("outbox", "--json")
    [line] = out.splitlines()
    record = json.loads(line)
    assert code == EX_OK and record["last_error"] == dead.last_error
    assert record["response"] == dead.response
    assert {k: record[k] for k in ("id", "kind", "service", "state", "attempts")} == {
        "id": dead.id,
        "kind": "pagerduty",
        "service": "helpdesk",
        "state": "dead",
        "attempts": 1,
    }
    assert record["item"] == "trigger Bad event" and record["in_flight"] is False
    assert record["payload"]["dedup_key"] == "Bad event"
    assert record["payload"]["routing_key"] == "(the key that opened the incident)"
    assert ROUTING_KEY not in out  # every event carries its incident's key: never shown
    assert record["created_at"].endswith("Z") and record["next_attempt_at"] is None
    assert dead.last_error not in cli("outbox")[1]  # the table cuts it


# -- item 23: resolving a stuck incident by hand -----------------------------------------------


def test_incidents_resolve_closes_a_stuck_incident_locally(cli: Cli, pd: PagerDutyStandIn) -> None:
    cli.ingest(desk_mail("VPN down"))
    code, out, _ = cli("incidents", "resolve", "helpdesk", "VPN down")
    assert code == EX_OK and "'VPN down' resolved in the local mirror" in out
    [incident] = cli.store.incidents()
    assert (incident.state, incident.resolve_count) == ("resolved", 1)
    assert incident.last_message is not None  # still points at its mail
    assert sent(pd) == [("trigger", "VPN down")]  # nothing sent without --send
    assert cli.store.events()[0]["kind"] == "manual_resolve"
    code, out, _ = cli("incidents", "resolve", "helpdesk", "VPN down")
    assert code == EX_OK and "was already resolved" in out


def test_incidents_resolve_send_sends_the_resolve_to_pagerduty(
    cli: Cli, pd: PagerDutyStandIn
) -> None:
    cli.ingest(desk_mail("VPN down"))
    code, out, _ = cli("incidents", "resolve", "helpdesk", "VPN down", "--send")
    assert code == EX_OK and "resolve event sent to PagerDuty" in out
    assert sent(pd) == [("trigger", "VPN down"), ("resolve", "VPN down")]
    assert pd.events[-1]["routing_key"] == ROUTING_KEY  # the incident's service's key
    [item] = cli.store.outbox(("done",))[-1:]
    assert item.order_key == "pagerduty:helpdesk:VPN down"  # behind the key's other events


def test_incidents_resolve_names_close_keys_when_there_is_no_such_incident(
    cli: Cli, pd: PagerDutyStandIn
) -> None:
    cli.ingest(desk_mail("VPN down in Berlin"))
    code, _, err = cli("incidents", "resolve", "helpdesk", "VPN down in berlin")
    assert code == EX_USAGE and "no incident 'VPN down in berlin'" in err
    assert "'VPN down in Berlin'" in err
    code, _, err = cli("incidents", "resolve", "helpdsk", "VPN down in Berlin")
    assert code == EX_USAGE and "(services in config.toml: helpdesk)" in err
    assert cli("incidents", "resolve", "helpdesk")[0] == EX_USAGE  # needs SERVICE and KEY


def test_incidents_resolve_send_needs_a_routing_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = Cli(write_config(tmp_path, routing_key=None), capsys)
    cli.ingest(desk_mail("VPN down"))
    code, _, err = cli("incidents", "resolve", "helpdesk", "VPN down", "--send")
    assert code == EX_USAGE and "no routing_key (local mode)" in err
    assert cli.store.incidents()[0].state == "triggered"  # nothing changed
