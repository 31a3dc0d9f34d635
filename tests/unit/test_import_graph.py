"""The runtime packages' import graph: no cycles, and arrows only point down the layers.

Every `import` counts, those inside functions too: a lazy import hides a cycle from the
interpreter, not from the reader. Only imports under `if TYPE_CHECKING:` are left out: they
name a type for the checker and are never executed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = {"senseflow": 0, "receiver": 1, "workers": 1, "shared": 2}
"""A package may import its own layer's modules and those of lower layers (larger numbers);
receiver and workers never import each other."""


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_modules() -> dict[str, Path]:
    return {
        module_name(path): path for package in LAYERS for path in (REPO / package).rglob("*.py")
    }


def executed_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            yield from (n for branch in node.orelse for n in (branch, *executed_nodes(branch)))
            continue
        yield node
        yield from executed_nodes(node)


def imported_names(path: Path, name: str) -> Iterator[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in executed_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph() -> dict[str, set[str]]:
    modules = runtime_modules()
    return {
        name: {target for target in imported_names(path, name) if target in modules} - {name}
        for name, path in modules.items()
    }


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module are the cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_runtime_packages_have_no_import_cycle() -> None:
    assert strongly_connected(import_graph()) == []


def test_imports_point_down_the_layers_only() -> None:
    upward = []
    for name, targets in import_graph().items():
        own = name.partition(".")[0]
        for target in targets:
            other = target.partition(".")[0]
            if other != own and LAYERS[other] <= LAYERS[own]:
                upward.append(f"{name} -> {target}")
    assert sorted(upward) == []


def test_imports_for_the_type_checker_only_are_left_out() -> None:
    tree = ast.parse("if TYPE_CHECKING:\n    import a\nelse:\n    import b\nimport c\n")
    names = [n.names[0].name for n in executed_nodes(tree) if isinstance(n, ast.Import)]
    assert names == ["b", "c"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
