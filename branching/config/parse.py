"""Reading a tree TOML: every key checked, with a one-line error that names the file, the table and
the fix; taps resolved against the source node's feature_info."""

from __future__ import annotations

import difflib

import math
from pathlib import Path
from typing import Any

from branching.acceptance.confidence import PROBABILITY_SCORES, SCORES
from branching.acceptance.selective import RULES
from branching.config.tree import (ACCEPT_KEYS, BRANCH_KEYS, BRANCH_NAME, DEFAULT_BRANCH_HIDDEN, DEFAULT_CONFIG,
                                   DEFAULT_DELTA, DEFAULT_FOLDS, DEFAULT_SELFEVAL_HIDDEN, DATA_KEYS, IMAGE_SIZES,
                                   RULE_KEYS, SELFEVAL_KEYS, TOP_KEYS, Acceptance, NodeSpec, SelfEvalSpec,
                                   TreeConfig, parent_keys)
from branching.config.exits import check_exits, check_kind, exit_tables
from branching.config.table import Table, is_int, one_line, parse_toml, show
from branching.errors import ConfigError, did_you_mean, past_or_close
from branching.models import nets
from branching.models.checks import declared_network
from branching.models.kinds import get_kind, kind_names, owners
from branching.models.nets import ACTIVATIONS, WHERE

def pool_names() -> tuple[str, ...]:
    """A branch's pool: a feature map's or token sequence's (branching.models.nets), or an encoded parent's."""
    return tuple(dict.fromkeys([*(p for ps in nets.POOLS.values() for p in ps),
                                *(w for k in kind_names() if get_kind(k).encoded for w in get_kind(k).wheres)]))


