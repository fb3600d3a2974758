"""Helpers for the operations tests: a gateway with its web listener, mail over SMTP, HTTP GETs."""

from __future__ import annotations

import contextlib
import json
import shutil
import smtplib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import RULES_DIR, GatewayProcess, free_port, wait_until, write_config


class WebGateway(GatewayProcess):
    """`gateway serve` with `[web]` on a free loopback port."""

    def __init__(self, config: Path, port: int, web_port: int) -> None:
        super().__init__(config, port)
        self.web_port = web_port
        self.base = f"http://127.0.0.1:{web_port}"

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:  # not listening (yet)
            return 0, ""

    def health(self) -> tuple[int, dict]:
        status, body = self.get("/healthz")
        return status, json.loads(body)

    def send(self, raw: bytes, to: str = "desk@gateway.example") -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
            client.sendmail("support@helpdesk.example", [to], raw)


@contextlib.contextmanager
def running(config: Path, port: int, web_port: int) -> Iterator[WebGateway]:
    """A started WebGateway whose /healthz answers 200; killed afterwards if still running."""
    gateway = WebGateway(config, port, web_port)
    try:
        gateway.start()
        wait_until(lambda: gateway.get("/healthz")[0] == 200, message=gateway.output())
        yield gateway
    finally:
        if gateway.proc is not None and gateway.proc.poll() is None:
            gateway.kill()


def web_config(
    directory: Path, pd_url: str, *, token: str = "", web: str = "", own_rules: bool = False
) -> tuple[Path, int, int]:
    """A config with [web] on a free port; own_rules copies the rules into `directory/rules`."""
    port, web_port = free_port(), free_port()
    token_line = f'token = "{token}"' if token else ""
    listen = "" if "listen" in web else f'listen = "127.0.0.1:{web_port}"'
    extra = f"[web]\n{listen}\n{token_line}\n{web}\n"
    config = write_config(directory, pd_url=pd_url, smtp_port=port, extra=extra)
    if own_rules:
        rules = directory / "rules"
        rules.mkdir()
        shutil.copy(RULES_DIR / "helpdesk.toml", rules / "helpdesk.toml")
        config.write_text(config.read_text().replace(RULES_DIR.as_posix(), rules.as_posix()))
    return config, port, web_port


def worker_pid(parent: int) -> int | None:
    """The pid of `gateway serve`'s worker child (a `spawn` child; the other is multiprocessing's
    resource tracker)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            return int(entry.name)
    return None


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus exposition text (labels in any order; the `node`
    label every sample carries is compared only when asked for)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        base, _, label_text = sample.partition("{")
        if base != name:
            continue
        found = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )
        values = {k: v.strip('"') for k, v in found.items()}
        if "node" not in labels:
            values.pop("node", None)
        if values == labels:
            return float(value)
    return None
