"""One predictor for the whole tree: pixels in, a leaf class, its confidence and the path out.

Each node's softmax (after its fitted temperature) puts probability mass on the classes of each
of its children; an image goes to the child with the most mass, or is answered by the node itself
when a class that no child covers gets more mass than any child. An image is rejected at the
first node where that mass (routing) or the final class probability falls below the node's
threshold. The argmax path is followed to the end either way, so one pass gives both the
selective answer and the tree's answer at full coverage.

Each node's trunk is computed once per batch and feeds every child that reads it; a child only
sees the images routed to it. The parent's normalisation is folded into its first layer. Only the
matrix products run in torch; the small element-wise steps run in NumPy on the same memory, which
keeps them out of torch's thread pool (whose start-up dominates such steps on a busy machine).

A node whose acceptance uses another score than the max softmax probability (branching.confidence)
is rejected when that score, of its own answer, is below its threshold; routing still follows the
probability mass. Its self-evaluation branch ("selfeval") reads taps its source computes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from branching import distributed
from branching.acceptance import confidence as scores
from branching.acceptance.rule import Acceptance
from branching.config.tree import TreeConfig
from branching.data.normalization import Normalizer
from branching.errors import CheckpointError, ConfigError, did_you_mean
from branching.models import nets
from branching.models.device import CPU, on_device, resolve_device
from branching.models.forward import node_input, parent_depth, read_tap, reads
from branching.models.model import Model
from branching.tree import cost, judge
from branching.tree.checkpoint import load_folder

BATCH = 1024
MIN_FOLD_STD = 1e-3  # below this, dividing weights by the pixel std loses too much precision


class _Node:
    """A node's weights, laid out for x @ W, and what its routing needs."""

    def __init__(self, index: int, spec, model: Model, tree_classes, normalizer: Normalizer | None, reads=None):
        self.index, self.name, self.spec = index, spec.name, spec
        self.reads = reads  # (layer, where, pool) of its source that this node reads
        self.model = None if model.net_kind.fused else model  # a CNN, ViT, ... runs through its own forward pass
        linears = [m for m in model.net if isinstance(m, nn.Linear)] if self.model is None else []
        self.weights = [(m.weight.detach().t().contiguous(), m.bias.detach().numpy().copy()) for m in linears]
        self.fold_normalizer = (self.model is None and normalizer is not None
                                and float(normalizer.std.min()) >= MIN_FOLD_STD)
        self.normalizer = normalizer
        if self.fold_normalizer:  # W (x - m) / s + b  ==  (W / s) x + (b - (W / s) m)
            w, b = self.weights[0]
            w = w / torch.from_numpy(normalizer.std)[:, None]
            self.weights[0] = (w.contiguous(), b - (torch.from_numpy(normalizer.mean) @ w).numpy())
        self.activation = model.activation
        self.act = model.net[1] if len(linears) > 1 else None
        # the node's temperature, and the threshold of its rule (for a parent without one, its recipe's:
        # it routes by the same rule the branches accept by); a threshold of None accepts nothing
        acceptance = Acceptance.of(model.meta)
        self.routing_state(spec, tree_classes, acceptance.routing(), acceptance.score, acceptance.temperature)
        self.flops = (sum(2 * w.shape[0] * w.shape[1] for w, _ in self.weights) if self.model is None
                      else cost.counted(lambda: model.net(torch.zeros(1, model.architecture[0]))))
        if spec.source is None and model.net_kind.encoded:  # its frozen network runs to the deepest tap encoded
            self.flops += model.net_kind.trunk_flops(model.shape, model.shape["depth"] - 1)

    def routing_state(self, spec, tree_classes, rule: dict, score: str, temperature: float) -> None:
        """What routing reads of a node besides its trunk: its rule, score and temperature, its classes among the
        tree's, and (filled by add_children) its children's groups. An exported tree's nodes (api.onnx_tree) too."""
        self.rule, self.score, self.temperature = rule, score, temperature
        self.judge: judge.Judge | None = None
        self.judge_reads: list[tuple] = []  # (layer, where, pool) of its source (itself for the parent)
        self.inverse_temperature = np.float32(1.0 / rule["temperature"])
        # float32, as the confidences it is compared with (the same decision in every code path)
        self.threshold = float("inf") if rule["threshold"] is None else float(np.float32(rule["threshold"]))
        self.leaf_ids = np.array([tree_classes.index(c) for c in spec.classes], dtype=np.int64)
        self.taps: set[tuple] = set()                 # (layer, where, pool) its children read
        self.children: list[tuple[_Node, int]] = []   # (child, its group)
        self.group_matrix: np.ndarray | None = None    # classes x groups, 1 where a class is in a group
        self.group_leaf = self.leaf_ids                # leaf class of a group; -1 for a child's group

    def add_judge(self, judged: judge.Judge, source: _Node) -> None:
        """Score this node's answers with its self-evaluation branch, which reads taps `source` computes."""
        self.judge = judged
        self.judge_reads = [tuple(r[1:]) for r in judged.reads]
        source.taps.update(self.judge_reads)
        self.flops += judged.flops

    def score_of(self, logits: np.ndarray, judge_taps) -> np.ndarray:
        """The node's non-msp score of its answers (float32), from its raw logits (and its judge's taps)."""
        if self.score == "selfeval":
            return self.judge.probability_of(judge_taps, logits)
        return scores.score(self.score, logits, self.temperature).astype(np.float32)

    def add_children(self, children: list[_Node]) -> None:
        if not children:
            return
        covered = {c for child in children for c in child.spec.classes}
        own = [i for i, c in enumerate(self.spec.classes) if c not in covered]
        groups = torch.zeros(len(self.spec.classes), len(children) + len(own))
        for g, child in enumerate(children):
            for c in child.spec.classes:
                groups[self.spec.classes.index(c), g] = 1.0
            self.children.append((child, g))
            self.taps.add(child.reads)
        for g, i in enumerate(own, start=len(children)):
            groups[i, g] = 1.0
        self.group_matrix = groups.numpy()
        self.group_leaf = np.array([-1] * len(children) + [int(self.leaf_ids[i]) for i in own], dtype=np.int64)

    def trunk(self, x: torch.Tensor) -> tuple[np.ndarray, dict]:
        """Logits, and the hidden layers the children read (NumPy views of torch's results)."""
        if self.model is not None:
            wanted = sorted(self.taps, key=str)
            out, found = self.model.forward_intermediates(x.to(self.model.device), [t[:2] for t in wanted],
                                                          stop_early=False)
            return out.cpu().numpy(), {t: nets.pool(f, t[2]).cpu().numpy() for t, f in zip(wanted, found)}
        taps: dict[tuple, np.ndarray] = {}
        h = x
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(self.weights):
            a = torch.mm(h, w).numpy()
            a += b  # not addmm: its bias broadcast is a separate threaded copy
            if i == last:
                return a, taps
            keep = (i, "pre", "flat") in self.taps  # then the activation writes a new array, not over the tap
            if keep:
                taps[(i, "pre", "flat")] = a
            if self.activation == "relu":
                a = np.maximum(a, 0, out=None if keep else a)
            else:
                a = self.act(torch.from_numpy(a)).numpy()
            if (i, "post", "flat") in self.taps:
                taps[(i, "post", "flat")] = a
            h = torch.from_numpy(a)
        raise AssertionError("unreachable: a model ends with its output layer")


