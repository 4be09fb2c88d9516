"""A tree with early exits answering new inputs, paying only for the trunk each answer needs, at any batch size.

The trunk runs tap by tap (branching.models.stages) over a chunk of inputs: at each exit's tap the exit answers
the rows it is sure enough of (branching.tree.cascade), those rows are dropped, and the trunk's later layers run
on the rest alone; after the last exit the rest go on to the deepest tap the tree reads and the routed tree answers
them. Each tap is computed once for each row that reaches it. The answers are those of cascade.simulate on the
same inputs' full encodings (the same arithmetic on the same columns).
"""

from __future__ import annotations

import threading

import numpy as np

from branching.models.device import CPU
from branching.models.stages import offsets, stages
from branching.tree.cascade import (Cascade, ExitOutputs, combine, exit_nodes, exit_outputs, exit_routes, first_exit,
                                    simulate)
from branching.tree.routing import BATCH, TreePredictions, TreePredictor


class CascadePredictor(TreePredictor):
    """The routed tree (TreePredictor over config.routed(): the exits left out) behind a cascade of exits; its
    predict takes what the parent's trunk takes (flat images (N, 3 * side * side), or texts), not encodings."""

    reads_raw = True

    def __init__(self, config, models: dict, cascade: Cascade, device=CPU):
        super().__init__(config, models, None, device=device)
        self.cascade, self.exits = cascade, tuple(cascade.exits)
        self.exit_routes = exit_routes(config, models, self.exits, device)  # each exit and the branches below it
        self.exit_nodes = exit_nodes(self.exit_routes)[0]
        parent = models["parent"]
        self.kind, self.shape = parent.net_kind, parent.shape
        self.taps = [models[e].meta.layer for e in self.exits]
        self.tree_depth = self.parent_depth()
        self.stages = stages(self.kind, self.shape, self.device)
        self.offsets = offsets(self.stages.widths, self.stages.pools)
        self.width = parent.architecture[0]
        found = getattr(self.stages, "found", None)  # a transformer: the encoder every tree of its model shares
        self._lock = found.lock if found is not None else threading.Lock()

    @property
    def thresholds(self) -> dict[str, float | None]:
        below = {name: t for r in self.exit_routes for name, t in r.predictor.thresholds.items() if name in self.exit_nodes}
        return {**super().thresholds, **below, **dict.fromkeys(self.exits, self.cascade.threshold)}

    def predict(self, inputs, batch_size: int = BATCH) -> TreePredictions:
        """Answer raw inputs: images (N, 3 * side * side) uint8, or a list of texts. One call at a time (the staged
        trunk keeps a chunk's state, and a fast tokenizer serves one thread)."""
        with self._lock:
            return self._predict_all(inputs, batch_size)

    def predict_encoded(self, vectors, batch_size: int = BATCH) -> TreePredictions:
        """The same answers from the inputs' full encodings (a run's cache, every tap there): no trunk runs, so
        nothing is saved (cascade.simulate)."""
        route = lambda rest: TreePredictor.predict(self, rest, batch_size)  # noqa: E731 - the routed tree alone
        return simulate(self, self.exit_routes, self.cascade, vectors, route)[0]

    def _predict_all(self, inputs, batch_size: int) -> TreePredictions:
        inputs = np.asarray(inputs) if self.kind.reads == "images" else list(inputs)
        n, k = len(inputs), len(self.exits)
        vectors = np.zeros((n, self.width), np.float32)  # what each row's trunk gave, as encode lays it out
        outputs = ExitOutputs.empty(k, n, len(self.classes), *exit_nodes(self.exit_routes))
        exited = np.full(n, -1)
        for rows in self.stages.chunks(inputs) if n else ():
            self._chunk(inputs, rows, vectors, outputs, exited)
        rest = np.flatnonzero(exited < 0)
        tree = super().predict(vectors[rest], batch_size)
        return combine(tree, rest, exited, outputs)

    def _chunk(self, inputs, rows: np.ndarray, vectors, outputs: ExitOutputs, exited) -> None:
        stages, alive, done = self.stages, rows, 0
        stages.start(inputs, rows)
        answering = self.cascade.threshold is not None  # else the full trunk: no exit head runs
        for j, tap in enumerate(self.taps if answering else ()):
            vectors[alive, self.offsets[done]:self.offsets[tap + 1]] = stages.advance(tap + 1)
            done = tap + 1
            exit_outputs(self.exit_routes, vectors[alive], list(self.classes), outputs, only=(j,), rows=alive)
            hit = first_exit(outputs.gate[j:j + 1, alive], self.cascade.threshold) == 0
            exited[alive[hit]] = j
            alive = alive[~hit]
            if not len(alive):
                return
            stages.keep(np.flatnonzero(~hit))
        depth = max(done, self.tree_depth)
        vectors[alive, self.offsets[done]:self.offsets[depth]] = stages.advance(depth)
