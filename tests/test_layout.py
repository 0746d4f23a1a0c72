"""The package layout: one import root, no second copy of any module, no import cycles."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

from support import repo_root


def test_the_repository_root_is_not_on_the_import_path() -> None:
    root = str(repo_root())
    assert root not in sys.path and "" not in sys.path
    assert importlib.util.find_spec("agent") is None
    assert importlib.util.find_spec("cli") is None


def _module_files() -> dict[str, Path]:
    """infertap.* module name -> source file, from the folders the import root links to."""
    root = repo_root()
    out: dict[str, Path] = {}
    for folder in ("agent", "cli"):
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(["infertap", *parts])] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the infertap modules it imports, anywhere in it: top level, inside functions,
    and under `if TYPE_CHECKING:` (a cycle hidden there is still a cycle in the design)."""
    files = _module_files()

    def known(name: str) -> str | None:
        while name and name not in files:  # `from pkg import name` where name is not a module
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for name in names:
                target = known(name) if name.startswith("infertap.") else None
                if target is not None and target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_reads_every_kind_of_import() -> None:
    graph = import_graph()
    # A top-level import, and the function-level one runtime.py makes of the API server.
    assert "infertap.agent.pipeline" in graph["infertap.agent.runtime"]
    assert "infertap.agent.api.server" in graph["infertap.agent.runtime"]
    assert len(graph) > 100


def test_no_import_cycle_among_infertap_modules() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
