"""The Python API: a trained tree in a notebook, answering as `branching predict` does (its one implementation).

    import branching
    tree = branching.load("runs/c6")                    # a run's folder (or its models/)
    tree.classes, tree.nodes
    tree.predict(["a.jpg", pil_image, uint8_array])    # ["wolf", None, ...]; None: uncertain
    tree.predict_proba(images)                         # (N, classes), at full coverage
    tree(images)                                       # one Answer per input: label, score, accepted, path, node
    tree.node("mammals").predict(images)               # one node alone, over its own classes
    tree = branching.fit("configs/cifar100-6.toml", data="../shared/data/cifar100-6", out="runs/c6", seed=0)

Answering is split as a Hugging Face pipeline's is: `preprocess` reads the inputs and prepares them as `run`
prepared image folders' images (or encodes texts), `forward` routes them, `postprocess` makes the answers.
(CIFAR's 32-px rows given to a pretrained tree of 224 px are resized by Pillow here, inside the trunk by `run`: the
pixels differ by less than a grey level, and answers can move; benchmarks/check_resize.py measures by how much.)
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from branching.config.parse import load_config
from branching.config.tree import TreeConfig
from branching.data.images import IMAGE_SUFFIXES, decode_image, image_pixels, shown
from branching.errors import ConfigError, DataError
from branching.models.device import resolve_device
from branching.models.nets import image_side
from branching.tree.checkpoint import load_folder
from branching.tree.predict import NodePredictor
from branching.tree.cascade import Cascade
from branching.tree.routing import BATCH, TreePredictions, TreePredictor
from branching.tree.staged import CascadePredictor


PYTHON_NAMES = {"models": "", "node": "node=", "branch": "branch="}  # how messages name load's arguments
CLI_NAMES = {"models": "--models ", "node": "--node ", "branch": "--branch "}


@dataclass(frozen=True)
class Answer:
    """The tree's answer to one input. `label` is the class when the tree accepts it, else None (uncertain, or
    the input could not be read: `error` says why); `guess` is the class at full coverage."""

    label: str | None
    score: float | None            # the confidence the node compared with its threshold
    accepted: bool
    guess: str | None
    node: str | None               # the node whose answer and score these are
    path: tuple[str, ...]          # from the parent to that node, or to the node that rejected the input
    rejected_at: str | None
    rejected_score: float | None   # the confidence below threshold where the input was rejected
    threshold: float | None        # the threshold the last node on the path compared with (None: it has none)
    error: str | None = None

    def as_dict(self) -> dict:
        return {**asdict(self), "path": list(self.path)}

    @classmethod
    def unreadable(cls, message: str) -> Answer:
        """The answer to an input that could not be read: None, with the one-line reason."""
        return cls(None, None, False, None, None, (), None, None, None, message)


@dataclass
class Prepared:
    """Inputs ready for `forward`: a name per input, what the tree reads for the readable ones (in order), and
    the one-line errors of the others, by position."""

    names: list[str]
    vectors: np.ndarray | list  # the texts, between Tree.read and Tree.encode
    readable: list[int]
    errors: dict[int, str]


class Tree:
    """A trained tree (or one node of it: `node`), loaded once; see the module docstring."""

    def __init__(self, predictor: TreePredictor | NodePredictor, config: TreeConfig, device: torch.device):
        self.predictor, self.config, self.device = predictor, config, device
        self._encoding = threading.Lock()  # a tokenizer (and a trunk's batches) serve one thread at a time
        parent = predictor.models.get("parent")  # None for an exported graph (api.onnx_tree)
        self.parent, self.kind = parent, None if parent is None else parent.net_kind
        if parent is None:
            self.reads, self.image_size = predictor.meta["reads"], predictor.meta["image_size"]
        else:
            self.reads = self.kind.reads  # "images" or "texts"
            self.image_size = None if self.reads == "texts" else (self.kind.side(parent.shape, None)
                                                                  or image_side(parent.architecture[0]))

    @classmethod
    def load(cls, path, device="auto", *, node: str | None = None, branch: str | None = None,
             config=None, exits: bool = True, names: dict = PYTHON_NAMES) -> Tree:
        """The tree a run wrote to `path` (its OUT or OUT/models), or an exported tree (a .onnx file, run by
        onnxruntime; the whole routed tree only). `device`: "auto" (CUDA when there is one), "cpu" or "cuda";
        `config` (a TreeConfig or a TOML path): the tree the files must match; `node`: that node alone, over its
        classes; `branch`: routing from that branch; `exits`: False answers a tree with early exits by its full trunk
        (as if it had none). `names`: how messages name the arguments (CLI_NAMES: as flags)."""
        device = resolve_device(device)
        if Path(path).suffix == ".onnx":  # an exported tree, run by onnxruntime on the CPU
            if node is not None or branch is not None or config is not None:
                raise ConfigError("an exported tree (.onnx) answers as the whole routed tree; node=, branch= and "
                                  "config= need the run's folder")
            from branching.api.onnx_tree import OnnxPredictor
            predictor = OnnxPredictor(path)
            return cls(predictor, predictor.config, device)
        if isinstance(config, (str, os.PathLike)):
            config = load_config(config)
        if node is not None and branch is not None:
            raise ConfigError("pass node= (that node alone) or branch= (routing from that branch), not both")
        config, models = load_folder(path, config, asked=names["models"])
        if branch in config.branches and config.branches[branch].exit and not config.children(branch):
            raise ConfigError(f"{names['branch']}{branch}: an early exit, which routes nothing; pass {names['node']}"
                              f"{branch} for it alone")
        if exits and config.exits() and node is None and branch is None:  # answers at its exits, the trunk run tap by tap
            cascade = Cascade.load(Path(next(iter(models.values())).meta.path).parent, models, config.cascade)
            return cls(CascadePredictor(config, models, cascade, device), config, device)
        predictor = (TreePredictor(config, models, branch, device=device, asked=names["branch"]) if node is None
                     else NodePredictor(config, models, node, device=device, asked=names["node"]))
        return cls(predictor, config, device)

    def node(self, name: str) -> Tree:
        """This tree's node `name` alone, over its own classes (the models are shared, not loaded again)."""
        if self.parent is None:
            raise ConfigError("an exported tree (.onnx) answers as the whole routed tree; load the run's folder to "
                              "ask one node")
        return Tree(NodePredictor(self.config, self.predictor.models, name, device=self.device, asked=""),
                    self.config, self.device)

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes an input can be answered with."""
        return tuple(self.predictor.answerable)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes that can answer: the tree's (from `branch`, that branch's subtree), or `node`'s chain."""
        if isinstance(self.predictor, TreePredictor):
            return tuple(n.name for n in self.predictor.routed) + tuple(getattr(self.predictor, "exit_nodes", ()))
        return tuple(self.predictor.chain)

    @property
    def cascade(self) -> dict | None:
        """A tree answering at early exits: {"exits", "threshold" (None: no exit answers), "rule"}; else None."""
        found = getattr(self.predictor, "cascade", None)
        if found is not None:
            return {"exits": list(found.exits), "threshold": found.threshold, "rule": found.describe()}
        meta = (getattr(self.predictor, "meta", None) or {}).get("cascade")  # an exported cascade
        return None if meta is None else {"exits": [e["name"] for e in meta["exits"]], "threshold": meta["threshold"],
                                          "rule": meta["rule"]}

    @property
    def thresholds(self) -> dict[str, float | None]:
        return dict(self.predictor.thresholds)

    def __repr__(self) -> str:
        parent = "an exported graph" if self.kind is None else self.kind.describe(self.parent.shape)
        return (f"Tree(parent={parent}, nodes={list(self.nodes)}, "
                f"classes={list(self.classes)})")

    # ---- answering ----------------------------------------------------------------------------

    def __call__(self, inputs, batch_size: int = BATCH) -> list[Answer]:
        """One Answer per input, in order (an unreadable input: a warning, and an Answer with its error)."""
        prepared, predictions = self._answer(inputs, batch_size)
        return self.postprocess(prepared, predictions)

    def predict(self, inputs, batch_size: int = BATCH) -> list[str | None]:
        """The class of each input, or None where the tree is uncertain (or could not read it)."""
        prepared, predictions = self._answer(inputs, batch_size)
        return [a.label for a in self.postprocess(prepared, predictions)]

    def predict_proba(self, inputs, batch_size: int = BATCH) -> np.ndarray:
        """(N, classes) at full coverage: each row the calibrated softmax of the node that answered it (0 for
        classes outside that node), so its argmax is the tree's guess; a row of NaN for an unreadable input."""
        prepared, predictions = self._answer(inputs, batch_size)
        out = np.full((len(prepared.names), len(self.classes)), np.nan, np.float32)
        columns = [predictions.classes.index(c) for c in self.classes]  # an entry branch: its classes alone
        out[prepared.readable] = predictions.probabilities[:, columns]
        return out

    def _answer(self, inputs, batch_size: int) -> tuple[Prepared, TreePredictions]:
        prepared = self.preprocess(inputs)
        for message in prepared.errors.values():  # each unreadable input says why; the others are answered
            warnings.warn(message, stacklevel=3)
        return prepared, self.forward(prepared, batch_size)

    def preprocess(self, inputs) -> Prepared:
        """Read every input first (paths, image files' bytes, PIL images, arrays, tensors; texts for a text parent's
        tree) and prepare the readable ones as the training inputs were; the others get a one-line error each."""
        prepared = self.read(inputs)
        prepared.vectors = self.encode(prepared.vectors)
        return prepared

    def read(self, inputs) -> Prepared:
        """preprocess's first half: the readable inputs decoded (pixels (N, 3 * side * side) uint8, or the texts), not
        yet through an encoded parent's frozen network (`encode`, which the server runs on a batch of requests)."""
        items = self._items(inputs)
        names, kept, readable, errors = [], [], [], {}
        for i, item in enumerate(items):
            try:
                name, value = (self._text(i, item) if self.reads == "texts" else self._image(i, item))
            except DataError as e:
                names.append(self._name_of(i, item))
                errors[i] = str(e)
                continue
            names.append(name)
            kept.append(value)
            readable.append(i)
        if self.reads == "texts":
            return Prepared(names, kept, readable, errors)
        side = self.image_size
        return Prepared(names, np.stack(kept) if kept else np.zeros((0, 3 * side * side), np.uint8), readable, errors)

    def encode(self, inputs) -> np.ndarray:
        """What the tree reads of pixels (N, 3 * side * side) or texts: for a parent that encodes its inputs
        through a frozen network, its vectors, as deep as the nodes asked read; else the pixels as they are."""
        if self.kind is None or not self.kind.encoded:  # an exported graph encodes inside it
            return np.asarray(inputs)
        if getattr(self.predictor, "reads_raw", False):  # a cascade runs the trunk itself, tap by tap
            return inputs if self.reads == "texts" else np.asarray(inputs)
        if not len(inputs):
            return np.zeros((0, self.parent.architecture[0]), np.float32)
        with self._encoding:
            return self.kind.encode(self.parent.shape, inputs, self.device, progress=len(inputs) > 100,
                                    depth=self.predictor.parent_depth())

    def forward(self, prepared: Prepared | np.ndarray, batch_size: int = BATCH) -> TreePredictions:
        vectors = prepared.vectors if isinstance(prepared, Prepared) else prepared
        return self.predictor.predict(vectors, batch_size=batch_size)

    def postprocess(self, prepared: Prepared, predictions: TreePredictions) -> list[Answer]:
        """One Answer per input, in order; unreadable inputs answer None with their error."""
        answers: list[Answer | None] = [None] * len(prepared.names)
        for i, message in prepared.errors.items():
            answers[i] = Answer.unreadable(message)
        thresholds = self.thresholds
        for row, i in enumerate(prepared.readable):
            chain = predictions.chains[predictions.final_node[row]]
            rejected = predictions.rejected_level(row) or None
            path = chain[:chain.index(rejected) + 1] if rejected else chain
            guess = predictions.classes[predictions.predicted[row]]
            low = float(predictions.rejected_confidence[row])
            answers[i] = Answer(guess if rejected is None else None, float(predictions.confidence[row]),
                                rejected is None, guess, chain[-1], tuple(path), rejected,
                                None if np.isnan(low) else low, thresholds.get(path[-1]))
        return answers

    # ---- inputs -------------------------------------------------------------------------------

    def _items(self, inputs) -> list:
        """The inputs as a list of single items: one path, text, PIL image or image array is one item; a list,
        tuple, 4-d array or tensor (N images) or rows of the flat layout (N, 3 * side * side) at the tree's side or
        CIFAR's 32 are many (any other 2-d array is one grey image)."""
        if isinstance(inputs, (str, os.PathLike)) or _is_pil(inputs):
            return [inputs]
        if isinstance(inputs, (bytes, bytearray)):
            return [inputs]
        if isinstance(inputs, (np.ndarray, torch.Tensor)):
            flat = (3 * (self.image_size or 0) ** 2, 3 * 32 * 32)  # the tree's own layout, or CIFAR's
            if inputs.ndim == 4 or (inputs.ndim == 2 and self.reads == "images" and inputs.shape[1] in flat):
                return list(inputs)
            return [inputs]
        if isinstance(inputs, (list, tuple)):
            return list(inputs)
        raise DataError(f"inputs of type {type(inputs).__name__}; pass a list of "
                        f"{'texts' if self.reads == 'texts' else 'image paths, PIL images, arrays or tensors'}")

    def _name_of(self, i: int, item) -> str:
        if isinstance(item, str) and self.reads == "texts":
            return item if len(item) <= 60 else item[:57] + "..."
        return shown(item) if isinstance(item, (str, os.PathLike)) else f"input {i}"

    def _text(self, i: int, item) -> tuple[str, str]:
        if not isinstance(item, str):
            raise DataError(f"input {i}: {_what(item)}, and this tree reads texts; pass texts (str)")
        if not item.strip():
            raise DataError(f"input {i}: an empty text; pass texts with words in them")
        if len(item) < 4096 and "\n" not in item and os.path.isfile(item):  # answered, as a text may be anything
            warnings.warn(f"input {i}: {shown(item)} is the name of a file, read as a text; pass the texts themselves "
                          f"(Path(...).read_text()), or the file to `branching predict --texts`", stacklevel=4)
        return self._name_of(i, item), item

    def _image(self, i: int, item) -> tuple[str, np.ndarray]:
        side = self.image_size
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.exists() and path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{shown(item)[:60]}: no such file, and this tree reads images; pass image paths, PIL "
                                f"images, arrays or tensors (texts go to a text parent's tree)")
            return shown(path), decode_image(None, path, side)
        if isinstance(item, (bytes, bytearray, memoryview)):  # an image file's bytes (an upload)
            return f"input {i}", decode_image(bytes(item), f"input {i}", side)
        if _is_pil(item):
            return f"input {i}", image_pixels(item, side)
        if isinstance(item, (np.ndarray, torch.Tensor)):
            from PIL import Image
            return f"input {i}", image_pixels(Image.fromarray(_hwc_uint8(i, item)), side)
        raise DataError(f"input {i}: {_what(item)}; pass image paths, PIL images, arrays or tensors")


