"""The package's layout: no module imports, directly or through others, a module that imports it back."""

import ast
from pathlib import Path

from reference import REPO_ROOT

PACKAGE = "branching"


def imports_of(path: Path, name: str) -> set[str]:
    """Project modules that a module imports anywhere (top level or inside functions)."""
    package = name.rsplit(".", 1)[0] if "." in name else ""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def project_graph() -> dict[str, set[str]]:
    paths = {"torchly": REPO_ROOT / "torchly.py"}
    paths.update({f"{PACKAGE}.{p.stem}": p for p in (REPO_ROOT / PACKAGE).glob("*.py") if p.stem != "__init__"})
    return {name: {m for m in imports_of(path, name) if m in paths and m != name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_one_that_imports_it_back():
    graph = project_graph()
    assert "branching.pipeline" in graph and "torchly" in graph["branching.pipeline"]
    assert cycles(graph) == []
