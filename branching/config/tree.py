"""The tree configuration: its nodes (NodeSpec), how each accepts (Acceptance), self-evaluation
(SelfEvalSpec), and TOML written back (dump_toml). Read and validated by branching.config.parse.

The order of a node's `classes` is the one source of truth for its label ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from branching.errors import ConfigError, did_you_mean
from branching.models import nets
from branching.models.kinds import ParentKind, config_keys, get_kind


def _installed(name: str) -> Path:
    """A config of configs/: beside the package in a source checkout, inside it once installed."""
    checkout = Path(__file__).resolve().parents[2] / "configs" / name
    return checkout if checkout.is_file() else Path(__file__).resolve().parents[1] / "configs" / name


DEFAULT_CONFIG = _installed("original.toml")

DEFAULT_PARENT_HIDDEN = (1024, 512)
DEFAULT_BRANCH_HIDDEN = (256,)
DEFAULT_DELTA = 0.05
BRANCH_NAME = re.compile(r"[A-Za-z0-9_-]+")

TOP_KEYS = ("data", "parent", "branches")
DATA_KEYS = ("image_size",)
IMAGE_SIZES = (8, 1024)  # the range of [data] image_size
def parent_keys() -> tuple[str, ...]:
    """The keys of every parent, then those of each registered kind (branching.models.kinds lists them)."""
    return ("classes", "kind", "hidden", "activation", *config_keys(), "dropout", "accept", "selfeval", "exits",
            "cascade")
BRANCH_KEYS = ("classes", "new_classes", "from", "layer", "hidden", "where", "pool", "activation", "dropout", "accept",
               "selfeval", "exit")
CASCADE_KEYS = ("risk", "delta", "budget")
ACCEPT_KEYS = ("rule", "threshold", "coverage", "risk", "delta", "calibrate", "temperature", "score")
RULE_KEYS = {"threshold": ("threshold",), "coverage": ("coverage",), "risk": ("risk", "delta")}


@dataclass(frozen=True)
class Acceptance:
    """How a node's predictions are accepted; None means the training recipe decides."""

    rule: str = "threshold"
    threshold: float | None = None
    coverage: float | None = None
    risk: float | None = None
    delta: float | None = None
    calibrate: bool | None = None
    temperature: float | None = None
    score: str = "msp"              # the confidence the rule thresholds (branching.confidence.SCORES)


@dataclass(frozen=True)
class NodeSpec:
    """One model of the tree: the parent (`name == "parent"`) or a branch."""

    name: str
    classes: tuple[str, ...]
    hidden: tuple[int, ...]
    source: str | None
    layer: int | None
    where: str | None
    activation: str
    dropout: float | None
    accept: Acceptance
    kind: str = "mlp"              # the parent's kind (branching.models.kinds); branches are MLPs
    shape: tuple = ()              # the kind's shape keys, as (key, value) pairs
    pool: str | None = None        # how a branch turns its tap into a vector (None: the tap's default)
    new_classes: bool = False      # a branch with classes its source never trained on (a standalone specialist)
    selfeval: SelfEvalSpec | None = None  # the self-evaluation branch that judges this node, if declared
    exit: bool = False             # an early exit on the parent's trunk (answers before the trunk goes on)

    @property
    def shape_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.shape}

    @property
    def net_kind(self) -> ParentKind:
        """The registered kind of this node's network (branching.models.kinds)."""
        return get_kind(self.kind)

    def taps(self, side: int = nets.SIDE) -> list[dict]:
        """The points a branch can read this node at on images of `side` pixels (its model's feature_info,
        without building it; an encoded parent's every tap until those read are known, then as deep as they
        go)."""
        return self.net_kind.taps(self.shape_dict, side, len(self.classes), self.hidden, self.dropout)

    def class_index(self, name: str) -> int:
        """Label id of class `name` in this node."""
        if name not in self.classes:
            raise ConfigError(f"unknown class {name!r} for node {self.name!r}{did_you_mean(name, self.classes)}; "
                              f"known: {', '.join(self.classes)}")
        return self.classes.index(name)


@dataclass(frozen=True)
class CascadeSpec:
    """How a parent's exits are fitted together ([parent.cascade]): at most `risk` error on what the cascade
    answers, with probability at least 1 - `delta`; or, with `budget`, the most accurate cascade within a mean of
    that many MFLOPs an input."""

    risk: float | None = None
    delta: float = DEFAULT_DELTA
    budget: float | None = None

    def to_dict(self) -> dict:
        return {"risk": self.risk, "delta": self.delta} if self.budget is None else {"budget": self.budget}


