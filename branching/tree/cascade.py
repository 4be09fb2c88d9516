"""Early exits: heads along a frozen trunk that answer before the trunk goes on, fitted together with a guarantee.

An exit (config: `[parent] exits`, or `exit = true` on a branch; branching.config.exits) is a branch of the parent
trained like any other, and branches may hang below it as below any node. An input is answered at the first exit
whose calibrated confidence (its max softmax at its own temperature, or with branches below it the mass of the
group it routes to) reaches the cascade's threshold and whose branches below accept it (a branch below that rejects
it sends it on along the trunk), one threshold shared by every exit as CALM shares one; the inputs no exit takes go
on through the trunk to the tree, which answers them as it would alone. The threshold comes from
a fixed grid, fitted on the parent's calibration rows (held out of every node's training and validation):

- `risk` r with `delta`: Learn-then-Test (Angelopoulos et al. 2021) with a Bonferroni correction: each setting's
  error on the inputs it answers gets a one-sided Clopper-Pearson bound at level delta / (settings tried); of
  those whose bound is at most r, the cheapest is chosen. With probability at least 1 - delta over the calibration
  inputs every setting so passed errs on at most r of what it answers, the chosen one among them, whether or not
  the error falls as the threshold rises (an exit can be better than the head: no order of the settings is safe
  to assume). When none passes, no exit answers and the reason names the lowest bound reached.
- `budget` C: the best accuracy (every input's answer, right or wrong) among the settings that cost at most C
  MFLOPs a calibration input on average.

Costs are FLOPs (2 a multiply-add) of the trunk to the tap each input stops at (a transformer's: for its own number
of tokens), plus every head it passed through (an exit's branches' too). The answers at any batch size are branching.tree.staged's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from branching.acceptance.selective import risk_upper_bound
from branching.errors import CheckpointError
from branching.fileio import write_json
from branching.tree.cost import counted
from branching.tree.routing import TreePredictions, TreePredictor

FILE = "cascade.json"
FORMAT = "branching-cascade/1"
# the thresholds tried, strictest first: none answers (inf), then 1 - 1e-4 down to 0.5
GRID = (float("inf"), *[float(1 - 10 ** e) for e in np.linspace(-4, np.log10(0.5), 40)])


@dataclass
class ExitOutputs:
    """Every exit's answer to every input, (exits, N) each: `gate`, the exit's own confidence (its calibrated max
    softmax, or the mass of the group it routes to), -inf where a branch below it rejects the input (which then goes
    on along the trunk); the answer's class (an index into the tree's classes), confidence, calibrated probabilities
    over the tree's classes (exits, N, classes), node (an index into `nodes`, the exits' subtrees' nodes, whose
    paths from their exit are `chains`), and `below`, the FLOPs of the branches below the exit the input ran
    through."""

    gate: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    probabilities: np.ndarray
    final: np.ndarray
    below: np.ndarray
    nodes: tuple = ()
    chains: tuple = ()

    @classmethod
    def empty(cls, k: int, n: int, classes: int, nodes: tuple = (), chains: tuple = ()) -> ExitOutputs:
        return cls(np.full((k, n), -np.inf), np.zeros((k, n), np.int64), np.zeros((k, n), np.float32),
                   np.zeros((k, n, classes), np.float32), np.zeros((k, n), np.int64), np.zeros((k, n)), nodes, chains)

    def only(self, j: int) -> ExitOutputs:
        """Exit j's outputs alone (its nodes' indices unchanged)."""
        pick = slice(j, j + 1)
        return ExitOutputs(self.gate[pick], self.predicted[pick], self.confidence[pick], self.probabilities[pick],
                           self.final[pick], self.below[pick], self.nodes, self.chains)

    def rows(self, rows) -> ExitOutputs:
        """The outputs of some inputs."""
        return ExitOutputs(self.gate[:, rows], self.predicted[:, rows], self.confidence[:, rows],
                           self.probabilities[:, rows], self.final[:, rows], self.below[:, rows], self.nodes, self.chains)


@dataclass
class Costs:
    """FLOPs of each input: answered at exit j (N, exits), or by the tree (N,: the full trunk and the heads on its
    path, without the exits'), and what an input the tree answers pays for passing every exit (N,: their heads and
    the branches below them it ran through), when they answer at all."""

    at_exit: np.ndarray
    full: np.ndarray
    heads: np.ndarray | float = 0.0


@dataclass
class Cascade:
    """A fitted cascade: its exits (shallowest first), the shared threshold (None: no exit answers), what was
    asked and how it was met, and every setting tried on the calibration inputs (`curve`)."""

    exits: tuple
    threshold: float | None
    mode: str                      # "risk" or "budget"
    asked: dict
    attained: bool
    reason: str | None
    bound: float | None            # risk: the chosen setting's upper bound
    samples: int
    curve: list = field(default_factory=list)
    fingerprints: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.mode == "risk":
            return f"risk <= {100 * self.asked['risk']:g}% with confidence {100 * (1 - self.asked['delta']):g}%"
        return f"budget {self.asked['budget']:g} MFLOPs an input"

    def save(self, models_dir) -> Path:
        path = Path(models_dir) / FILE
        write_json(path, {"format": FORMAT, **asdict(self), "exits": list(self.exits)})
        return path

    @classmethod
    def load(cls, models_dir, models: dict, spec=None) -> Cascade:
        """The cascade beside a tree's models, checked to have been fitted on exactly those models (every node: the
        tree's answers count in its fit) and, given a config.CascadeSpec, for what it asks."""
        path = Path(models_dir) / FILE
        fix = "train the tree again with `branching run`, or load it with exits=False (its full trunk)"
        if not path.is_file():
            raise CheckpointError(f"no {FILE} in {models_dir}, which a tree with exits needs; {fix}")
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict) or d.pop("format", None) != FORMAT or not isinstance(d.get("fingerprints"), dict):
                raise ValueError
            cascade = cls(**{**d, "exits": tuple(d["exits"])})
        except (ValueError, TypeError, KeyError, OSError):
            raise CheckpointError(f"{path} is not a cascade file of this version of branching; {fix}") from None
        for name in sorted(set(models) | set(cascade.fingerprints)):
            if name not in models or models[name].fingerprint() != cascade.fingerprints.get(name):
                raise CheckpointError(f"{path} was fitted on another {name!r} than the one in {models_dir}; {fix}")
        if spec is not None and spec.to_dict() != cascade.asked:
            raise CheckpointError(f"{path} was fitted for {cascade.asked}, and the config asks {spec.to_dict()}; {fix}")
        return cascade


