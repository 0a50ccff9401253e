"""The package's import graph, read from the source, has no cycle: every module has one job and a place
below or above the others (module-level and function-level imports both count)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prunekit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The prunekit modules ``path`` imports (``from . import x`` names a module when ``x`` is one)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("prunekit")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("prunekit"):
                continue
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}
    return {m for m in found if m in modules and m not in (name, "prunekit")}  # the root runs first anyway


def graph() -> dict[str, set[str]]:
    """Module -> modules it imports. Importing ``a.b.c`` runs ``a.b``'s ``__init__`` first, so it depends on
    ``a.b`` too, unless the importer lives inside ``a.b`` (whose ``__init__`` is then already running)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    edges = {}
    for path in paths:
        name = module_name(path)
        own = set(ancestors(name)) | {name}
        targets = imports(path, modules)
        edges[name] = targets | {a for t in targets for a in ancestors(t) if a not in own and a != "prunekit"}
    return edges


def ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_has_no_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_engine_does_not_depend_on_front_ends():
    """The flow runs one way: the engine never imports the API, CLI, commands, recipes or structured methods."""
    edges = graph()
    below = {
        "prunekit.api",
        "prunekit.cli",
        "prunekit.commands",
        "prunekit.recipe",
        "prunekit.lightning",
        "prunekit.structured",
    }
    assert not edges["prunekit.engine"] & below
    assert "prunekit.engine" not in edges["prunekit.structured.common"]


def test_importing_prunekit_changes_no_process_wide_setting():
    """Issue 28 item 9: ``import prunekit`` set THP_MEM_ALLOC_ENABLE, effective only if torch had not allocated
    yet, so speed depended on import order; process-wide effects belong to the entry points (the CLI sets it)."""
    import os
    import subprocess
    import sys

    code = (
        "import os; before = dict(os.environ); import prunekit, prunekit.api, prunekit.kernels; "
        "print(sorted(set(os.environ.items()) ^ set(before.items())))"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    changed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert changed.stdout.strip() == "[]"
    from prunekit import cli

    assert cli.HUGE_PAGES == ("THP_MEM_ALLOC_ENABLE", "1")