def load_config(path: str | Path) -> TreeConfig:
    """Read and validate a tree TOML file."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}; pass the path of an existing .toml file "
                          f"(e.g. {DEFAULT_CONFIG})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({one_line(e)}); "
                          f"pass a readable UTF-8 .toml file") from None
    return _build(_trusted(parse_toml(text, str(path))), origin=str(path), path=str(path))


def parse_config(text: str, origin: str = "<string>") -> TreeConfig:
    """Validate a tree TOML given as text; `origin` names it in error messages."""
    return _build(_trusted(parse_toml(text, origin)), origin=origin, path=None)


def _trusted(data: dict) -> dict:
    """A config the user passes may name a module parent's code (TreeConfig.from_dict, which reads what a
    model file records, may not: see module_parent.trust)."""
    parent = data.get("parent")
    if isinstance(parent, dict) and parent.get("kind") in kind_names():
        get_kind(parent["kind"]).trust(parent)
    return data


def config_from_dict(d: dict) -> TreeConfig:
    """Inverse of TreeConfig.to_dict; validates like `load_config`."""
    if not isinstance(d, dict):
        raise ConfigError(f"<dict>: expected a dict from TreeConfig.to_dict, got {type(d).__name__}")
    data = {k: v for k, v in d.items() if k != "path"}
    path = d.get("path")
    return _build(data, origin=path or "<dict>", path=path)



# --- parsing ---------------------------------------------------------------------------------

def _parse_accept(origin: str, name: str, data: Any) -> Acceptance:
    t = Table(origin, name, data, ACCEPT_KEYS)
    rule = t.choice("rule", RULES, "threshold")
    score = t.choice("score", SCORES, "msp")
    for key in t.data:
        owner = next((r for r, keys in RULE_KEYS.items() if key in keys), rule)
        if owner != rule:
            raise t.error(key, f"does not belong to rule {rule!r}", f'remove it or set rule = "{owner}"')
    if rule == "coverage":
        t.require("coverage", "write e.g. coverage = 0.9")
    if rule == "risk":
        t.require("risk", "write e.g. risk = 0.05")
    if t.data.get("calibrate") is True and "temperature" in t.data:
        raise t.error("temperature", "contradicts calibrate = true (a fixed temperature is not fitted)",
                      "remove one of the two")
    if score not in PROBABILITY_SCORES and rule == "threshold" and "threshold" not in t.data:
        raise t.error("threshold", f"is required with score {score!r}, which is not a probability",
                      'set threshold = <a value of that score>, or use rule = "coverage" or "risk"')
    probability = score in PROBABILITY_SCORES  # other scores are any real number
    return Acceptance(
        rule=rule, score=score,
        threshold=(t.number("threshold", 0, 1, lo_open=True, hi_open=False) if probability
                   else t.number("threshold", -math.inf, math.inf, lo_open=True, hi_open=True)),
        coverage=t.number("coverage", 0, 1, lo_open=True, hi_open=False),
        risk=t.number("risk", 0, 1, lo_open=True, hi_open=True),
        delta=t.number("delta", 0, 1, True, True, DEFAULT_DELTA) if rule == "risk" else None,
        calibrate=t.flag("calibrate"),
        temperature=t.number("temperature", 0, math.inf, lo_open=True, hi_open=True))


def _parse_node(origin: str, name: str, data: Any, image_size: int | None = None) -> dict:
    """Fields of one node checked on their own; `layer` is still raw and `source` unchecked."""
    is_parent = name == "parent"
    table = "parent" if is_parent else f"branches.{name}"
    t = Table(origin, table, data, parent_keys() if is_parent else BRANCH_KEYS)
    kind = get_kind(t.choice("kind", kind_names(), "mlp") if is_parent else "mlp")
    for key in t.data if is_parent else ():
        found = owners(key)
        if found and kind.name not in found:
            named = " and ".join(filter(None, [", ".join(found[:-1]), found[-1]]))
            raise t.error(key, f"is a key of {named} parents, not of {kind.name} ones",
                          f"remove it, or set kind = \"{found[0]}\"")
    default = kind.hidden_default if is_parent else DEFAULT_BRANCH_HIDDEN
    scored = t.data.get("accept")
    if t.data.get("exit") is True and isinstance(scored, dict) and scored.get("score", "msp") != "msp":
        raise ConfigError(f"{origin}: [{table}.accept] score: the cascade's threshold reads an exit's calibrated max "
                          f"softmax, not {scored['score']!r}; remove score")
    fields = dict(
        name=name, classes=() if kind.encoded and "classes" not in t.data else t.classes(),
        hidden=() if default is None else t.hidden(default, allow_empty=not is_parent or not default),
        source=None, layer=None, where=None,
        activation=t.choice("activation", tuple(ACTIVATIONS), "relu"),
        dropout=t.number("dropout", 0, 1, lo_open=False, hi_open=True),
        accept=_parse_accept(origin, f"{table}.accept", t.data.get("accept", {})), kind=kind.name,
        selfeval=_parse_selfeval(origin, table, t.data.get("selfeval")))
    if fields["accept"].score == "selfeval" and fields["selfeval"] is None:
        raise ConfigError(f"{origin}: [{table}.accept] score = \"selfeval\" needs a self-evaluation branch; add a "
                          f"[{table}.selfeval] table (e.g. layer = -1, hidden = [64]) or choose another score")
    if is_parent:
        shape = kind.parse(t, fields["classes"], image_size, fields["hidden"], fields["activation"])
        for key in ("accept", "selfeval"):
            if key in t.data and not kind.has_head(shape):
                raise t.error(key, f"needs the parent's head, which this {kind.name} parent does not have",
                              f"remove [parent.{key}], or {kind.head_fix}")
        fields["shape"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in shape.items())
    if not is_parent:
        source = t.data.get("from", "parent")
        if not isinstance(source, str):
            raise t.error("from", "must be a node name", 'write from = "parent" or another branch name')
        layer = t.data.get("layer", -1)
        if not (is_int(layer) or isinstance(layer, str)):
            raise t.error("layer", "must be an integer index into the source's taps or a tap's name",
                          "write e.g. layer = 1, layer = -1 or layer = \"stage2\"")
        fields.update(source=source, layer=layer, where=t.choice("where", WHERE, None), new_classes=bool(t.flag("new_classes")),
                      pool=t.choice("pool", pool_names(), None), exit=bool(t.flag("exit")))
    return fields


def _build(data: dict, origin: str, path: str | None) -> TreeConfig:
    top = Table(origin, "top level", data, TOP_KEYS)
    if "parent" not in top.data:
        raise ConfigError(f"{origin}: missing [parent] table; add [parent] with classes = [...]")
    image_size = _parse_data(origin, top.data.get("data", {}))
    nodes = {"parent": _parse_node(origin, "parent", top.data["parent"], image_size)}
    kind = get_kind(nodes["parent"]["kind"])
    side = image_size or kind.side(dict(nodes["parent"]["shape"]), image_size) or nets.SIDE
    raw = top.data.get("branches", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: 'branches' must be a table of tables, got {show(raw)}; "
                          f"write each branch as a [branches.NAME] section")
    for name, table in exit_tables(origin, top.data["parent"], nodes["parent"]).items():  # [parent] exits = [...]
        if name in raw:
            raise ConfigError(f"{origin}: [branches.{name}] has the name of the exit [parent] exits gives; rename it")
        raw = {**raw, name: table}
    for name, spec in raw.items():
        if not BRANCH_NAME.fullmatch(name) or name == "parent":
            raise ConfigError(f"{origin}: invalid branch name {name!r} in [branches]; use letters, "
                              f"digits, '_' or '-' only, and not 'parent'")
        nodes[name] = _parse_node(origin, name, spec)
    if kind.reads != "images" and image_size is not None:
        raise ConfigError(f"{origin}: [data] image_size is for images, and a {kind.name} parent reads {kind.reads}; "
                          f"remove it")
    if kind.encoded and not nodes["parent"]["classes"]:  # no head: the tree's classes are its branches'
        nodes["parent"]["classes"] = tuple(dict.fromkeys(c for n in list(nodes.values())[1:] for c in n["classes"]
                                                         if n["source"] == "parent"))
        if len(nodes["parent"]["classes"]) < 2:
            raise ConfigError(f"{origin}: [parent] a {kind.name} parent without classes needs branches reading it, "
                              f"with 2 classes or more in all; add [branches.NAME] tables, or give the parent classes")
    for name, node in nodes.items():
        if name != "parent" and node["source"] not in nodes:
            raise ConfigError(f"{origin}: [branches.{name}] from: unknown node {node['source']!r}"
                              f"{did_you_mean(node['source'], [n for n in nodes if n != name])}; use one of: "
                              f"{', '.join(n for n in nodes if n != name)}")
    for name in nodes:
        seen = [name]
        while seen[-1] != "parent":
            seen.append(nodes[seen[-1]]["source"])
            if seen[-1] in seen[:-1]:
                cycle = seen[seen.index(seen[-1]):]
                raise ConfigError(f"{origin}: branches form a cycle: {' -> '.join(cycle)}; "
                                  f"change 'from' of branch {cycle[0]!r} so the chain ends at parent")
    check_kind(origin, nodes, top.data["parent"])
    for name, node in list(nodes.items())[1:]:
        source = nodes[node["source"]]
        table = f"[branches.{name}]"
        _resolve_tap(origin, table, node, source, side)
        outside = [c for c in node["classes"] if c not in source["classes"]]
        if outside and not node["new_classes"]:
            close = difflib.get_close_matches(outside[0], source["classes"], n=1, cutoff=0.6)
            alike = (f" (the source has {close[0]!r}: spell the class alike in both tables, as the data names it)"
                     if close else "")
            raise ConfigError(f"{origin}: {table} classes: {', '.join(map(repr, outside))} not among "
                              f"the classes of source {source['name']!r}{alike}; use classes from: "
                              f"{', '.join(source['classes'])}, or set new_classes = true for a branch that learns "
                              f"classes its source never saw")
        if node["new_classes"] and not outside:
            raise ConfigError(f"{origin}: {table} new_classes: is true but every class is one of source "
                              f"{source['name']!r}'s; remove new_classes (or add the new classes)")
    cascade = check_exits(origin, nodes, top.data["parent"])
    for node in nodes.values():
        _resolve_selfeval(origin, node, nodes, side)
    if kind.encoded:
        _set_depth(nodes)
    for source in nodes:
        children = [(name, set(node["classes"])) for name, node in list(nodes.items())[1:]
                    if node["source"] == source and not node["new_classes"] and not node["exit"]]
        for i, (a, classes_a) in enumerate(children):
            for b, classes_b in children[i + 1:]:
                if classes_a & classes_b:
                    raise ConfigError(f"{origin}: [branches.{a}] and [branches.{b}] both read {source!r} and share "
                                      f"{', '.join(map(repr, sorted(classes_a & classes_b)))}; routing sends each image "
                                      f"to one child, so siblings must not share classes")
    for name, node in nodes.items():
        table = "[parent]" if name == "parent" else f"[branches.{name}]"
        spec = NodeSpec(**{k: v for k, v in node.items() if k != "width"})
        mlp = spec.net_kind.lists_layers
        width = spec.net_kind.input_width(spec.shape_dict, side) if name == "parent" else node["width"]
        try:  # built on torch's meta device: nothing is allocated
            declared_network(spec.kind, spec.net_kind.architecture(width, spec.hidden, len(spec.classes)),
                             shape=spec.shape_dict)
        except ValueError as e:
            fix = "" if mlp else "; change the shape keys or [data] image_size"
            raise ConfigError(f"{origin}: {table} {'hidden: ' if mlp else ''}{e}{fix}") from None
    for node in nodes.values():
        node.pop("width", None)
    specs = {name: NodeSpec(**fields) for name, fields in nodes.items()}
    parent = specs.pop("parent")
    return TreeConfig(parent=parent, branches=specs, path=path, image_size=image_size, cascade=cascade)


def _set_depth(nodes: dict) -> None:
    """An encoded parent's frozen network runs to the deepest tap read of it (its head's, its branches', the
    self-evaluation judges'): its shape's `depth` is that many taps."""
    shape = dict(nodes["parent"]["shape"])
    read = [shape["head_layer"]] if shape["head"] else []
    for name, node in nodes.items():
        if node.get("source") == "parent":
            read.append(node["layer"])
        judge = node.get("selfeval")
        if judge is not None and (node.get("source") or "parent") == "parent":
            read += list(judge.layers)
    shape["depth"] = max(read) + 1
    nodes["parent"]["shape"] = tuple(shape.items())


def _parse_data(origin: str, data: Any) -> int | None:
    """[data] image_size: the side of the square images the tree reads (None when not given: 32)."""
    t = Table(origin, "data", data, DATA_KEYS)
    size = t.data.get("image_size")
    if size is not None and not (is_int(size) and IMAGE_SIZES[0] <= size <= IMAGE_SIZES[1]):
        raise t.error("image_size", f"must be an integer in {IMAGE_SIZES[0]}..{IMAGE_SIZES[1]}",
                      "write e.g. image_size = 64 (pixels on a side), or leave it out (32, or a pretrained "
                      "network's own size)")
    return size


def _names(taps, n=12) -> str:
    names = [t["name"] for t in taps]
    more = f" (+{len(names) - n} more; branching probe-layers lists them)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _resolve_tap(origin: str, table: str, node: dict, source: dict, side: int) -> None:
    """A branch's layer as an index into its source's taps (an MLP source: a hidden layer, read "pre" or
    "post"), checked with its pool; node["width"] is the width the branch reads."""
    spec = NodeSpec(**{k: v for k, v in source.items() if k != "width"})
    taps = spec.taps(side)
    if spec.net_kind.encoded:
        return _resolve_encoded_tap(origin, table, node, spec, taps)
    layer, mlp = node["layer"], spec.net_kind.wheres == WHERE  # an MLP's taps: each layer before and after
    if not mlp and node["where"] is not None:
        raise ConfigError(f"{origin}: {table} where: is for branches of MLPs; {source['name']!r} is a "
                          f"{source['kind']} whose taps are {_names(taps)}; remove it")
    if isinstance(layer, str):
        found = [t for t in taps if t["name"] == layer]
        if not found:
            raise ConfigError(f"{origin}: {table} layer: {source['name']!r} has no tap {layer!r}; its taps are "
                              f"{_names(taps)}")
        if mlp and node["where"] not in (None, found[0]["where"]):
            raise ConfigError(f"{origin}: {table} where: contradicts layer {layer!r}; remove one of the two")
        node["layer"], node["where"] = found[0]["layer"], found[0]["where"] if mlp else None
    else:
        n = len(taps) // 2 if mlp else len(taps)
        if not -n <= layer < n:
            what = "hidden layer(s)" if mlp else f"taps ({', '.join(t['name'] for t in taps)})"
            valid = f"0..{n - 1} or -{n}..-1" if n else "none"
            raise ConfigError(f"{origin}: {table} layer: {layer} is out of range for {source['name']!r}, which has "
                              f"{n} {what} (valid: {valid}); pick a valid layer or another source")
        node["layer"] = layer % n
    tap = taps[2 * node["layer"] if mlp else node["layer"]]  # pre and post have the same width
    try:
        node["width"] = nets.pooled_width(tap["shape"], node["pool"] or nets.default_pool(tap["shape"]))
    except ValueError as e:
        raise ConfigError(f"{origin}: {table} pool: {e}") from None


def _resolve_encoded_tap(origin: str, table: str, node: dict, source: NodeSpec, taps: list[dict]) -> None:
    """A branch's layer as an index into an encoded parent's taps (a text parent's embeddings, layer0, ...; a
    pretrained network's stem, block0, ...), and its pool (the kind's pooling, over tokens or positions)
    checked."""
    kind = source.net_kind
    names = list(dict.fromkeys(t["name"] for t in taps))
    if node["where"] is not None:
        raise ConfigError(f"{origin}: {table} where: is for branches of MLPs; a {kind.name} parent's taps are "
                          f"{_names(taps[::len(kind.pools)])}, each pooled by pool = {' | '.join(kind.pools)}; "
                          f"remove it")
    layer = node["layer"]
    if isinstance(layer, str):
        if layer not in names:
            raise ConfigError(f"{origin}: {table} layer: the {kind.name} parent has no tap {layer!r}"
                              f"{past_or_close(layer, names)}; its taps are {', '.join(names)}")
        layer = names.index(layer)
    elif not -len(names) <= layer < len(names):
        raise ConfigError(f"{origin}: {table} layer: {layer} is past the {kind.name} parent's taps ({len(names)}: "
                          f"{names[0]} .. {names[-1]}); write an index in -{len(names)}..{len(names) - 1} or a name")
    pool = node["pool"] or kind.default_pool
    if pool not in kind.pools:
        raise ConfigError(f"{origin}: {table} pool: {pool!r} does not apply to a {kind.name} parent's taps; use one "
                          f"of {', '.join(kind.pools)}")
    layer %= len(names)
    node["layer"], node["pool"], node["width"] = layer, pool, taps[layer * len(kind.pools)]["shape"][0]


def _parse_selfeval(origin: str, table: str, data: Any) -> SelfEvalSpec | None:
    if data is None:
        return None
    t = Table(origin, f"{table}.selfeval", data, SELFEVAL_KEYS)
    if "layer" in t.data and "layers" in t.data:
        raise t.error("layers", "contradicts layer", "give one tap with layer = ... or several with layers = [...]")
    layers = t.data.get("layers", [t.data.get("layer", -1)])
    fix = 'write e.g. layer = -1, layers = [0, 1] or layers = ["stage1", "stage2"]'
    if not isinstance(layers, list) or not all(is_int(v) or isinstance(v, str) for v in layers):
        raise t.error("layers" if "layers" in t.data else "layer", "must be tap indices or names", fix)
    if not layers and t.flag("logits") is False:
        raise t.error("layers", "is empty and logits = false, so the judge would read nothing",
                      "list taps, or drop logits = false (layers = [] reads the logits only)")
    for key in ("where", "pool"):
        if not layers and key in t.data:
            raise t.error(key, "is for taps, and layers = [] reads none", f"remove {key}, or list taps in layers")
    folds = t.data.get("folds", DEFAULT_FOLDS)
    if not is_int(folds) or not 2 <= folds <= 20:
        raise t.error("folds", "must be an integer from 2 to 20", "write e.g. folds = 5")
    return SelfEvalSpec(layers=tuple(layers), where=t.choice("where", WHERE, None),
                        pool=t.choice("pool", pool_names(), None),
                        hidden=t.hidden(DEFAULT_SELFEVAL_HIDDEN, allow_empty=True),
                        activation=t.choice("activation", tuple(ACTIVATIONS), "relu"),
                        dropout=t.number("dropout", 0, 1, lo_open=False, hi_open=True),
                        logits=bool(t.flag("logits") if t.flag("logits") is not None else True), folds=folds)


def _resolve_selfeval(origin: str, node: dict, nodes: dict, side: int) -> None:
    """A self-evaluation branch's layers as indices into the taps of what its node reads (its source's, or
    the parent's own for the parent), each checked as a branch's layer is."""
    spec = node.get("selfeval")
    if spec is None:
        return
    table = f"[{'parent' if node['name'] == 'parent' else 'branches.' + node['name']}.selfeval]"
    source = nodes[node["source"] or "parent"]
    layers, wheres = [], set()
    for layer in spec.layers:
        tap = {"layer": layer, "where": spec.where, "pool": spec.pool}
        _resolve_tap(origin, table, tap, source, side)
        layers.append(tap["layer"])
        wheres.add(tap["where"])
    if len(wheres) > 1:
        raise ConfigError(f"{origin}: {table} layers: name taps both before and after an activation; set where "
                          f"and give the layers as indices")
    if len(set(layers)) < len(layers):
        raise ConfigError(f"{origin}: {table} layers: lists a tap more than once; list each tap once")
    where = wheres.pop() if wheres else spec.where
    node["selfeval"] = SelfEvalSpec(**{**vars(spec), "layers": tuple(layers), "where": where})