def _is_pil(item) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a requirement
        return False
    return isinstance(item, Image.Image)


def _what(item) -> str:
    if isinstance(item, str):
        return f"a text ({item[:30]!r})"
    return f"an object of type {type(item).__name__}"


def _flat_side(width: int) -> int:
    """The side of a flat image of `width` values (3 x side x side, side >= 8), else 0."""
    side = int(round((width / 3) ** 0.5))
    return side if side >= 8 and 3 * side * side == width else 0


def _hwc_uint8(i: int, item) -> np.ndarray:
    """One image array as height x width (x 3) uint8. NumPy arrays are height x width x channels, tensors
    channels x height x width (torchvision's layout); a flat vector is the toolkit's own layout (every R, then
    G, then B). uint8 values are taken as they are, other integers must lie in 0..255, floats in 0..1."""
    tensor = isinstance(item, torch.Tensor)
    a = item.detach().cpu().numpy() if tensor else np.asarray(item)
    if a.ndim == 1:
        side = _flat_side(a.size)
        if not side:
            raise DataError(f"input {i}: a vector of {a.size} values; a flat image holds 3 x side x side (every R, "
                            f"then G, then B)")
        a, tensor = a.reshape(3, side, side), True
    if a.ndim == 3 and (tensor or a.shape[-1] not in (1, 3, 4)) and a.shape[0] in (1, 3, 4):
        a = a.transpose(1, 2, 0)  # channels first -> last
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise DataError(f"input {i}: an array of shape {tuple(item.shape)}; pass one image as height x width x 3 "
                        f"(NumPy) or 3 x height x width (tensor), or grey height x width")
    if a.shape[-1] == 4 and a.ndim == 3:
        a = a[..., :3]  # alpha dropped, as for image files
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise DataError(f"input {i}: float pixels outside 0..1 (or not finite); scale them to 0..1, or pass "
                            f"uint8 0..255")
        return np.rint(a * 255).astype(np.uint8)
    if a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 255:
            raise DataError(f"input {i}: integer pixels outside 0..255; pass uint8 0..255 or floats in 0..1")
        return a.astype(np.uint8)
    raise DataError(f"input {i}: an array of {a.dtype}; pass uint8 0..255 or floats in 0..1")


def load(path, device="auto", *, node: str | None = None, branch: str | None = None, config=None,
         exits: bool = True) -> Tree:
    """branching.load("runs/c6"): see Tree.load."""
    return Tree.load(path, device, node=node, branch=branch, config=config, exits=exits)


def fit(config, data, out, seed: int = 0, *, recipe: str = "default", max_epochs: int | None = None,
        device="auto", progress: bool = True, report: bool = True, download: bool = False) -> Tree:
    """Train and evaluate a tree as `branching run` does (writing `out`), and load it. `config`: a TOML path or a
    TreeConfig."""
    from branching.config.recipes import get_recipe
    from branching.train.run import run
    tree_config = load_config(config) if isinstance(config, (str, os.PathLike)) else config
    run(tree_config, data, out, get_recipe(recipe, max_epochs), seed=seed, download=download, progress=progress,
        report=report, device=resolve_device(device))
    return load(out, device)
