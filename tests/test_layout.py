"""The package's layout: no module imports, directly or through others, a module that imports it back; each
subpackage imports only those below it (the order its __init__ states); no module is past the size guide."""

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
            named = {f"{base}.{alias.name}" for alias in node.names}
            found |= named
            if not named <= MODULES:  # `from branching import distributed` imports that module, not the package's code
                found.add(base)
    return found


# lowest first: a subpackage may import those before it, never those after; "base" is the package's own
# top-level modules (errors, fileio, tables, console)
LAYERS = ("base", "models", "acceptance", "data", "config", "reports", "tree", "train", "studies", "api", "cli")
MAX_LINES = 400


def module_paths() -> dict[str, Path]:
    paths = {}
    for p in (REPO_ROOT / PACKAGE).rglob("*.py"):
        parts = p.relative_to(REPO_ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return paths


MODULES = set(module_paths())

def project_graph() -> dict[str, set[str]]:
    paths = {"torchly": REPO_ROOT / "torchly.py", **module_paths()}
    return {name: {m for m in imports_of(path, name) if m in paths and m != name} for name, path in paths.items()}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "base"


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
    assert "branching.train.run" in graph and "branching.tree.evaluation" in graph["branching.train.run"]
    assert cycles(graph) == []


def test_each_subpackage_imports_only_those_below_it():
    assert layer("branching.tree.routing") == "tree" and layer("branching.fileio") == "base"
    assert layer("branching.models") == "models"
    wrong = []
    for name, imported in project_graph().items():
        if not name.startswith(PACKAGE + ".") or name == "branching.__main__":
            continue
        for other in imported:
            if other.startswith(PACKAGE) and LAYERS.index(layer(other)) > LAYERS.index(layer(name)):
                wrong.append(f"{name} ({layer(name)}) imports {other} ({layer(other)})")
    assert wrong == []


def test_every_subpackage_says_what_lives_there_and_what_it_may_import():
    for name in LAYERS[1:]:
        doc = ast.get_docstring(ast.parse((REPO_ROOT / PACKAGE / name / "__init__.py").read_text()))
        assert doc and "Imports:" in doc, name
        allowed = doc.split("Imports:")[1]
        for higher in LAYERS[LAYERS.index(name) + 1:]:
            assert f" {higher}" not in allowed.replace("but cli", ""), (name, higher)


def test_no_module_is_past_the_size_guide():
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_paths().items()}
    assert len(sizes) > 40 and max(sizes.values()) <= MAX_LINES, max(sizes.items(), key=lambda kv: kv[1])