def _softmax(z: np.ndarray) -> np.ndarray:
    """Row softmax in place (float32)."""
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


@dataclass
class TreePredictions:
    """Per image: leaf class id (into `classes`), confidence, the node that answered, the node where
    it was first rejected (-1: accepted), and the parent's own flat prediction."""

    classes: tuple[str, ...]
    nodes: tuple[str, ...]
    chains: tuple[tuple[str, ...], ...]
    predicted: np.ndarray
    confidence: np.ndarray
    final_node: np.ndarray
    rejected_at: np.ndarray
    rejected_confidence: np.ndarray  # the confidence below threshold where an image was rejected (nan: accepted)
    parent_predicted: np.ndarray
    probabilities: np.ndarray  # (N, classes): the answering node's calibrated softmax, 0 for classes outside it
    gate: np.ndarray | None = None  # the first node's own confidence (the parent's, or an entry branch's)

    @property
    def accepted(self) -> np.ndarray:
        return self.rejected_at < 0

    def path(self, i: int) -> str:
        return " > ".join(self.chains[self.final_node[i]])

    def rejected_level(self, i: int) -> str:
        return "" if self.rejected_at[i] < 0 else self.nodes[self.rejected_at[i]]

    def reached(self) -> dict[str, int]:
        """How many images each node saw (a node sees every image routed through it)."""
        counts = dict.fromkeys(self.nodes, 0)
        for node, n in zip(*np.unique(self.final_node, return_counts=True)):
            for name in self.chains[node]:
                counts[name] += int(n)
        return counts

    def rows(self) -> list[dict]:
        """One dict per image: predicted_class, confidence, path, accepted (0/1), rejected_at."""
        return [{"predicted_class": self.classes[p], "confidence": float(c), "path": self.path(i),
                 "accepted": int(r < 0), "rejected_at": self.rejected_level(i)}
                for i, (p, c, r) in enumerate(zip(self.predicted, self.confidence, self.rejected_at))]


