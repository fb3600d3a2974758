"""Configuration generations: what `gateway check` validated, as bytes the worker compiles."""

from __future__ import annotations

import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.decide.notifications import build_helpdesk_notifier
from gateway.errors import ConfigError
from gateway.files import FileSnapshot
from gateway.runtime.reload import compile_generation, load_generation
from tests.conftest import ROOT, RULES_DIR, write_config

NOTIFY = """notify = { theme = "incident_update", to = ["agents@helpdesk.example"] }
[outgoing]
host = "127.0.0.1"
"""


def own_files(tmp_path: Path) -> Path:
    """A config whose rules and themes live under tmp_path (so the test may break them)."""
    config = write_config(tmp_path, service_extra=NOTIFY)
    shutil.copytree(RULES_DIR, tmp_path / "rules")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    text = config.read_text().replace(RULES_DIR.as_posix(), (tmp_path / "rules").as_posix())
    config.write_text(text.replace((ROOT / "templates").as_posix(), "templates"))
    return config


def test_a_generation_compiles_from_its_bytes_whatever_the_disk_says(tmp_path: Path) -> None:
    config = own_files(tmp_path)
    validated = replace(load_generation(config), number=4)
    shipped = pickle.loads(pickle.dumps(validated.for_worker()))  # as it crosses the pipe
    # after validation the operator breaks everything on disk
    (tmp_path / "rules" / "helpdesk.toml").write_text("[[rule]]\nname = 1\n")
    shutil.rmtree(tmp_path / "templates")
    config.write_text("this is not TOML")
    with pytest.raises(ConfigError):
        load_generation(config)  # what a worker reading the disk would have run into

    compiled = compile_generation(shipped)
    assert compiled.number == 4
    assert compiled.config == validated.config
    assert [r.name for r in compiled.services["helpdesk"].ruleset.rules] == [
        r.name for r in validated.services["helpdesk"].ruleset.rules
    ]
    notifier = build_helpdesk_notifier(compiled.config, files=compiled.files)
    assert notifier is not None and "incident_update" in notifier.themes.names()


def test_a_frozen_snapshot_never_reads_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_bytes(b"x = 1\r\ny = 2\r\n")
    live = FileSnapshot()
    assert live.read_text(path) == path.read_text()  # universal newlines, like Path.read_text
    assert live.is_dir(tmp_path) and live.iterdir(tmp_path) == [path]
    frozen = live.frozen()
    path.unlink()
    (tmp_path / "b.toml").write_text("new")
    assert frozen.read_bytes(path) == b"x = 1\r\ny = 2\r\n"
    assert frozen.iterdir(tmp_path) == [path]
    assert not frozen.is_file(tmp_path / "b.toml")
    with pytest.raises(FileNotFoundError):
        frozen.read_bytes(tmp_path / "b.toml")