@dataclass
class ExitRoute:
    """An exit and the branches below it: `predictor` routes from the exit (the tree of the parent, the exit and its
    subtree; the exit itself rejects nothing, the cascade's threshold decides where it answers), and `below[i]` is
    the FLOPs of the branches below the exit on node i's chain (its own layers' FLOPs counted once, here)."""

    predictor: TreePredictor
    below: np.ndarray

    @property
    def name(self) -> str:
        return self.predictor.entry.name


def exit_routes(config, models: dict, exits, device=None) -> list[ExitRoute]:
    """Each exit's ExitRoute, in the order of `exits`."""
    from branching.config.tree import TreeConfig
    found = []
    for name in exits:
        subtree = {n: b for n, b in config.branches.items() if config.exit_of(n) == name}
        alone = TreeConfig(config.parent, subtree, config.path, config.image_size, None)
        own = {n: models[n] for n in ("parent", *subtree)}
        predictor = TreePredictor(alone, own, name, **({} if device is None else {"device": device}))
        predictor.entry.threshold = -np.inf
        flops = {n: head_flops(own[n]) for n in subtree if n != name}
        below = np.array([sum(flops.get(c, 0) for c in chain) for chain in predictor.chains], dtype=np.float64)
        found.append(ExitRoute(predictor, below))
    return found


def exit_nodes(routes) -> tuple[tuple, tuple]:
    """The nodes of the exits' subtrees (each exit's, below it) and their paths from their exit."""
    nodes, chains = [], []
    for route in routes:
        for node, chain in zip(route.predictor.node_names, route.predictor.chains):
            if route.name in chain:
                nodes.append(node)
                chains.append(tuple(chain[chain.index(route.name):]))
    return tuple(nodes), tuple(chains)


