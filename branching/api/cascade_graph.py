"""A tree with early exits as one ONNX graph that stops its trunk where an exit answers.

The graph runs the trunk tap by tap as branching.tree.staged does (the kind's stages, traced): at each exit's tap it
computes the exit's calibrated confidence (its max softmax at its temperature) on the rows still running, and the
rows whose confidence reaches the cascade's threshold leave (ONNX NonZero and Gather); the trunk's later layers run on
the others alone. Its outputs, each for a batch of N inputs:

- `rows.<exit>` (int64) the inputs that exit answered (positions in the batch) and `logits.<exit>` its logits for them;
- `rest.rows` the inputs no exit took, and for them every routed node's `probs.<node>` and `logits.<node>`, as an
  exported tree without exits gives them (api.export.DenseTree).

Routing and acceptance run outside it (api.onnx_tree), from the thresholds and temperatures in its metadata. An exit
with branches below it needs their answers to decide whether it answers, which the graph does not route: such a tree
does not export. A transformer's layers cannot run on a batch of no rows (models.stages `runs_empty`): where every
input of a batch has left, one of them runs on as a stand-in, on its first token alone, its row -1 in `rest.rows`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from branching.models import nets
from branching.models.forward import reads
from branching.models.stages import stages


class CascadeGraph(nn.Module):
    """The cascade of a tree.staged.CascadePredictor, with `dense` (an api.export.DenseTree of its routed tree, reading
    the parent's vectors) for the rest; outputs in the order of `output_names`."""

    def __init__(self, predictor, dense: nn.Module):
        super().__init__()
        models = predictor.models
        parent = models["parent"]
        self.stages = stages(parent.net_kind, parent.shape, torch.device("cpu"))  # traced on the CPU, as export is
        self.trunk = self.stages.module()  # its weights: the graph's
        self.dense = dense
        self.exits, self.taps = list(predictor.exits), list(predictor.taps)
        self.depth, self.width = max(predictor.tree_depth, self.taps[-1] + 1), predictor.width
        self.parent = models["parent"]
        self.heads = nn.ModuleDict({name: models[name].net for name in self.exits})
        self.reads = {name: reads(models, name) for name in self.exits}
        normalizer = predictor.root.normalizer
        self.register_buffer("mean", torch.from_numpy(normalizer.mean.copy()))
        self.register_buffer("std", torch.from_numpy(normalizer.std.copy()))
        routes = {r.name: r.predictor.entry for r in predictor.exit_routes}
        self.register_buffer("inverse_temperature", torch.tensor([float(routes[e].inverse_temperature)
                                                                  for e in self.exits]))
        self.threshold = float(np.float32(predictor.cascade.threshold))  # compared in float32, as cascade.first_exit

    @property
    def output_names(self) -> list[str]:
        exits = [name for e in self.exits for name in (f"rows.{e}", f"logits.{e}")]
        rest = [f"probs.{n}" for n in self.dense.names] + [f"logits.{n}" for n in self.dense.names]
        return exits + ["rest.rows"] + rest

    def forward(self, *inputs):
        state = self.stages.begin(*inputs)
        alive = torch.arange(inputs[0].shape[0])
        parts, done, out = [], 0, []
        for j, (name, tap) in enumerate(zip(self.exits, self.taps)):
            state, pooled = self.stages.run(state, done, tap + 1)
            parts.append(pooled)
            done = tap + 1
            logits = self._exit_logits(name, self._vectors(parts))
            confidence = torch.softmax(logits * self.inverse_temperature[j], dim=1).amax(dim=1)
            real = alive >= 0
            leaving = (confidence >= self.threshold) & real
            going = real & ~leaving
            keep, gone = going, going.sum() == 0
            if not self.stages.runs_empty:  # one row runs on where all have left (a stand-in, its row -1)
                keep = going | (gone & (torch.arange(alive.shape[0]) == 0))
            leave, stay = torch.nonzero(leaving).squeeze(1), torch.nonzero(keep).squeeze(1)
            out += [alive.index_select(0, leave), logits.index_select(0, leave)]
            alive = torch.where(going, alive, -1).index_select(0, stay)
            parts = [p.index_select(0, stay) for p in parts]
            state = self.stages.cut(state, stay)
            if not self.stages.runs_empty:  # the stand-in alone: on its first token alone, the cheapest to run
                state = self.stages.first_token(state, gone)
        if self.depth > done:
            parts.append(self.stages.run(state, done, self.depth)[1])
        return (*out, alive, *self.dense(self._vectors(parts)))

    def _vectors(self, parts: list) -> torch.Tensor:
        """The parent's input vectors of the rows running: the taps computed so far, zeros for the deeper ones."""
        vectors = torch.cat(parts, dim=1)
        return nn.functional.pad(vectors, (0, self.width - vectors.shape[1]))

    def _exit_logits(self, name: str, vectors: torch.Tensor) -> torch.Tensor:
        x = (vectors - self.mean) / self.std
        _, layer, where, pool = self.reads[name]
        _, found = self.parent.forward_intermediates(x, [(layer, where)], stop_early=True)
        return self.heads[name](nets.pool(found[0], pool))
