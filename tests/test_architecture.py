"""The package layout is the pipeline: imports never form a cycle and never point back up.

Each stage may import the stages before it (it consumes what they produce) and never one after
it. The order below is the data flow of DESIGN.md, with two libraries placed where their first
user needs them: `mail` (the parsed-message model and fingerprint) before `intake`, which
fingerprints mail at acceptance, and `themes` (the notification renderer) before `decide`,
which renders helpdesk mail as part of a decision. Modules directly in `gateway/` (errors,
config, logs) are the base every stage may use.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
STAGES = (
    "gateway",  # base: errors, config, logs
    "gateway.store",
    "gateway.mail",
    "gateway.intake",
    "gateway.rules",
    "gateway.themes",
    "gateway.decide",
    "gateway.delivery",
    "gateway.web",
    "gateway.runtime",
    "gateway.cli",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage_of(module: str) -> str:
    """The stage package a module belongs to; root modules are the base."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or module in STAGES else "gateway"


def imports_of(module: str) -> Iterator[tuple[str, int]]:
    """Every gateway module imported anywhere in `module` (function bodies included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _resolve(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield from _resolve(candidate if candidate in MODULES else base, node.lineno)


def _resolve(name: str, line: int) -> Iterator[tuple[str, int]]:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    if name.startswith("gateway"):
        yield name, line


GRAPH = {m: sorted({target for target, _ in imports_of(m)} - {m}) for m in MODULES}


def test_every_module_belongs_to_a_known_stage() -> None:
    unknown = sorted(m for m in MODULES if stage_of(m) not in STAGES)
    assert unknown == []


def test_no_import_points_back_up_the_pipeline() -> None:
    rank = {stage: i for i, stage in enumerate(STAGES)}
    upward = [
        f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} imports {target} "
        f"({stage_of(m)} may not use the later stage {stage_of(target)})"
        for m in MODULES
        for target, line in imports_of(m)
        if rank[stage_of(target)] > rank[stage_of(m)]
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    cycles = _cycles(GRAPH)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        pytest.param({"a": ["b"], "b": ["a"]}, [["a", "b"]], id="two-module-cycle"),
        pytest.param({"a": ["b"], "b": ["c"], "c": []}, [], id="chain"),
    ],
)
def test_cycle_finder_finds_cycles(graph: dict[str, list[str]], expected: list) -> None:
    assert _cycles(graph) == expected


def test_import_resolution_sees_imports_inside_functions() -> None:
    """The old rules/rulefile cycle hid behind an import inside a function: it must count."""
    cli_targets = {target for target, _ in imports_of("gateway.cli.serve")}
    assert "gateway.runtime.service" in cli_targets  # imported lazily inside serve.run