def exit_outputs(routes, vectors: np.ndarray, classes, out: ExitOutputs | None = None, only=None,
                 rows=None) -> ExitOutputs:
    """The exits' answers (`routes`: exit_routes') to encoded parent inputs `vectors` (columns of taps deeper than an
    exit's may be anything), written into `out` (exits `only`, at `rows`) or a new ExitOutputs."""
    nodes, chains = exit_nodes(routes)
    n = len(vectors)
    out = out if out is not None else ExitOutputs.empty(len(routes), n, len(classes), nodes, chains)
    rows = np.arange(n) if rows is None else rows
    index = {(chain[0], node): i for i, (node, chain) in enumerate(zip(nodes, chains))}
    for j in range(len(routes)) if only is None else only:
        route = routes[j]
        if not n:
            continue
        p = route.predictor
        found = p.predict(vectors)
        columns = np.array([classes.index(c) for c in p.classes])
        local = np.array([index.get((route.name, name), -1) for name in p.node_names])
        out.gate[j, rows] = np.where(found.accepted, found.gate, -np.inf)
        out.predicted[j, rows] = columns[found.predicted]
        out.confidence[j, rows] = found.confidence
        out.probabilities[j, rows] = 0.0
        out.probabilities[j, rows[:, None], columns[None, :]] = found.probabilities
        out.final[j, rows] = local[found.final_node]
        out.below[j, rows] = route.below[found.final_node]
    return out


def first_exit(gate: np.ndarray, threshold: float | None) -> np.ndarray:
    """Per input, the first exit whose gate (ExitOutputs.gate) reaches the threshold (-1: none)."""
    if threshold is None or not len(gate):
        return np.full(gate.shape[1] if gate.ndim == 2 else 0, -1)
    hit = gate >= np.float32(threshold)  # as routing and the exported graph compare: the float32 gate, in float32
    return np.where(hit.any(axis=0), hit.argmax(axis=0), -1)


def head_flops(model) -> int:
    """FLOPs of a node's own layers on one input (an encoded parent's head, a branch)."""
    return counted(lambda: model.net(torch.zeros(1, model.architecture[0])))


def input_costs(models: dict, outputs: ExitOutputs, exits, tap_costs: np.ndarray, depth: int, paths: list) -> Costs:
    """Each input's FLOPs answered at each exit or by the tree: `tap_costs` (N or 1, taps) the trunk's cumulative
    FLOPs to each tap, `outputs` the exits' (the branches below them), `depth` the taps the tree reads, `paths`
    each input's chain through the tree (its nodes' own layers counted)."""
    n = len(paths)
    heads = np.array([head_flops(models[name]) for name in exits], dtype=np.float64)
    passed = np.cumsum(heads[:, None] + outputs.below, axis=0).T if len(exits) else np.zeros((n, 0))
    taps = [models[name].meta.layer for name in exits]
    at_exit = tap_costs[:, taps] + passed
    own = {name: head_flops(model) for name, model in models.items() if model.has_head}
    route = np.array([sum(own.get(c, 0) for c in chain) for chain in paths], dtype=np.float64)
    full = tap_costs[:, depth - 1] + route
    return Costs(np.broadcast_to(at_exit, (n, len(exits))).astype(np.float64),
                 np.broadcast_to(full, (n,)).astype(np.float64), passed[:, -1] if len(exits) else np.zeros(n))


def outcome(exited: np.ndarray, outputs: ExitOutputs, tree_guess, tree_accepted, labels, costs: Costs,
            exits_run: bool = True) -> dict:
    """The cascade's figures for one setting: accuracy (every input's answer), coverage and error on what it
    answers, mean MFLOPs, and the share of inputs answered at each exit. `exits_run`: False for no threshold (the
    full trunk alone: no exit head runs)."""
    n = len(exited)
    rows = np.arange(n)
    out = exited >= 0
    guess = np.where(out, outputs.predicted[np.maximum(exited, 0), rows], tree_guess)
    answered = out | tree_accepted
    right = guess == labels
    flops = np.where(out, costs.at_exit[rows, np.maximum(exited, 0)] if costs.at_exit.shape[1] else 0.0,
                     costs.full + (costs.heads if exits_run else 0.0))
    k = int(answered.sum())
    return {"accuracy": float(right.mean()) if n else None, "coverage": k / n if n else None,
            "errors": int((answered & ~right).sum()), "answered": k,
            "risk": float((answered & ~right).sum() / k) if k else None, "mflops": float(flops.mean() / 1e6) if n else None,
            "exits": [float((exited == j).mean()) for j in range(outputs.gate.shape[0])]}