@dataclass
class TreeConfig:
    """The parent and its branches (in file order), the file they came from, the side of the square
    images the tree reads ([data] image_size; None: 32, CIFAR's), and how its exits answer (if it has exits)."""

    parent: NodeSpec
    branches: dict[str, NodeSpec]
    path: str | None = None
    image_size: int | None = None
    cascade: CascadeSpec | None = None

    def exits(self) -> list[NodeSpec]:
        """The early exits on the parent's trunk, shallowest first (the parent's head answers after them)."""
        return sorted((b for b in self.branches.values() if b.exit), key=lambda b: b.layer)

    @property
    def side(self) -> int:
        """The side of the images the tree's data are decoded at: [data] image_size, or the parent's kind's own
        (a pretrained network's input size), or 32."""
        return self.image_size or self.parent.net_kind.side(self.parent.shape_dict, None) or nets.SIDE

    @property
    def input_width(self) -> int:
        """The parent's input: 3 * side * side numbers per image (an encoded parent's: its vectors' width)."""
        return self.parent.net_kind.input_width(self.parent.shape_dict, self.side)

    def node(self, name: str) -> NodeSpec:
        """The parent or the branch called `name`."""
        if name == "parent":
            return self.parent
        if name not in self.branches:
            known = ["parent", *self.branches]
            raise ConfigError(f"{self.path or '<config>'}: unknown node {name!r}{did_you_mean(name, known)}; "
                              f"known: {', '.join(known)}")
        return self.branches[name]

    def nodes(self) -> list[NodeSpec]:
        """Parent first, then branches with every source before its readers, else file order."""
        done, ordered, pending = {"parent"}, [self.parent], list(self.branches.values())
        while pending:
            ready = next((b for b in pending if b.source in done), None)
            if ready is None:
                raise ConfigError(f"{self.path or '<config>'}: branches "
                                  f"{', '.join(b.name for b in pending)} form a cycle or read an "
                                  f"unknown node; fix their 'from' keys")
            pending.remove(ready)
            done.add(ready.name)
            ordered.append(ready)
        return ordered

    def children(self, name: str) -> list[NodeSpec]:
        """Branches that read node `name` directly (the exits, which answer before the parent, are none of them)."""
        self.node(name)
        return [n for n in self.nodes() if n.source == name and not n.exit]

    def chain(self, name: str) -> list[str]:
        """Names from the parent down to `name`: ["parent", ..., name]."""
        names = [self.node(name).name]
        while names[0] != "parent":
            names.insert(0, self.node(names[0]).source)
        return names

    def standalone(self, name: str) -> bool:
        """Whether node `name` or a node on its chain has classes its source never trained on: routing
        cannot send an image there by probability mass, so it answers only when asked by name."""
        return any(self.node(n).new_classes for n in self.chain(name))

    def exit_of(self, name: str) -> str | None:
        """The exit on node `name`'s chain (the exit itself, or the one a branch below an exit hangs from), or None."""
        return next((n for n in self.chain(name) if n != "parent" and self.branches[n].exit), None)

    def routed(self, entry: str | None = None) -> TreeConfig:
        """The tree that routing walks: every node but the standalone ones (see `standalone`), except those
        at or below `entry`, the branch that routing starts from when asked to, and but the exits and the branches
        below them (which answer before the parent's head: branching.tree.cascade), except the subtree of the exit
        that `entry` is in or is."""
        above = set(self.chain(entry)) if entry is not None and entry in self.branches else set()
        inside = self.exit_of(entry) if entry is not None and entry in self.branches else None
        kept = {n: b for n, b in self.branches.items()
                if self.exit_of(n) in (None, inside) and (not self.standalone(n) or entry in self.chain(n) or n in above)}
        if len(kept) == len(self.branches):
            return self
        exits = any(b.exit for b in kept.values())  # none: the cascade has nothing to answer with
        return TreeConfig(self.parent, kept, self.path, self.image_size, self.cascade if exits else None)

    def without_exits(self) -> TreeConfig:
        """The same tree without its exits and the branches below them (nor their cascade)."""
        kept = {n: b for n, b in self.branches.items() if self.exit_of(n) is None}
        return TreeConfig(self.parent, kept, self.path, self.image_size, None)

    def reading_every_tap(self) -> TreeConfig:
        """The same tree with an encoded parent encoding every tap (probe-layers and compare read them all); other
        trees as they are."""
        if not self.parent.net_kind.encoded:
            return self
        shape = self.parent.net_kind.every_tap(self.parent.shape_dict)
        return TreeConfig(replace(self.parent, shape=tuple((k, tuple(v) if isinstance(v, list) else v)
                                                           for k, v in shape.items())),
                          self.branches, self.path, self.image_size, self.cascade)

    def classes(self) -> tuple[str, ...]:
        """Every class of the tree: the parent's, then the new classes of its branches, in file order."""
        return tuple(dict.fromkeys(c for spec in (self.parent, *self.branches.values()) for c in spec.classes))

    def depth(self, name: str) -> int:
        """0 for the parent, 1 for its branches, and so on."""
        return len(self.chain(name)) - 1

    def to_dict(self) -> dict:
        """JSON-serialisable dict in the TOML schema (None values left out) plus `path`."""
        data = {} if self.image_size is None else {"data": {"image_size": self.image_size}}
        cascade = {} if self.cascade is None else {"cascade": self.cascade.to_dict()}
        return {**data, "parent": {**node_to_dict(self.parent), **cascade},
                "branches": {n: node_to_dict(b) for n, b in self.branches.items()},
                "path": self.path}


