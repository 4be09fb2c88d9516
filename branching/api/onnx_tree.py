"""An exported tree (`branching export`) run with onnxruntime, answering as the PyTorch tree does.

The graph gives every node's logits for a batch; routing and acceptance are the PyTorch tree's own
(`TreePredictor._route`), walking nodes whose trunk is a look-up of those logits by row. A tree with early exits
(api.cascade_graph) gives each exit's logits for the rows it answered and the tree's for the rest: an exit's answer
is routed from it alone (it rejects nothing: the graph's threshold chose its rows), the rest's from the parent.
"""

from __future__ import annotations

import importlib
import json
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from branching.config.parse import config_from_dict
from branching.errors import CheckpointError, MissingPackageError
from branching.tree.routing import BATCH, TreePredictions, TreePredictor, _Node

FORMAT = "branching.onnx/1"
ROWS = ("rows",)  # what every child of a row node reads: the rows routed to it
TEXT_GROUP = 32  # texts of similar length run together


def needs(module: str):
    """An optional package of export and .onnx trees (onnx, onnxruntime), or a one-line error naming the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(f"{module} is not installed; pip install onnx onnxruntime (export and .onnx trees "
                                  f"need them)") from None


class _RowNode(_Node):
    """A node of an exported tree: its rule from the file's metadata, its logits looked up by row."""

    def __init__(self, index: int, spec, tree_classes, record: dict, batch: threading.local):
        self.index, self.name, self.spec, self.reads = index, spec.name, spec, ROWS
        self.routing_state(spec, tree_classes, {"temperature": record["temperature"], "threshold": record["threshold"]},
                           record["score"], record["temperature"])
        self.batch = batch  # .logits: {node: this thread's batch's logits}, filled by OnnxPredictor

    def trunk(self, rows: torch.Tensor) -> tuple[np.ndarray, dict]:
        index = rows.numpy()
        return self.batch.logits[self.name][index].copy(), {ROWS: index}