class TreePredictor:
    """Batched end-to-end inference through a loaded tree (see the module docstring)."""

    def __init__(self, config: TreeConfig, models: dict[str, Model], entry: str | None = None,
                 judges: dict | None = None, device=CPU, asked: str = "--branch "):
        """`judges`: {node: judge.Judge} for the nodes whose score is "selfeval" (default: loaded from the
        folder beside each such node's model file). CNN, ViT and module nodes run on `device` while
        predict runs; an MLP node's fused arithmetic stays on the CPU. `asked`: how `entry` was named, for messages."""
        self.device = resolve_device(device)
        config = config.routed(entry)  # standalone branches (new classes) answer only when asked by name
        missing = [spec.name for spec in config.nodes() if spec.name not in models]
        if missing:
            raise CheckpointError(f"no model for {', '.join(map(repr, missing))}; train the tree first")
        self.config = config
        self.classes = config.classes()  # the parent's, and any new classes of an entry branch's subtree
        parent = models["parent"]
        normalizer = Normalizer.from_dict(parent.meta.normalization)
        self.nodes: list[_Node] = []
        by_name: dict[str, _Node] = {}
        for i, spec in enumerate(config.nodes()):
            node = _Node(i, spec, models[spec.name], self.classes, normalizer if spec.source is None else None,
                         None if spec.source is None else reads(models, spec.name)[1:])
            self.nodes.append(node)
            by_name[spec.name] = node
        for node in self.nodes:
            node.add_children([by_name[c.name] for c in config.children(node.name) if not c.new_classes])
        for node in self.nodes:
            if node.score == "selfeval":
                found = (judges or {}).get(node.name) or judge.load_for(models, node.name)
                node.add_judge(found, by_name[node.spec.source or "parent"])
        self.root = self.nodes[0]
        self.chains = tuple(tuple(config.chain(n.name)) for n in self.nodes)
        self.models = models
        self.entry = None if entry is None and parent.has_head else by_name[entry_branch(config, parent, entry, asked)]

    @classmethod
    def load(cls, models_dir, config: TreeConfig | None = None, entry: str | None = None,
             device=CPU) -> TreePredictor:
        """Load every model in a folder (or in its models/ subfolder), checking their lineage."""
        config, models = load_folder(models_dir, config)
        return cls(config, models, entry, device=device)

    @property
    def answerable(self) -> tuple[str, ...]:
        """The classes an image can be answered with: the tree's, or from an entry branch that branch's."""
        return self.classes if self.entry is None else tuple(self.entry.spec.classes)

    @property
    def routed(self) -> list[_Node]:
        """The nodes an input can reach: every node, or an entry branch's subtree."""
        return [n for n in self.nodes if self.entry is None or self.entry.name in self.config.chain(n.name)]

    def parent_depth(self) -> int:  # the parent's taps it needs (forward.parent_depth): an entry's subtree's
        running = self.routed
        return parent_depth(self.models, [n.name for n in running], [n.judge.reads for n in running if n.judge])

    @property
    def thresholds(self) -> dict[str, float | None]:
        """The threshold each node compares an image's confidence with (None: the node accepts nothing)."""
        return {n.name: n.rule["threshold"] for n in self.nodes}

    @property
    def node_names(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes)

    def predict(self, images, batch_size: int = BATCH) -> TreePredictions:
        """Route raw pixel images (N, 3 * side * side), uint8 or float in 0..255, through the tree."""
        images = np.asarray(images)
        if images.ndim == 1:
            images = images[None]
        pixels = self.root.normalizer.mean.size
        if images.ndim != 2 or images.shape[1] != pixels:
            raise ConfigError(f"images must have shape (N, {pixels}), the tree's 3 x side x side pixels; got "
                              f"{images.shape}")
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        # under torchrun each rank routes its share of the images and every rank gets every answer
        arrays = distributed.over_shards(len(images), lambda rows: self._predict(images[rows], batch_size))
        return TreePredictions(self.classes, self.node_names, self.chains, **arrays)

    def _predict(self, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        n, parent = len(images), self.models["parent"]
        batch_size = parent.net_kind.batch_rows(parent.net, batch_size)  # a module enlarging images: fewer at once
        arrays = self._arrays(n)
        with on_device(self.models.values(), self.device), torch.inference_mode():
            for start in range(0, n, batch_size):
                chunk = images[start:start + batch_size]
                batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
                if self.entry is None:
                    self._route(self.root, self._input(chunk), None, batch)
                else:  # straight to the entry branch: its chain's trunks run, nothing routes above it
                    x = torch.from_numpy(self.root.normalizer.transform(chunk.astype(np.float32)))
                    judged = (None if self.entry.judge is None
                              else [read_tap(self.models, r, x).cpu().numpy() for r in self.entry.judge.reads])
                    self._route(self.entry, node_input(self.models, self.entry.name, x).cpu(), None, batch, judged)
                    batch["parent_predicted"][:] = -1
        return arrays

    def _arrays(self, n: int) -> dict[str, np.ndarray]:
        """What _route fills for n inputs: TreePredictions' arrays."""
        return {"predicted": np.empty(n, np.int64), "confidence": np.empty(n, np.float32),
                "final_node": np.empty(n, np.int64), "rejected_at": np.empty(n, np.int64),
                "rejected_confidence": np.empty(n, np.float32), "parent_predicted": np.empty(n, np.int64),
                "probabilities": np.zeros((n, len(self.classes)), np.float32), "gate": np.empty(n, np.float32)}

    def _input(self, pixels: np.ndarray) -> torch.Tensor:
        x = np.array(pixels, dtype=np.float32, order="C")  # one batch at a time: memory stays bounded
        if not self.root.fold_normalizer:
            x -= self.root.normalizer.mean
            x /= self.root.normalizer.std
        return torch.from_numpy(x)

    def _route(self, node: _Node, x: torch.Tensor, rows: np.ndarray | None, out: dict, judge_taps=None) -> None:
        logits, taps = node.trunk(x)
        raw = None if node.score == "msp" else logits.copy()
        logits *= node.inverse_temperature
        probs = _softmax(logits)
        mass = probs if node.group_matrix is None else probs @ node.group_matrix
        group = mass.argmax(axis=1)  # the first maximum on ties
        confidence = mass[np.arange(len(group)), group]
        if raw is not None:
            if node.spec.source is None and node.judge is not None:  # the parent's judge reads its own taps
                judge_taps = [taps[t] for t in node.judge_reads]
            confidence = node.score_of(raw, judge_taps)
        low = confidence < node.threshold
        answered = np.zeros((len(probs), out["probabilities"].shape[1]), np.float32)  # a deeper node overwrites
        answered[:, node.leaf_ids] = probs
        out["probabilities"][slice(None) if rows is None else rows] = answered
        if rows is None:  # the root: every image of the batch
            out["parent_predicted"][:] = node.leaf_ids[probs.argmax(axis=1)]
            out["predicted"][:] = node.group_leaf[group]
            out["confidence"][:] = confidence
            out["final_node"][:] = node.index
            out["rejected_at"][:] = np.where(low, node.index, -1)
            out["rejected_confidence"][:] = np.where(low, confidence, np.nan)
            out["gate"][:] = confidence
        else:
            out["predicted"][rows] = node.group_leaf[group]
            out["confidence"][rows] = confidence
            out["final_node"][rows] = node.index
            before = out["rejected_at"][rows]
            first = low & (before < 0)
            out["rejected_at"][rows] = np.where(first, node.index, before)
            out["rejected_confidence"][rows] = np.where(first, confidence, out["rejected_confidence"][rows])
        for child, g in node.children:
            chosen = np.flatnonzero(group == g)
            if len(chosen):
                tap = torch.from_numpy(np.ascontiguousarray(taps[child.reads][chosen]))
                judged = [taps[t][chosen] for t in child.judge_reads]
                self._route(child, tap, chosen if rows is None else rows[chosen], out, judged)

    def flops_per_image(self, reached: dict[str, int], n: int) -> float:
        """Mean forward FLOPs per image (2 per multiply-add of every Linear) for these routing counts."""
        return sum(node.flops * reached[node.name] for node in self.nodes) / max(n, 1)

    def layer_shapes(self) -> dict[str, list[tuple[int, int]]]:
        """(fan_in, fan_out) of every Linear of each node, in order."""
        return {node.name: [tuple(w.shape) for w, _ in node.weights] for node in self.nodes}


def entry_branch(config: TreeConfig, parent: Model, entry: str | None, asked: str = "--branch ") -> str:
    """The branch every image goes to without routing: `entry` (any branch), or for a parent without a head
    (a module parent) its only branch; a parent without a head and several branches needs `entry`."""
    if entry is not None:
        if entry not in config.branches:
            raise ConfigError(f"{asked}{entry}: no such branch{did_you_mean(entry, config.branches)}; use one of "
                              f"{', '.join(config.branches)}")
        return entry
    children = [c.name for c in config.children("parent")]
    if len(children) == 1:
        return children[0]
    raise ConfigError(f"the parent ({parent.net_kind.describe(parent.shape)}) has no head, so it cannot route "
                      f"between its branches {', '.join(children)}; pass --branch NAME (routing from it) or --node "
                      f"NAME (it alone), or {parent.net_kind.head_fix}")
