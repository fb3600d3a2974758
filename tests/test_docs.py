"""The README is part of the product: every command is documented and has help with an example."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.cli import build_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_is_in_the_readme_reference(name: str) -> None:
    assert f"| `gateway {name}" in README


@pytest.mark.parametrize("name", sorted(commands()))
def test_every_command_has_help_with_an_example(name: str) -> None:
    assert "Example:\n  gateway " in commands()[name].format_help()


def test_readme_starts_with_the_two_commands() -> None:
    head = README[: README.index("## Five-minute walk-through")]
    assert "pip install -e . && gateway serve" in head
    assert "pip install -e '.[test]' && python -m pytest" in head