class OnnxPredictor(TreePredictor):
    """TreePredictor's interface over an exported graph (one onnxruntime session)."""

    def __init__(self, path, threads: int | None = None):
        onnxruntime = needs("onnxruntime")
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file; pass an .onnx file written by branching export")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy waiting between calls
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for files it cannot read
            raise CheckpointError(f"{path}: not an ONNX graph onnxruntime can load ({' '.join(str(e).split())[:120]}); "
                                  f"export the tree again") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get("branching.tree")
        meta = json.loads(raw) if raw else {}
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a tree written by branching export ({FORMAT}); export one with "
                                  f"branching export --models RUN --out FILE.onnx")
        self.meta = meta
        self.config = config_from_dict(meta["config"])
        self.classes = tuple(meta["classes"])
        self.batch = threading.local()  # each thread's batch of logits: one session serves threads at once
        records = {r["name"]: r for r in meta["nodes"]}
        self.nodes = [_RowNode(i, spec, self.classes, records[spec.name], self.batch)
                      for i, spec in enumerate(self.config.nodes())]
        by_name = {n.name: n for n in self.nodes}
        for node in self.nodes:
            node.add_children([by_name[c.name] for c in self.config.children(node.name) if not c.new_classes])
        self.root, self.models = self.nodes[0], {}
        self.entry = None if meta.get("entry") is None else by_name[meta["entry"]]  # a parent without a head's branch
        self.chains = tuple(tuple(self.config.chain(n.name)) for n in self.nodes)
        self.cascade_exits: list[_RowNode] = []  # a cascade's exits, answering before the tree (their paths: the exit alone)
        for record in (meta.get("cascade") or {}).get("exits", ()):
            spec = replace(self.config.parent, name=record["name"], classes=tuple(record["classes"]), source="parent",
                           layer=record["layer"], exit=True)
            threshold = meta["cascade"]["threshold"]  # shown as the exit's; the graph applied it
            node = _RowNode(len(self.nodes), spec, self.classes, {**record, "threshold": threshold, "score": "msp"},
                            self.batch)
            node.threshold = -np.inf
            self.nodes.append(node)
            self.cascade_exits.append(node)
        self.chains += tuple((node.name,) for node in self.cascade_exits)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.width = self.session.get_inputs()[0].shape[1]
        shape = self.config.parent.shape_dict
        self.tokenizer = self.tokenizer_of(shape) if meta["reads"] == "texts" else None
        self.max_length = shape.get("max_length")
        self.tokenizing = threading.Lock()

    @staticmethod
    def tokenizer_of(shape: dict):
        """A text parent's tokenizer alone (its transformer is in the graph), from the model found on this machine."""
        from transformers import AutoTokenizer

        from branching.models.encoder import resolve_model
        return AutoTokenizer.from_pretrained(resolve_model(shape["model"]), local_files_only=True)

    def _feeds(self, chunk):
        """(positions in the chunk, the graph's inputs for them): a chunk of pixels as float32 at once, or texts as
        token ids cut at max_length, in groups of similar length (as the PyTorch encoder batches them: padding stays
        short)."""
        if self.tokenizer is None:
            yield np.arange(len(chunk)), {self.inputs[0]: np.ascontiguousarray(chunk, dtype=np.float32)}
            return
        from branching.models.encoder import padded
        with self.tokenizing:  # a fast tokenizer is not safe across threads; the session is
            ids = self.tokenizer(list(chunk), add_special_tokens=True, truncation=True, max_length=self.max_length,
                                 verbose=False)["input_ids"]
        order = np.argsort([len(t) for t in ids], kind="stable")
        for group in np.array_split(order, -(-len(ids) // TEXT_GROUP)):
            input_ids, mask = padded([ids[i] for i in group], self.tokenizer.pad_token_id or 0)
            yield group, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()}

    def _run(self, wanted: list[str], chunk) -> list[np.ndarray]:
        """The graph's outputs `wanted` (one row an input) for a chunk, in the chunk's order."""
        out: list[np.ndarray] = []
        for group, feed in self._feeds(chunk):
            found = self.session.run(wanted, feed)
            out = out or [np.empty((len(chunk), *f.shape[1:]), f.dtype) for f in found]
            for whole, part in zip(out, found):
                whole[group] = part
        return out

    def parent_depth(self) -> int:
        return 0

    def _predict(self, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
        n = len(images)
        arrays = self._arrays(n)
        given = {o.name for o in self.session.get_outputs()}
        answering = [node for node in self.nodes if f"logits.{node.name}" in given and node not in self.cascade_exits]
        wanted = [f"logits.{node.name}" for node in answering]
        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            batch = {k: v[start:start + batch_size] for k, v in arrays.items()}
            if self.cascade_exits:
                self._cascade(chunk, answering, batch)
                continue
            found = self._run(wanted, chunk)
            self.batch.logits = {node.name: value for node, value in zip(answering, found)}
            self._route(self.root if self.entry is None else self.entry, torch.arange(len(chunk)), None, batch)
            if self.entry is not None:
                batch["parent_predicted"][:] = -1
        return arrays

    def _cascade(self, chunk, answering: list, batch: dict) -> None:
        """A chunk through a cascade's graph: each exit's rows answered by it alone, the rest routed from the parent."""
        wanted = [name for node in self.cascade_exits for name in (f"rows.{node.name}", f"logits.{node.name}")]
        wanted += ["rest.rows"] + [f"logits.{node.name}" for node in answering]
        for group, feed in self._feeds(chunk):
            found = self.session.run(wanted, feed)
            k = 2 * len(self.cascade_exits)
            parts = [(node, found[2 * j], {node.name: found[2 * j + 1]}) for j, node in enumerate(self.cascade_exits)]
            real = found[k] >= 0  # a text graph's stand-in row (-1), where every input had left
            parts.append((self.root, found[k][real], {node.name: v[real] for node, v in zip(answering, found[k + 1:])}))
            for node, rows, logits in parts:
                if not len(rows):
                    continue
                self.batch.logits = logits
                part = self._arrays(len(rows))
                self._route(node, torch.arange(len(rows)), None, part)
                for key, value in part.items():
                    batch[key][group[rows]] = value

    def predict(self, images, batch_size: int = BATCH) -> TreePredictions:
        """Images (N, 3 * side * side), or a text parent's texts, through the graph and the tree's routing."""
        if self.tokenizer is not None:
            return TreePredictions(self.classes, self.node_names, self.chains, **self._predict(list(images), batch_size))
        images = np.asarray(images)
        images = images[None] if images.ndim == 1 else images
        if images.ndim != 2 or images.shape[1] != self.width:
            raise CheckpointError(f"images must have shape (N, {self.width}); got {images.shape}")
        return TreePredictions(self.classes, self.node_names, self.chains, **self._predict(images, batch_size))
