"""The Model: a network of any registered kind (branching.models.kinds: the original's MLP, the CNN, the ViT, a
user's module, a pretrained network's encodings) with Keras-like inference, taps (feature_info,
forward_intermediates), save and load. Training is branching.models.training's.

Every method that takes inputs follows the convention of `as_2d_float`. The model is in eval mode
except while `fit` runs, and on the CPU unless moved (`to`). Under torchrun, fit and every method that maps
inputs in batches (logits, predict, evaluate, get_activations) are collective: every rank calls them alike,
each computing its share (branching.distributed), unless inside `distributed.local()`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax
from torch import nn

from branching import distributed
from branching.fileio import write_bytes
from branching.models import nets
from branching.models.batches import device_batches
from branching.models.checks import (as_2d_float, as_labels, check_architecture, check_int, check_real, check_state_dict,
                                     declared_network, first_line)
from branching.models.kinds import ParentKind, get_kind, resolve_layer
from branching.models.meta import META_SCHEMA, MetaError, meta_from_dict, meta_to_dict
from branching.models.nets import ACTIVATIONS
from branching.models.training import Trainable

__all__ = ["FORMAT", "Model"]

FORMAT = "torchly/1"


class Model(Trainable):
    """A network (an MLP by default; see branching.models.kinds for the others) with Keras-like
    training and inference on flat float32 inputs (N, architecture[0]).

    An MLP is given by its `architecture` [in, hidden..., out], `activation` and `dropout`; another kind by
    `kind`, `architecture` [in, classes], `dropout` (before the head) and `shape` (the kind's keys, defaults
    filled in by its check_shape).
    """

    def __init__(self, architecture, activation="relu", dropout=None, seed=None, kind="mlp", shape=None):
        get_kind(kind)  # an unknown kind is a ValueError here
        self.kind = kind
        self.shape = self.net_kind.check_shape(shape or {})
        self.architecture = check_architecture(architecture, kind)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        self.activation = activation
        self.dropout = None if dropout is None else check_real(dropout, "dropout", lambda v: 0 <= v < 1,
                                                          "None or a float in [0, 1)")
        self.meta = None  # what its file records: a meta.NodeMeta, a meta.JudgeMeta, or None
        self.history: dict | None = None
        declared_network(kind, self.architecture, activation, self.dropout, self.shape)  # its size, on meta
        if seed is None:
            self.net = self._build()
        else:
            seed = check_int(seed, "seed", minimum=0)
            with torch.random.fork_rng(devices=[]):  # reproducible init, global RNG untouched
                torch.manual_seed(seed)
                self.net = self._build()
        self.net.eval()

    def _build(self) -> nn.Module:
        return self.net_kind.build(self.architecture, self.activation, self.dropout, self.shape)

    @property
    def net_kind(self) -> ParentKind:
        """The registered kind of this network (branching.models.kinds)."""
        return get_kind(self.kind)

    def __repr__(self) -> str:
        if not self.net_kind.fingerprinted():
            return f"Model({self.architecture}, activation={self.activation!r}, dropout={self.dropout!r})"
        return f"Model(kind={self.kind!r}, {self.shape}, classes={self.architecture[-1]}, dropout={self.dropout!r})"

    @property
    def has_head(self) -> bool:
        """Whether the network's output is class logits: always, but for a module parent without head = true
        and an encoded parent without classes."""
        return self.net_kind.has_head(self.shape)

    @property
    def n_hidden(self) -> int:
        """Hidden layers of an MLP (0 for other kinds: their taps are in feature_info)."""
        return len(self.architecture) - 2

    @property
    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.net.parameters())

    # ---- inference -------------------------------------------------------------------------

    def logits(self, X, batch_size=4096) -> np.ndarray:
        """Raw outputs, float32 (N, out)."""
        if not self.has_head:
            raise ValueError(f"this parent ({self.net_kind.describe(self.shape)}) has no head; read its taps, or "
                             f"{self.net_kind.head_fix}")
        return self._map_batches(as_2d_float(X, self.architecture[0]), self.net, batch_size)

    def predict_proba(self, X, temperature=1.0) -> np.ndarray:
        """softmax(logits / temperature), float32 (N, out)."""
        temperature = check_real(temperature, "temperature", lambda v: 0 < v < math.inf, "a positive number")
        return softmax(self.logits(X).astype(np.float64) / temperature, axis=1).astype(np.float32)

    def predict(self, X) -> np.ndarray:
        """Predicted class ids, int64 (N,)."""
        return self.logits(X).argmax(axis=1).astype(np.int64)

    def evaluate(self, X, y) -> dict:
        """Mean cross-entropy (no label smoothing) and accuracy."""
        X = as_2d_float(X, self.architecture[0])
        return self._loss_accuracy(X, as_labels(y, len(X), self.architecture[-1], "y"))

    @property
    def feature_info(self) -> list[dict]:
        """The points that can be tapped, in forward order (as timm's `feature_info`), each
        {"name", "layer", "where", "shape", "module", ...}: for an MLP every hidden layer before ("pre") and
        after ("post") its activation, for a CNN every stage, for a ViT every block; `shape` is one image's
        tensor there and `module` names the submodule of .net producing it."""
        return self.net.feature_info

    def tap(self, layer, where=None) -> dict:
        """A feature_info entry: by name, or by index (negative counts from the end); for an MLP `layer` is a
        hidden layer and `where` "pre" or "post" (default "post"), for an encoded parent `where` is the pooling."""
        return self.net_kind.tap(self.feature_info, layer, where)

    def forward_intermediates(self, x: torch.Tensor, taps, stop_early: bool = True):
        """(output, [tensor per tap]) for a batch x; taps are (layer, where) pairs as `tap` takes them.

        With stop_early only the layers up to the deepest tap run and the output is None; otherwise
        the output is the logits. No conversion, no mode change, gradients as the caller has them.
        """
        info = self.feature_info
        indices = [info.index(self.tap(layer, where)) for layer, where in taps]
        return self.net.forward_intermediates(x, indices, stop_early)

    def hidden_forward(self, x: torch.Tensor, layer, where=None) -> torch.Tensor:
        """One tap's tensor for a batch x (forward_intermediates with one tap, stopping there)."""
        return self.forward_intermediates(x, [(layer, where)])[1][0]

    def get_activations(self, X, layer=-1, where=None, pool=None, batch_size=4096) -> np.ndarray:
        """A tap's activations as vectors, float32 (N, width), computing only the layers needed; `pool`
        (default: branching.nets.default_pool) turns a feature map or token sequence into a vector.

        Runs in eval mode without gradients, then restores the model's previous train/eval mode.
        """
        where, pool = self.net_kind.read(where, pool)
        shape = self.tap(layer, where)["shape"]  # validate before converting the input
        how = nets.check_pool(shape, pool or nets.default_pool(shape))
        X = as_2d_float(X, self.architecture[0])
        return self._map_batches(X, lambda xb: nets.pool(self.hidden_forward(xb, layer, where), how), batch_size)

    def width(self, layer, where=None, pool=None) -> int:
        """Width of the vector a tap gives (pooled as get_activations pools it)."""
        where, pool = self.net_kind.read(where, pool)
        shape = self.tap(layer, where)["shape"]
        return nets.pooled_width(shape, pool or nets.default_pool(shape))

    @staticmethod
    def _resolve_layer(layer, n) -> int:
        return resolve_layer(layer, n)

    @contextlib.contextmanager
    def _inference(self):
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.net.train(was_training)

    @property
    def device(self) -> torch.device:
        """Where the network's parameters are (the CPU unless moved, e.g. by device.on_device)."""
        return next(self.net.parameters(), next(self.net.buffers(), torch.empty(0))).device

    def _device(self) -> torch.device:
        return self.device

    def _map_batches(self, X: np.ndarray, fn, batch_size) -> np.ndarray:
        """fn over batches of X on the model's device, concatenated; under torchrun each rank maps its share of
        the rows and every rank gets them all (distributed.over_shards)."""
        batch_size = self.net_kind.batch_rows(self.net, check_int(batch_size, "batch_size", minimum=1))
        return distributed.over_shards(len(X), lambda rows: self._map_rows(X[rows], fn, batch_size))

    def _map_rows(self, X, fn, batch_size) -> np.ndarray:
        device = self._device()
        outputs = []
        with self._inference():
            for xb in device_batches(X, batch_size, device):
                outputs.append(fn(xb).cpu())
                del xb  # before the next batch is made: one batch of inputs at a time
        if not outputs:
            with self._inference():
                return fn(torch.zeros(0, X.shape[1], device=device)).cpu().numpy()
        return torch.cat(outputs).numpy()

    def _loss_accuracy(self, X: np.ndarray, y: np.ndarray, batch_size=4096) -> dict:
        """Mean cross-entropy and accuracy; under torchrun each rank sums its share of the rows and every rank
        gets the same totals (so early stopping decides alike everywhere)."""
        loss_sum, correct = 0.0, 0
        device = self._device()
        rows = distributed.shard(len(y))
        X, y_all, y = X[rows], y, y[rows]
        with self._inference():
            for start in range(0, len(y), batch_size):  # the loss summed over the same batches at any image size
                yb = torch.from_numpy(y[start:start + batch_size]).to(device)
                parts = []
                for xb in device_batches(X[start:start + batch_size], batch_size, device):
                    parts.append(self.net(xb).float())
                    del xb  # one batch of inputs at a time
                out = torch.cat(parts)
                loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
                correct += (out.argmax(dim=1) == yb).sum().item()
        loss_sum, correct = distributed.all_sum(torch.tensor([loss_sum, correct], dtype=torch.float64)).tolist()
        n = len(y_all)
        return {"loss": loss_sum / n if n else math.nan, "accuracy": correct / n if n else math.nan}

    # ---- weights ---------------------------------------------------------------------------

    def freeze(self) -> "Model":
        """Stop all parameters from training and switch to eval mode."""
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()
        return self

    def fingerprint(self) -> str:
        """16 hex chars of sha256 over architecture, activation (and kind and shape) and every state_dict
        tensor."""
        described = [self.architecture, self.activation] + ([self.kind, self.shape] if self.net_kind.fingerprinted()
                                                            else [])
        digest = hashlib.sha256(json.dumps(described).encode())
        for name, tensor in self.net.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, path, meta=None) -> None:
        """Write one file atomically, with `meta` (a meta.NodeMeta or meta.JudgeMeta, or None) as a plain dict of
        schema meta.META_SCHEMA; it loads with torch.load(path, weights_only=True)."""
        payload = {"format": FORMAT, "architecture": list(self.architecture), "activation": self.activation,
                   "dropout": self.dropout, "state_dict": dict(self.net.state_dict()),
                   "meta": clean_meta(meta_to_dict(meta), "meta"), "meta_schema": META_SCHEMA}
        if self.net_kind.fingerprinted():
            payload.update(kind=self.kind, shape=dict(self.shape))
        buffer = io.BytesIO()  # whole before any byte is written: a full disk is then the writer's one-line error
        torch.save(payload, buffer)
        write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path) -> "Model":
        """Read a file written by save; the model comes back in eval mode with .meta set (meta.meta_from_dict:
        files of an older schema are read, those of a newer one refused)."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file not found: {path}")
        try:
            payload = torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: the unsafe way
            raise ValueError(f"{path} is refused: it holds objects other than tensors and plain data, which a "
                             f"model file of this project never holds, and loading them could run code") from e
        except Exception as e:
            raise ValueError(f"{path} is not a readable model file of this project ({first_line(e)})") from e
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a model file of this project (expected format {FORMAT!r})")
        try:
            args = (payload["architecture"], payload["activation"], payload["dropout"])
            kind, shape = payload.get("kind", "mlp"), payload.get("shape")
            check_state_dict(*args, kind, shape, payload["state_dict"])
            model = cls(*args, seed=0, kind=kind, shape=shape)
            model.net.load_state_dict(payload["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path} is a damaged model file of this project ({first_line(e)})") from e
        try:
            model.meta = meta_from_dict(payload.get("meta") or {}, payload.get("meta_schema"))
        except MetaError as e:
            raise ValueError(f"{path} cannot be read: {e}") from None
        if model.meta is not None:
            model.meta.path = path
        return model


def clean_meta(value, key):
    """Copy meta into types torch.load(weights_only=True) accepts; numpy -> tensors / Python scalars."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        try:
            return torch.from_numpy(np.array(value))
        except (TypeError, ValueError):
            raise TypeError(f"{key}: numpy array of dtype {value.dtype} cannot be stored") from None
    if isinstance(value, np.generic):
        return clean_meta(value.item(), key)
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, dict):
        cleaned = {}
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError(f"{key}: keys must be str; got {k!r}")
            cleaned[k] = clean_meta(v, f"{key}[{k!r}]")
        return cleaned
    if isinstance(value, (list, tuple)):
        return [clean_meta(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{key}: cannot store a {type(value).__name__} "
                    "(allowed: dict, list, str, int, float, bool, None, tensor, numpy array)")