SELFEVAL_KEYS = ("layer", "layers", "where", "pool", "hidden", "activation", "dropout", "logits", "folds")
DEFAULT_SELFEVAL_HIDDEN = (64,)
DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class SelfEvalSpec:
    """A small MLP that predicts whether its node's answer is right. It reads taps of what the node reads
    (the parent's own taps for the parent, its source's for a branch), concatenated, plus the node's
    logits (`logits`), and learns from `folds`-fold cross-fitted correctness (branching.selfeval)."""

    layers: tuple                  # indices into the taps (resolved; strings until _resolve_selfeval)
    where: str | None = None       # MLP taps: before or after the activation (None: the recipe's)
    pool: str | None = None
    hidden: tuple[int, ...] = DEFAULT_SELFEVAL_HIDDEN
    activation: str = "relu"
    dropout: float | None = None
    logits: bool = True
    folds: int = DEFAULT_FOLDS

    def to_dict(self) -> dict:
        d = {"layers": list(self.layers), "where": self.where, "pool": self.pool, "hidden": list(self.hidden),
             "activation": self.activation, "dropout": self.dropout, "logits": self.logits, "folds": self.folds}
        return {k: v for k, v in d.items() if v is not None}


def dump_toml(config: TreeConfig) -> str:
    """TOML text that loads back to a config equal to `config` (apart from `path`)."""
    d = config.to_dict()
    lines = ["# Neural Branching tree (written by branching.config.dump_toml)"]
    if "data" in d:
        _write_table(lines, "data", d["data"])
    _write_table(lines, "parent", d["parent"])
    for name, branch in d["branches"].items():
        _write_table(lines, f"branches.{name}", branch)
    return "\n".join(lines) + "\n"


def node_to_dict(node: NodeSpec) -> dict:
    kind = node.net_kind
    d: dict[str, Any] = kind.config_dict(node.shape_dict, node.classes, node.hidden)  # the kind's own keys
    if node.source is not None:
        d = {"classes": d.pop("classes"), "from": node.source, "layer": node.layer, **d}
    if node.new_classes:
        d["new_classes"] = True
    if node.exit:
        d["exit"] = True
    extra = {"where": node.where, "pool": node.pool,
             "activation": node.activation if kind.hidden_default is not None else None, "dropout": node.dropout}
    d.update({k: v for k, v in extra.items() if v is not None})
    if node.accept != Acceptance():
        d["accept"] = {k: v for k, v in vars(node.accept).items() if v is not None and (k, v) != ("score", "msp")}
    if node.selfeval is not None:
        d["selfeval"] = node.selfeval.to_dict()
    return d


def toml_value(value: Any) -> str:
    """A value as TOML writes it: a string quoted, with quotes, backslashes and control characters escaped (a
    name from a user's folder can inject no key); any other Unicode written as it is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    escaped = "".join(
        "\\" + ch if ch in '"\\' else f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch
        for ch in str(value))
    return f'"{escaped}"'


def _write_table(lines: list[str], header: str, table: dict) -> None:
    lines += ["", f"[{header}]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for key, sub in table.items():
        if isinstance(sub, dict):
            _write_table(lines, f"{header}.{key}", sub)


# --- self-evaluation branches ([parent.selfeval], [branches.NAME.selfeval]) ---------------------
