"""config.toml loading: typed values, ${ENV} secrets, relative paths, precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import (
    IN_FLOW_BACKLOG_POSTGRES,
    IN_FLOW_BACKLOG_SQLITE,
    find_config_path,
    load_config,
    split_hostport,
)
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "rules").mkdir(exist_ok=True)
    (tmp_path / "rules" / "r.toml").write_text("")
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


MINIMAL = """
[gateway]
rules_dir = "rules"
[[service]]
name = "helpdesk"
addresses = ["desk@*"]
rules = ["r.toml"]
"""


def test_the_shipped_default_config_loads() -> None:
    config = load_config(ROOT / "config.toml")
    assert config.smtp.listen == ("127.0.0.1:2525",)
    assert config.services[0].routing_key is None  # the embedded default needs no account
    assert config.gateway.data_dir == ROOT / "data"


def test_minimal_config_gets_safe_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.smtp.listen == ("127.0.0.1:2525",)  # loopback unless configured
    assert config.smtp.max_message_bytes == 10 * 1024 * 1024
    assert config.gateway.data_dir == tmp_path / "data"
    assert config.services[0].rules == (tmp_path / "rules" / "r.toml",)
    assert config.db_path.parent == tmp_path / "data"


def test_secrets_come_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + 'routing_key = "${PD_KEY}"\n')
    config = load_config(path, environ={"PD_KEY": "k" * 32})
    assert config.services[0].routing_key == "k" * 32


def test_env_default_syntax(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('"helpdesk"', '"${NAME:-fallback}"'))
    assert load_config(path, environ={}).services[0].name == "fallback"


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        pytest.param(
            "[smtp]\nlisten_port = 25\n", "[smtp.listen_port]: unknown key", id="unknown-key"
        ),
        pytest.param(
            '[smtp]\nmax_connections = "many"\n',
            "[smtp.max_connections]: must be an integer",
            id="wrong-type",
        ),
        pytest.param(
            '[gateway]\nlog_level = "loud"\n',
            "[gateway.log_level]: must be one of",
            id="bad-choice",
        ),
        pytest.param(
            '[smtp]\nlisten = ["localhost"]\n',
            "[smtp.listen]: 'localhost' is not host:port",
            id="bad-listen",
        ),
        pytest.param(
            '[pagerduty]\nevents_url = "ftp://x"\n',
            "[pagerduty.events_url]: must be an http(s) URL",
            id="bad-url",
        ),
        pytest.param(
            "[smtp]\nin_flow_backlog = -1\n",
            "[smtp.in_flow_backlog]: must be at least 0",
            id="negative-pacing",
        ),
        pytest.param("[bogus]\n", "[bogus]: unknown key", id="unknown-table"),
        pytest.param(
            '[smtp]\ntls = "starttls"\n',
            "[smtp.tls]: TLS enabled, but tls_cert and tls_key",
            id="tls-without-cert",
        ),
    ],
)
def test_mistakes_name_file_and_key(tmp_path: Path, snippet: str, expected: str) -> None:
    body = (
        MINIMAL.replace("[gateway]\n", "[gateway_]\n")
        if snippet.startswith("[gateway]")
        else MINIMAL
    )
    body = body.replace("[gateway_]\n", "")
    path = write(tmp_path, snippet + body)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    line = 1 if snippet.startswith("[bogus]") else 2  # the key's own line
    assert f"{path}:{line}: {expected}" in str(info.value)


def test_missing_env_var_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + 'routing_key = "${PD_ROUTING_KEY}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert (
        "[service 'helpdesk'.routing_key]: environment variable PD_ROUTING_KEY is not set"
        in str(info.value)
    )


def test_unknown_rule_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('"r.toml"', '"missing.toml"'))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "[service 'helpdesk'.rules]: rule file not found:" in str(info.value)
    assert "missing.toml" in str(info.value)


def test_toml_syntax_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\nbroken = = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].line == 9
    assert str(info.value).startswith(f"{path}:9: TOML syntax error")


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "[smtp]\nmax_connections = 0\nhostname = 5\n" + MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 2


def test_config_path_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    assert find_config_path(None) == Path("config.toml")
    monkeypatch.setenv("GATEWAY_CONFIG", "/etc/gateway/config.toml")
    assert find_config_path(None) == Path("/etc/gateway/config.toml")
    assert find_config_path("x.toml") == Path("x.toml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:2525", ("127.0.0.1", 2525)), ("[::1]:25", ("::1", 25)), (":25", ("", 25))],
)
def test_split_hostport(value: str, expected: tuple[str, int]) -> None:
    assert split_hostport(value) == expected


def test_a_misspelt_table_gets_a_suggestion_and_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[smpt]\nlisten = []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert (problem.line, problem.key) == (MINIMAL.count("\n") + 2, "smpt")
    assert "did you mean 'smtp'?" in problem.message


def test_a_key_inside_the_second_service_is_located(tmp_path: Path) -> None:
    second = MINIMAL[MINIMAL.index("[[service]]") :].replace('"helpdesk"', '"other"')
    path = write(tmp_path, MINIMAL + "\n" + second + 'adresses = ["x@y"]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [problem] = info.value.problems
    text = path.read_text().splitlines()
    assert text[problem.line - 1].startswith("adresses")
    assert "did you mean 'addresses'?" in problem.message


def test_a_shell_style_variable_is_named_as_unexpanded(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + 'routing_key = "$PD_ROUTING_KEY"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"PD_ROUTING_KEY": "k" * 32})
    assert "$PD_ROUTING_KEY is not expanded here: write ${PD_ROUTING_KEY}" in str(info.value)


def test_an_empty_variable_is_named_as_empty(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + 'routing_key = "${PD_ROUTING_KEY}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"PD_ROUTING_KEY": ""})
    assert "environment variable PD_ROUTING_KEY is set but empty" in str(info.value)


def test_a_key_of_the_wrong_length_says_where_it_came_from(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + 'routing_key = "${PD_ROUTING_KEY}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"PD_ROUTING_KEY": "k" * 31})
    assert "has 32 characters; ${PD_ROUTING_KEY} has 31 characters" in str(info.value)


def test_a_missing_config_says_where_it_looked_and_how_to_pass_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(Path("nowhere.toml"))
    message = str(info.value)
    assert "config file not found: nowhere.toml (in " in message
    assert "--config" in message and "GATEWAY_CONFIG" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param("", IN_FLOW_BACKLOG_SQLITE, id="sqlite-default"),
        pytest.param('[store]\nurl = "postgresql://db/gw"\n', IN_FLOW_BACKLOG_POSTGRES, id="pg"),
        pytest.param(
            '[store]\nurl = "postgresql://db/gw"\n[smtp]\nin_flow_backlog = 30\n', 30, id="set"
        ),
    ],
)
def test_the_pacing_backlog_defaults_to_the_stores_own(
    tmp_path: Path, extra: str, expected: int
) -> None:
    """Deciding on PostgreSQL costs round trips per batch: its default lets batches grow."""
    assert load_config(write(tmp_path, MINIMAL + extra)).smtp.in_flow_backlog == expected