def fit(spec, exits, outputs: ExitOutputs, tree_guess, tree_accepted, labels, costs: Costs) -> Cascade:
    """The cascade's threshold on the calibration inputs (see the module docstring); `spec` a config.CascadeSpec."""
    curve = []
    for threshold in GRID:
        point = outcome(first_exit(outputs.gate, threshold), outputs, tree_guess, tree_accepted, labels, costs,
                        threshold != float("inf"))
        point["threshold"] = None if threshold == float("inf") else threshold
        if spec.risk is not None:
            point["bound"] = risk_upper_bound(point["errors"], point["answered"], spec.delta / len(GRID))
        curve.append(point)
    n = len(labels)
    if spec.budget is not None:
        asked = {"budget": spec.budget}
        within = [p for p in curve if p["mflops"] <= spec.budget]
        if not within:
            cheapest = min(curve, key=lambda p: p["mflops"])
            return Cascade(tuple(exits), cheapest["threshold"], "budget", asked, False,
                           f"no setting costs {spec.budget:g} MFLOPs or less on {n} calibration inputs; the cheapest "
                           f"costs {cheapest['mflops']:.1f}", None, n, curve)
        best = max(within, key=lambda p: (p["accuracy"], -p["mflops"]))
        return Cascade(tuple(exits), best["threshold"], "budget", asked, True, None, None, n, curve)
    asked = {"risk": spec.risk, "delta": spec.delta}
    passed = [p for p in curve if p["bound"] <= spec.risk]
    if not passed:
        lowest = min(curve, key=lambda p: p["bound"])
        return Cascade(tuple(exits), None, "risk", asked, False,
                       f"no setting meets risk {spec.risk:g} with confidence {1 - spec.delta:g} on {n} calibration "
                       f"inputs: the lowest bound reachable is {lowest['bound']:.4f} (the tree alone: "
                       f"{curve[0]['bound']:.4f}); ask for {math.ceil(lowest['bound'] * 1000) / 1000:.3f} or more", None, n,
                       curve)
    chosen = min(passed, key=lambda p: (p["mflops"], -p["accuracy"]))
    return Cascade(tuple(exits), chosen["threshold"], "risk", asked, True, None, chosen["bound"], n, curve)


def combine(tree: TreePredictions, rest: np.ndarray, exited: np.ndarray, outputs: ExitOutputs) -> TreePredictions:
    """One TreePredictions for every input: the tree's answers (`tree`, of the inputs `rest` it saw) and the exits'
    (an exit's subtree's nodes follow the tree's, their paths starting at their exit; the parent's own prediction
    of an input an exit answered is that exit's answer)."""
    n, out = len(exited), exited >= 0
    rows = np.flatnonzero(out)
    j = exited[out]
    arrays = {"predicted": np.empty(n, np.int64), "confidence": np.empty(n, np.float32),
              "final_node": np.empty(n, np.int64), "rejected_at": np.full(n, -1, np.int64),
              "rejected_confidence": np.full(n, np.nan, np.float32), "parent_predicted": np.empty(n, np.int64),
              "probabilities": np.zeros((n, len(tree.classes)), np.float32)}
    for key in arrays:
        arrays[key][rest] = getattr(tree, key)
    arrays["predicted"][rows] = outputs.predicted[j, rows]
    arrays["parent_predicted"][rows] = outputs.predicted[j, rows]
    arrays["confidence"][rows] = outputs.confidence[j, rows]
    arrays["final_node"][rows] = len(tree.nodes) + outputs.final[j, rows]
    arrays["probabilities"][rows] = outputs.probabilities[j, rows]
    return TreePredictions(tree.classes, tuple(tree.nodes) + outputs.nodes, tuple(tree.chains) + outputs.chains,
                           **arrays)


def simulate(predictor: TreePredictor, exits: list, cascade: Cascade, vectors: np.ndarray, route=None) -> tuple:
    """The cascade's answers to encoded inputs (the parent's vectors, every tap there): (TreePredictions, exit
    outputs, the exit each input left at or -1). `exits`: exit_routes'. The same arithmetic as the staged run,
    without its savings. `route`: how the routed tree answers the rest (default predictor.predict)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    outputs = exit_outputs(exits, vectors, list(predictor.classes))
    exited = first_exit(outputs.gate, cascade.threshold)
    rest = np.flatnonzero(exited < 0)
    tree = (route or predictor.predict)(vectors[rest])
    return combine(tree, rest, exited, outputs), outputs, exited
