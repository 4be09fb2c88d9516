"""Early exits on a parent's trunk, read from a tree TOML and checked before any work.

`[parent] exits = ["block5", "block10"]` adds one exit a tap, named "exit-<tap>", over the parent's classes;
`exit = true` makes a branch of the parent an exit (its own classes, hidden layers, pool). `[parent.cascade]`
says how they answer together (branching.tree.cascade): `risk` (with `delta`) or `budget` (MFLOPs).
"""

from __future__ import annotations

from typing import Any

from branching.config.table import Table
from branching.config.tree import CASCADE_KEYS, DEFAULT_DELTA, CascadeSpec
from branching.errors import ConfigError, past_or_close
from branching.models.kinds import get_kind

EXIT_PREFIX = "exit-"


def exit_tables(origin: str, parent: Any, node: dict) -> dict[str, dict]:
    """The branch tables that [parent] exits = [...] stands for: {"exit-<tap>": {classes, layer, exit}}; `node` is
    the parsed parent (its kind, shape and classes)."""
    if not isinstance(parent, dict) or "exits" not in parent:
        return {}
    taps = parent["exits"]
    check_kind(origin, {"parent": node, "exit": {"exit": True}}, parent)
    kind, shape = get_kind(node["kind"]), dict(node["shape"])
    names = [name for name, _ in kind.tap_widths(shape)]
    if not isinstance(taps, list) or not taps or not all(isinstance(t, str) and t for t in taps):
        raise ConfigError(f"{origin}: [parent] exits: must be a list of one or more of the parent's tap names; write "
                          f"e.g. exits = [{', '.join(repr(n).replace(chr(39), chr(34)) for n in names[2:5:2])}]")
    unknown = next((t for t in taps if t not in names), None)
    if unknown is not None:
        raise ConfigError(f"{origin}: [parent] exits: {unknown!r} is not a tap of the parent{past_or_close(unknown, names)}; "
                          f"its taps are {', '.join(names)}")
    if not kind.has_head(shape):
        raise ConfigError(f"{origin}: [parent] exits: the parent's head answers what no exit does, and this parent "
                          f"has none; give the parent classes")
    tables = {}
    for tap in taps:
        if f"{EXIT_PREFIX}{tap}" in tables:
            raise ConfigError(f"{origin}: [parent] exits: {tap!r} is named twice; an exit a tap")
        tables[f"{EXIT_PREFIX}{tap}"] = {"classes": list(parent.get("classes") or []), "layer": tap, "exit": True}
    return tables


def check_kind(origin: str, nodes: dict, parent_data: dict) -> None:
    """Exits need a parent whose frozen trunk runs tap by tap (before their taps are looked up)."""
    exits = [name for name, node in nodes.items() if node.get("exit")]
    kind = get_kind(nodes["parent"]["kind"])
    if exits and not kind.staged:
        first = "[parent] exits:" if "exits" in parent_data else f"[branches.{exits[0]}] exit:"
        raise ConfigError(f"{origin}: {first} exits need a frozen trunk that runs tap by tap, which the parent "
                          f"(kind {kind.name}) is not; use kind = \"pretrained\" or \"text\", or remove the exits")


def check_exits(origin: str, nodes: dict, parent_data: dict) -> CascadeSpec | None:
    """The exits of a tree whose taps are resolved (nodes: the parsed fields by name), and its [parent.cascade]."""
    exits = {name: node for name, node in nodes.items() if node.get("exit")}
    if not exits:
        if "cascade" in parent_data:
            raise ConfigError(f"{origin}: [parent.cascade] is for a parent with exits; add [parent] exits = [...] "
                              f"or remove it")
        return None
    parent = nodes["parent"]
    kind, shape = get_kind(parent["kind"]), dict(parent["shape"])
    first = f"[branches.{next(iter(exits))}]" if "exits" not in parent_data else "[parent] exits:"
    if not kind.has_head(shape):
        raise ConfigError(f"{origin}: {first} the parent's head answers what no exit does, and this parent has "
                          f"none; give the parent classes")
    head = shape["head_layer"]
    names = [name for name, _ in kind.tap_widths(shape)]
    at: dict[int, str] = {}
    listed = {f"{EXIT_PREFIX}{t}" for t in parent_data.get("exits") or ()}  # given by [parent] exits = [...]
    for name, node in exits.items():
        table = "[parent] exits:" if name in listed else f"[branches.{name}]"
        key = (lambda k: "") if name in listed else (lambda k: f" {k}:")
        if node["source"] != "parent":
            raise ConfigError(f"{origin}: {table} exit: an exit is on the parent's trunk, and this branch reads "
                              f"{node['source']!r}; remove `from` (an exit reads the parent), or remove exit = true")
        if node["new_classes"]:
            raise ConfigError(f"{origin}: {table} exit: an exit answers with the parent's classes; remove new_classes")
        if node["selfeval"] is not None:
            raise ConfigError(f"{origin}: {table} selfeval: an exit's confidence is fitted with the cascade's; "
                              f"remove [{table[1:-1]}.selfeval]")
        if node["layer"] >= head:
            raise ConfigError(f"{origin}: {table}{key('layer')} {names[node['layer']]} is at or after the tap of the "
                              f"parent's head ({names[head]}); an exit answers before the head: choose an earlier tap")
        if node["layer"] in at:
            raise ConfigError(f"{origin}: {table}{key('layer')} {names[node['layer']]} holds exit "
                              f"{at[node['layer']]!r} already; keep one exit a tap")
        at[node["layer"]] = name
    for name, node in nodes.items():  # a branch below an exit answers with it, before the trunk runs deeper
        if name == "parent" or node.get("exit") or not _below(nodes, name, exits):
            continue
        if node["new_classes"]:
            raise ConfigError(f"{origin}: [branches.{name}] new_classes: {name!r} is below an exit, which answers with "
                              f"the parent's classes; remove new_classes, or hang the branch from another node")
        if node["selfeval"] is not None:
            raise ConfigError(f"{origin}: [branches.{name}.selfeval]: {name!r} is below an exit, which answers before "
                              f"the trunk's deeper taps that a judge reads are computed; remove [branches.{name}.selfeval]")
    return _cascade(origin, parent_data.get("cascade"))


def _below(nodes: dict, name: str, exits: dict) -> bool:
    """Whether branch `name` hangs from an exit (through any branches between)."""
    seen = set()
    while name in nodes and name != "parent" and name not in seen:
        seen.add(name)
        name = nodes[name].get("source")
        if name in exits:
            return True
    return False


def _cascade(origin: str, data: Any) -> CascadeSpec:
    fix = "write risk = 0.05 (the error allowed on what the cascade answers) or budget = 300 (mean MFLOPs an input)"
    if data is None:
        raise ConfigError(f"{origin}: [parent] exits need a [parent.cascade] table; {fix}")
    t = Table(origin, "parent.cascade", data, CASCADE_KEYS)
    if ("risk" in t.data) == ("budget" in t.data):
        raise t.line(f"give one of risk and budget; {fix}")
    if "budget" in t.data:
        if "delta" in t.data:
            raise t.error("delta", "belongs to risk", "remove it, or give risk in place of budget")
        return CascadeSpec(budget=t.number("budget", 0, float("inf"), lo_open=True, hi_open=True))
    return CascadeSpec(risk=t.number("risk", 0, 1, lo_open=True, hi_open=True),
                       delta=t.number("delta", 0, 1, True, True, DEFAULT_DELTA))
