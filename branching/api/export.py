"""`branching export`: a trained tree as one ONNX graph, and that graph run with onnxruntime.

The graph takes images (N, 3 * side * side) in the toolkit's flat layout (every R, then G, then B; values 0..255,
prepared as `run` prepared its images), or a text parent's token ids and attention mask (N, tokens; the model's own
tokenizer, cut at max_length); branching.load(FILE.onnx) prepares either. It runs the parent's network as far as
the tree reads, each node once (a node's trunk feeds every child that reads it), and gives every node's calibrated probabilities (`probs.<node>`, softmax of its logits
at its fitted temperature) and raw logits (`logits.<node>`) for every input, at any batch size. Routing and
acceptance, a few comparisons per input, run outside it (`api.onnx_tree`, the same code as the PyTorch tree's), from
the thresholds, temperatures, scores and class names in its metadata (`branching.tree`, JSON).

A tree with early exits exports as one graph that stops its trunk where an exit answers (api.cascade_graph).

What does not export, refused with a one-line error: a node accepting by a self-evaluation branch (score
"selfeval": its judge is a second network over the node's taps), and an exit with branches below it. A text tree's
tokenizer stays outside the graph.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from branching.api.onnx_tree import FORMAT, needs
from branching.errors import CheckpointError, ConfigError
from branching.fileio import check_new_file
from branching.models import nets
from branching.models.forward import reads
from branching.tree.routing import TreePredictor

OPSET = 18
TOLERANCE = 1e-4  # the largest difference of a probability between the graph and PyTorch export accepts,
OWN_FACTOR = 5     # or this many times PyTorch's own between batch sizes (a trunk that magnifies rounding)


class DenseTree(nn.Module):
    """Every node of a routed tree on every input: (probabilities..., logits...) in the order of `names`."""

    def __init__(self, predictor: TreePredictor, encoder: nn.Module | None):
        super().__init__()
        models = predictor.models
        self.nodes = list(predictor.node_names)
        self.names = [n for n in self.nodes if models[n].has_head]  # a parent without a head only feeds its branches
        self.encoder = encoder
        self.nets = nn.ModuleDict({name: models[name].net for name in self.nodes})  # their weights: the graph's
        self.models = models
        normalizer = predictor.root.normalizer
        self.register_buffer("mean", torch.from_numpy(normalizer.mean.copy()))
        self.register_buffer("std", torch.from_numpy(normalizer.std.copy()))
        self.register_buffer("inverse_temperature", torch.tensor([float(n.inverse_temperature) for n in predictor.nodes
                                                                  if n.name in self.names]))
        self.reads = {name: reads(models, name) for name in self.nodes if name != "parent"}
        self.taps = {name: sorted({r[1:3] for r in self.reads.values() if r[0] == name}, key=str) for name in self.nodes}

    def forward(self, *inputs):
        x = self.encoder(*inputs) if self.encoder is not None else inputs[0].to(torch.float32)
        x = (x - self.mean) / self.std
        logits, pooled = {}, {}
        for name in self.nodes:  # parents before children (the config's order)
            h = x if name == "parent" else pooled[self.reads[name]]
            out, found = self.models[name].forward_intermediates(h, self.taps[name], stop_early=name not in self.names)
            logits[name] = out
            for (layer, where), value in zip(self.taps[name], found):
                for r in self.reads.values():
                    if r[:3] == (name, layer, where):
                        pooled[r] = nets.pool(value, r[3])
        probs = [torch.softmax(logits[n] * self.inverse_temperature[i], dim=1) for i, n in enumerate(self.names)]
        return (*probs, *[logits[n] for n in self.names])


def _resize_weights(n_in: int, n_out: int, align_corners: bool, along_height: bool) -> torch.Tensor:
    """torch's antialiased bilinear resize along one axis as an (n_out, n_in) matrix: the resize of each basis
    image (the other axis 2 wide: a 1-wide axis takes another code path in torch)."""
    basis = torch.eye(n_in).reshape(n_in, 1, n_in, 1) if along_height else torch.eye(n_in).reshape(n_in, 1, 1, n_in)
    basis = basis.expand(n_in, 1, n_in, 2) if along_height else basis.expand(n_in, 1, 2, n_in)
    size = (n_out, 2) if along_height else (2, n_out)
    out = torch.nn.functional.interpolate(basis.contiguous(), size=size, mode="bilinear", antialias=True,
                                          align_corners=align_corners)
    return (out[:, 0, :, 0] if along_height else out[:, 0, 0, :]).t().contiguous()


def _antialiased_resize(side: int):
    """ONNX for aten::_upsample_bilinear2d_aa (a module parent resizing its images; onnxruntime's own antialiased
    Resize gives other values): two MatMuls with the resize's matrices, for the input's fixed image size (as the
    tracer knows it, else the tree's `side`)."""
    return lambda g, x, output_size, align_corners, *scales: _resize_op(g, x, output_size, align_corners, side)


def _resize_op(g, x, output_size, align_corners, side: int):
    helper = _symbolic_helper()
    sizes = [side if n is None else n for n in (helper._get_tensor_sizes(x) or [None] * 4)]
    height, width = helper._get_const(output_size, "is", "output_size")
    corners = bool(helper._maybe_get_const(align_corners, "b"))
    rows = g.op("MatMul", x, g.op("Constant", value_t=_resize_weights(sizes[3], width, corners, False).t().contiguous()))
    return g.op("MatMul", g.op("Constant", value_t=_resize_weights(sizes[2], height, corners, True)), rows)


def _symbolic_helper():
    try:
        from torch.onnx import symbolic_helper
    except ImportError:  # torch versions that keep it with the TorchScript exporter only
        from torch.onnx._internal.torchscript_exporter import symbolic_helper
    return symbolic_helper


def tree_metadata(tree, cascade: bool = False) -> dict:
    """What api.onnx_tree needs to answer as the PyTorch tree does (with `cascade`, its exits')."""
    predictor = tree.predictor
    config = {k: v for k, v in predictor.config.to_dict().items() if k != "path"}  # no path of this machine's
    entries = [r.predictor.entry for r in predictor.exit_routes] if cascade else []
    exits = {} if not cascade else {"cascade": {
        "threshold": predictor.cascade.threshold, "rule": predictor.cascade.describe(),
        "exits": [{"name": e.name, "classes": list(e.spec.classes), "layer": e.spec.layer,
                   "temperature": float(e.rule["temperature"])} for e in entries]}}
    return {**exits, "format": FORMAT, "reads": tree.reads, "image_size": tree.image_size,
            "classes": list(predictor.classes), "config": config,
            "entry": None if predictor.entry is None else predictor.entry.name,  # a parent without a head: its branch
            "nodes": [{"name": n.name, "classes": list(n.spec.classes), "threshold": n.rule["threshold"],
                       "temperature": float(n.rule["temperature"]), "score": n.score} for n in predictor.nodes],
            "fingerprint": {name: m.meta.fingerprint for name, m in predictor.models.items()}}


def export(tree, out, batch: int = 2, check: int = 16) -> Check:
    """Write `tree` (a branching.api Tree of the whole routed tree) to the ONNX file `out`, once `check` random
    images through the graph under onnxruntime get every node's probabilities as PyTorch's (check_graph); returns
    that check."""
    onnx = needs("onnx")
    needs("onnxruntime")
    out = Path(out)
    if out.suffix != ".onnx":
        raise ConfigError(f"--out {out}: the file name must end in .onnx")
    check_new_file(out, "--out")
    predictor = tree.predictor
    if tree.parent is None:
        raise ConfigError("this tree is an exported graph already; export from the run's folder (--models RUN)")
    cascade = bool(getattr(predictor, "exits", ())) and predictor.cascade.threshold is not None  # else no exit answers
    routing = [e for e in getattr(predictor, "exits", ()) if tree.config.children(e)]
    if cascade and routing:
        one = len(routing) == 1
        raise ConfigError(f"{', '.join(routing)} route{'s' if one else ''} to branches below {'it' if one else 'them'}, "
                          f"whose answers decide whether {'it answers' if one else 'they answer'}, and an exported "
                          f"graph does not route; serve the tree (branching serve), or export it answering by its full "
                          f"trunk with --no-exits")
    if not isinstance(predictor, TreePredictor) or (predictor.entry is not None and tree.parent.has_head):
        raise ConfigError("export writes the whole routed tree; load it without node= or branch=")
    judged = [n.name for n in predictor.nodes if n.score == "selfeval"]
    if judged:
        raise ConfigError(f"{', '.join(judged)} accept by a self-evaluation branch, which does not export; set "
                          f"score = \"msp\" (or doctor, energy, margin) in their accept tables and train them again")
    if cascade:
        from branching.api.cascade_graph import CascadeGraph
        module = CascadeGraph(predictor, DenseTree(predictor, None)).eval()
        names = module.output_names
    else:
        encoder = tree.kind.export_encoder(tree.parent.shape, predictor.parent_depth()) if tree.kind.encoded else None
        module = DenseTree(predictor, encoder).eval()
        names = [f"probs.{n}" for n in module.names] + [f"logits.{n}" for n in module.names]
    if tree.reads == "texts":  # token ids and their mask, both free in the batch size and the number of tokens
        inputs = ["input_ids", "attention_mask"]
        example = (torch.ones(batch, 8, dtype=torch.long), torch.ones(batch, 8, dtype=torch.long))
        dynamic = {name: {0: "batch", 1: "tokens"} for name in inputs}
    else:
        inputs, example, dynamic = ["pixels"], (torch.zeros(batch, 3 * tree.image_size ** 2),), {"pixels": {0: "batch"}}
    dynamic.update({name: {0: "batch"} for name in names})
    if cascade:  # each exit's rows, and the rest's
        dynamic.update({name: {0: f"rows_{name.split('.', 1)[1]}"} for name in names if name.startswith("rows.")})
        dynamic.update({f"logits.{e}": {0: f"rows_{e}"} for e in predictor.exits})
        dynamic.update({name: {0: "rows_rest"} for name in names if not name.startswith("rows.")
                        and name.split(".", 1)[1] not in predictor.exits})
    for m in predictor.models.values():
        m.net.eval()
    module.requires_grad_(False)  # the tracer takes the frozen weights as the graph's initialisers
    out.parent.mkdir(parents=True, exist_ok=True)  # as the project's other writers do (check_new_file checked it)
    staging = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    traced = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}  # TorchScript's
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bilinear2d_aa", _antialiased_resize(tree.image_size), OPSET)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it fixes (the image side, ...)
            torch.onnx.export(module, example, str(staging), input_names=inputs, output_names=names,
                              dynamic_axes=dynamic, opset_version=OPSET, **traced)
        graph = onnx.load(str(staging))
        entry = graph.metadata_props.add()
        entry.key, entry.value = "branching.tree", json.dumps(tree_metadata(tree, cascade))
        onnx.save(graph, str(staging))
        checked = check_graph(tree, staging, check)
        os.replace(staging, out)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::_upsample_bilinear2d_aa", OPSET)  # other exports: torch's own
        staging.unlink(missing_ok=True)
    return checked


