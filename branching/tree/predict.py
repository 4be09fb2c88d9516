"""One node of a tree on its own (NodePredictor): the chain from the pixels to it, its classes and its
acceptance rule, answering as the routed tree does."""

from __future__ import annotations

import numpy as np

from branching.acceptance.rule import Acceptance
from branching.config.tree import TreeConfig
from branching.data.normalization import Normalizer
from branching.errors import ConfigError, did_you_mean
from branching.models.device import CPU, on_device
from branching.models.forward import node_inputs, parent_depth
from branching.tree import judge
from branching.tree.routing import BATCH, TreePredictions


class NodePredictor:
    """One node of a tree on its own: the chain from the pixels to it, its classes, its acceptance rule.
    Gives the routed tree's TreePredictions, with the chain as the path."""

    def __init__(self, config: TreeConfig, models: dict, name: str, device=CPU, asked: str = "--node "):
        """`asked`: how the node was named, for messages (a flag, or node= from Python)."""
        if name != "parent" and name not in config.branches:
            known = ["parent", *config.branches]
            raise ConfigError(f"{asked}{name}: unknown node {name!r}{did_you_mean(name, known)}; the tree's nodes "
                              f"are {', '.join(known)}")
        if not models[name].has_head:
            raise ConfigError(f"{asked}{name}: this parent ({models[name].net_kind.describe(models[name].shape)}) has "
                              f"no head, so no classes to answer with; ask one of its branches")
        self.models, self.name, self.device = models, name, device
        self.chain = tuple(config.chain(name))
        self.classes = self.answerable = tuple(config.node(name).classes)
        self.normalizer = Normalizer.from_dict(models["parent"].meta.normalization)
        self.acceptance = Acceptance.of(models[name].meta)
        self.judge = judge.load_for(models, name)  # its self-evaluation branch, when it accepts by one
        # the threshold it compares with: its rule's (None without one: it accepts every answer)
        self.thresholds = {name: self.acceptance.threshold if self.acceptance.rejects else None}

    def parent_depth(self) -> int:
        """The parent's taps this node needs (forward.parent_depth)."""
        return parent_depth(self.models, [self.name], [self.judge.reads] if self.judge else [])

    def predict(self, images, batch_size: int = BATCH) -> TreePredictions:
        X = self.normalizer.lazy(np.asarray(images).reshape(-1, self.normalizer.mean.size))
        with on_device(self.models.values(), self.device):
            logits = np.concatenate([self.models[self.name].logits(node_inputs(self.models, self.name, X[i:i + batch_size]))
                                     for i in range(0, len(X), batch_size)] or [np.zeros((0, len(self.classes)))])
            probability = None if self.judge is None else self.judge.score_images(self.models, X, logits)
        predicted = logits.argmax(axis=1)
        confidence = self.acceptance.confidence(logits, probability)
        low = ~self.acceptance.accepts(confidence)
        last = len(self.chain) - 1
        scaled = logits / np.float32(self.acceptance.temperature)
        probabilities = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        return TreePredictions(self.classes, self.chain, tuple(self.chain[:i + 1] for i in range(len(self.chain))),
                               predicted, confidence.astype(np.float32), np.full(len(X), last),
                               np.where(low, last, -1), np.where(low, confidence, np.nan).astype(np.float32),
                               predicted, probabilities.astype(np.float32))