def check_graph(tree, path, n: int) -> Check:
    """PyTorch and the graph on n seeded random images (smooth fields, not noise: a trunk's activations stay in their
    usual range): the largest difference of a probability, and PyTorch's own between answering them together and
    one at a time. Each input must be answered at the same node (a cascade: all but one, whose confidence may sit at
    the threshold). Refuses a graph whose difference is past TOLERANCE and past OWN_FACTOR times PyTorch's own: a
    broken export (an operator of other semantics) is off by 0.1 or more."""
    from branching.api.onnx_tree import OnnxPredictor
    side, rng = tree.image_size, np.random.default_rng(0)
    if tree.reads == "texts":  # texts of 3 to 12 words of the tokenizer's own vocabulary
        words = sorted(w for w in OnnxPredictor.tokenizer_of(tree.parent.shape).get_vocab() if w.isalpha()) or ["text"]
        images = [" ".join(rng.choice(words, rng.integers(3, 13))) for _ in range(n)]
    else:
        coarse = rng.uniform(0, 255, (n, 3, 4, 4)).astype(np.float32)
        images = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(side, side), mode="bilinear")
        images = images.round().clamp(0, 255).reshape(n, -1).numpy()
    ours = tree.forward(tree.encode(images))  # through the frozen network, for an encoded parent
    alone = np.concatenate([tree.forward(tree.encode(images[i:i + 1])).probabilities for i in range(n)])
    theirs = OnnxPredictor(path).predict(images)
    paths = [ours.chains[a] == theirs.chains[b] for a, b in zip(ours.final_node, theirs.final_node)]
    if sum(not same for same in paths) > (1 if getattr(tree.predictor, "exits", ()) else 0):
        raise CheckpointError(f"the exported graph answered {sum(not same for same in paths)} of {n} random inputs at "
                              f"other nodes than PyTorch; nothing was written")
    same = np.asarray(paths)  # a cascade: one input may leave at another exit, its confidence at the threshold
    check = Check(float(np.abs(ours.probabilities - theirs.probabilities)[same].max()) if same.any() else 0.0,
                  float(np.abs(ours.probabilities - alone).max()))
    if not check.difference <= max(TOLERANCE, OWN_FACTOR * check.own):
        raise CheckpointError(f"the exported graph's probabilities differ from PyTorch's by {check.difference:.2g} on "
                              f"random images, more than {TOLERANCE:g} and than {OWN_FACTOR} times PyTorch's own difference "
                              f"between batch sizes ({check.own:.2g}); nothing was written")
    return check


@dataclass(frozen=True)
class Check:
    """How far the graph's probabilities were from PyTorch's, and PyTorch's own from itself across batch sizes (a
    trunk whose activations vary little in some channels magnifies float rounding through its normalisation)."""

    difference: float
    own: float
