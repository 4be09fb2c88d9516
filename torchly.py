"""torchly: small Keras-like networks on PyTorch (build, fit, predict, activations, save/load): the
original's MLP, the CNN and ViT of branching.nets, and any torch module (kind "module", frozen).

Every method that takes inputs follows the convention of `as_2d_float`. The model is in eval
mode except while `fit` runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax
from torch import nn
from tqdm import tqdm

from branching import nets
from branching.fileio import atomic_path
from branching.nets import ACTIVATIONS, KINDS, WHERE

__all__ = ["ACTIVATIONS", "FORMAT", "KINDS", "Model", "as_2d_float"]

FORMAT = "torchly/1"
MAX_PARAMETERS = 250_000_000  # 1 GiB of float32 weights (4 GiB while training with Adam): far beyond this MLP's uses
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = (None, "cosine", "onecycle")
MONITORS = ("val_loss", "val_accuracy")


DEVICE = torch.device("cpu")  # where Model.fit trains (use_device sets it); inference runs on the CPU


def use_device(name: str = "auto") -> torch.device:
    """Make `name` ("auto": CUDA when available, "cpu", "cuda", "cuda:N") where Model.fit trains; on CUDA
    with mixed precision (bfloat16 autocast) where the GPU supports it. Returns the device."""
    global DEVICE
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"no CUDA device here (torch {torch.__version__}, built for "
                         f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'the CPU only'}); use cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {name!r}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"no {device} here: {torch.cuda.device_count()} CUDA device(s); use cuda, cpu or auto")
    DEVICE = device
    return device


def as_2d_float(X, width=None) -> np.ndarray:
    """Array, tensor or [array] -> float32 (N, width); (1, N, w) drops its first axis, (w,) becomes (1, w)."""
    if isinstance(X, (list, tuple)) and len(X) == 1 and isinstance(X[0], (np.ndarray, torch.Tensor)):
        X = X[0]
    if isinstance(X, torch.Tensor):
        X = X.detach().to("cpu", torch.float32).numpy()
    try:
        arr = np.asarray(X, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"input cannot be converted to a float32 array: {_first_line(e)}") from e
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    elif arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or (width is not None and arr.shape[1] != width):
        expected = "(N, features)" if width is None else f"(N, {width})"
        raise ValueError(f"expected input of shape {expected}, got shape {arr.shape}")
    return arr


class Model:
    """A network (an MLP by default; see branching.nets for the CNN and the ViT) with Keras-like
    training and inference on flat float32 inputs (N, architecture[0]).

    An MLP is given by its `architecture` [in, hidden..., out], `activation` and `dropout`; a CNN or a
    ViT by `kind`, `architecture` [in, classes], `dropout` (before the head) and `shape` (its keys in
    branching.nets.SHAPES, defaults filled in).
    """

    def __init__(self, architecture, activation="relu", dropout=None, seed=None, kind="mlp", shape=None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        self.kind = kind
        self.shape = nets.check_shape(kind, shape or {})
        self.architecture = _check_architecture(architecture, kind)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
        self.activation = activation
        self.dropout = None if dropout is None else _real(dropout, "dropout", lambda v: 0 <= v < 1,
                                                          "None or a float in [0, 1)")
        self.meta: dict = {}
        self.history: dict | None = None
        declared_network(kind, self.architecture, activation, self.dropout, self.shape)  # its size, on meta
        if seed is None:
            self.net = self._build()
        else:
            seed = _int(seed, "seed", minimum=0)
            with torch.random.fork_rng(devices=[]):  # reproducible init, global RNG untouched
                torch.manual_seed(seed)
                self.net = self._build()
        self.net.eval()

    def _build(self) -> nn.Module:
        return nets.build(self.kind, self.architecture, self.activation, self.dropout, self.shape)

    def __repr__(self) -> str:
        if self.kind == "mlp":
            return f"Model({self.architecture}, activation={self.activation!r}, dropout={self.dropout!r})"
        return f"Model(kind={self.kind!r}, {self.shape}, classes={self.architecture[-1]}, dropout={self.dropout!r})"

    @property
    def has_head(self) -> bool:
        """Whether the network's output is class logits: always, but for a module parent (kind "module")
        without head = true."""
        return self.kind != "module" or self.shape["head"]

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
            raise ValueError(f"this {self.shape['module']} parent has no head (its outputs are not the classes); "
                             f"read its taps, or set head = true where its outputs are the classes in order")
        return self._map_batches(as_2d_float(X, self.architecture[0]), self.net, batch_size)

    def predict_proba(self, X, temperature=1.0) -> np.ndarray:
        """softmax(logits / temperature), float32 (N, out)."""
        temperature = _real(temperature, "temperature", lambda v: 0 < v < math.inf, "a positive number")
        return softmax(self.logits(X).astype(np.float64) / temperature, axis=1).astype(np.float32)

    def predict(self, X) -> np.ndarray:
        """Predicted class ids, int64 (N,)."""
        return self.logits(X).argmax(axis=1).astype(np.int64)

    def evaluate(self, X, y) -> dict:
        """Mean cross-entropy (no label smoothing) and accuracy."""
        X = as_2d_float(X, self.architecture[0])
        return self._loss_accuracy(X, _as_labels(y, len(X), self.architecture[-1], "y"))

    @property
    def feature_info(self) -> list[dict]:
        """The points that can be tapped, in forward order (as timm's `feature_info`), each
        {"name", "layer", "where", "shape", "module", ...}: for an MLP every hidden layer before ("pre") and
        after ("post") its activation, for a CNN every stage, for a ViT every block; `shape` is one image's
        tensor there and `module` names the submodule of .net producing it."""
        return self.net.feature_info

    def tap(self, layer, where=None) -> dict:
        """A feature_info entry: by name, or by index (negative counts from the end) with, for an MLP,
        `layer` a hidden layer and `where` "pre" or "post" (default "post")."""
        info = self.feature_info
        if isinstance(layer, str):
            found = [i for i in info if i["name"] == layer]
            if not found:
                raise ValueError(f"no tap named {layer!r}; taps are {', '.join(i['name'] for i in info)}")
            if where is not None and where != found[0]["where"]:
                raise ValueError(f"tap {layer!r} is {found[0]['where']!r}, not {where!r}")
            return found[0]
        if self.kind == "mlp":
            where = "post" if where is None else where
            if where not in WHERE:
                raise ValueError(f"where must be 'pre' or 'post'; got {where!r}")
            return info[2 * self._resolve_layer(layer, self.n_hidden) + WHERE.index(where)]
        if where is not None:
            raise ValueError(f"where is for MLP layers; a {self.kind}'s taps are {', '.join(i['name'] for i in info)}")
        return info[self._resolve_layer(layer, len(info))]

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
        shape = self.tap(layer, where)["shape"]  # validate before converting the input
        how = nets.check_pool(shape, pool or nets.default_pool(shape))
        X = as_2d_float(X, self.architecture[0])
        return self._map_batches(X, lambda xb: nets.pool(self.hidden_forward(xb, layer, where), how), batch_size)

    def width(self, layer, where=None, pool=None) -> int:
        """Width of the vector a tap gives (pooled as get_activations pools it)."""
        shape = self.tap(layer, where)["shape"]
        return nets.pooled_width(shape, pool or nets.default_pool(shape))

    @staticmethod
    def _resolve_layer(layer, n) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layer must be an int or a tap name; got {layer!r}")
        if n == 0:
            raise ValueError("model has no hidden layers")
        if not -n <= layer < n:
            raise ValueError(f"layer {layer} out of range: valid layers are {-n}..{n - 1}")
        return int(layer) % n

    @contextlib.contextmanager
    def _inference(self):
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.net.train(was_training)

    def _device(self) -> torch.device:
        return next(self.net.parameters(), torch.empty(0)).device

    def _map_batches(self, X: np.ndarray, fn, batch_size) -> np.ndarray:
        batch_size = _int(batch_size, "batch_size", minimum=1)
        device = self._device()
        with self._inference():
            outputs = [fn(xb.to(device)).cpu() for xb in torch.split(torch.from_numpy(_writable(X)), batch_size)]
        return torch.cat(outputs).numpy()

    def _loss_accuracy(self, X: np.ndarray, y: np.ndarray, batch_size=4096) -> dict:
        loss_sum, correct = 0.0, 0
        device = self._device()
        with self._inference():
            for xb, yb in zip(torch.split(torch.from_numpy(_writable(X)), batch_size),
                              torch.split(torch.from_numpy(y), batch_size)):
                xb, yb = xb.to(device), yb.to(device)
                out = self.net(xb).float()
                loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
                correct += (out.argmax(dim=1) == yb).sum().item()
        n = len(y)
        return {"loss": loss_sum / n if n else math.nan, "accuracy": correct / n if n else math.nan}

    # ---- training --------------------------------------------------------------------------

    def fit(self, X, y, validation_data=None, epochs=10, batch_size=64, lr=1e-3, weight_decay=0.0,
            optimizer="adam", label_smoothing=0.0, early_stopping_patience=None, monitor="val_loss",
            restore_best_weights=True, lr_schedule=None, train_transform=None, seed=None,
            progress=True, desc="train") -> dict:
        """Mini-batch training on cross-entropy; returns the history (also kept as .history)."""
        if self.kind == "module":
            raise ValueError("a module parent is never trained here: it is loaded from its weights file")
        n_in, n_out = self.architecture[0], self.architecture[-1]
        X = as_2d_float(X, None if train_transform is not None else n_in)
        if len(X) == 0:
            raise ValueError("cannot fit on an empty dataset")
        y = _as_labels(y, len(X), n_out, "y")
        val = None
        if validation_data is not None:
            if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
                raise ValueError("validation_data must be a pair (X_val, y_val)")
            X_val = as_2d_float(validation_data[0], n_in)
            val = (X_val, _as_labels(validation_data[1], len(X_val), n_out, "y_val"))
        epochs = _int(epochs, "epochs", minimum=1)
        batch_size = _int(batch_size, "batch_size", minimum=1)
        patience = None if early_stopping_patience is None else _int(
            early_stopping_patience, "early_stopping_patience", minimum=0)
        _check_choice(optimizer, OPTIMIZERS, "optimizer")
        _check_choice(lr_schedule, LR_SCHEDULES, "lr_schedule")
        _check_choice(monitor, MONITORS, "monitor")
        lr = _real(lr, "lr", lambda v: 0 < v < math.inf, "a positive number")
        weight_decay = _real(weight_decay, "weight_decay", lambda v: 0 <= v < math.inf, "a number >= 0")
        label_smoothing = _real(label_smoothing, "label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)")
        params = [p for p in self.net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model is frozen: it has no trainable parameters")
        self.net.to(DEVICE)  # the parameters move in place; back to the CPU when fit ends

        if seed is not None:
            torch.manual_seed(_int(seed, "seed", minimum=0))  # dropout uses the global RNG
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
        opt = _make_optimizer(optimizer, params, lr, weight_decay)
        scheduler = _make_scheduler(lr_schedule, opt, lr, epochs * math.ceil(len(X) / batch_size))
        Xt, yt = torch.from_numpy(_writable(X)), torch.from_numpy(y)

        history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": [], "lr": []}
        sign = 1.0 if monitor == "val_loss" else -1.0  # compare as "smaller is better"
        best, best_epoch, best_state, wait, stopped_early = math.inf, 0, None, 0, False
        start = time.perf_counter()
        bar = tqdm(range(1, epochs + 1), desc=desc, disable=not progress, file=sys.stderr, unit="epoch")
        try:
            for epoch in bar:
                loss, accuracy = self._train_epoch(Xt, yt, opt, scheduler, batch_size, label_smoothing,
                                                   train_transform, generator)
                history["loss"].append(loss)
                history["accuracy"].append(accuracy)
                history["lr"].append(float(opt.param_groups[0]["lr"]))
                postfix = {"loss": f"{loss:.4f}"}
                if val is not None:
                    metrics = self._loss_accuracy(*val)
                    history["val_loss"].append(metrics["loss"])
                    history["val_accuracy"].append(metrics["accuracy"])
                    postfix.update(val_loss=f"{metrics['loss']:.4f}", val_acc=f"{metrics['accuracy']:.4f}")
                    current = sign * metrics["loss" if monitor == "val_loss" else "accuracy"]
                    if current < best:
                        best, best_epoch, wait = current, epoch, 0
                        if restore_best_weights:
                            best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                    else:
                        wait += 1
                        stopped_early = patience is not None and wait >= patience
                bar.set_postfix(postfix)
                if stopped_early:
                    break
        finally:
            bar.close()
            self.net.eval()
            self.net.to("cpu")
        if best_state is not None:
            self.net.load_state_dict(best_state)
        epochs_run = len(history["loss"])
        history.update(epochs_run=epochs_run, best_epoch=best_epoch if val is not None else epochs_run,
                       stopped_early=stopped_early, seconds=time.perf_counter() - start)
        self.history = history
        return history

    def _train_epoch(self, Xt, yt, opt, scheduler, batch_size, label_smoothing, transform, generator):
        """One shuffled pass in train mode; returns the epoch's mean training loss and accuracy."""
        self.net.train()
        loss_sum, correct = 0.0, 0
        device = self._device()
        mixed = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and torch.cuda.is_bf16_supported()
                 else contextlib.nullcontext())
        for idx in torch.randperm(len(Xt), generator=generator).split(batch_size):
            xb, yb = Xt[idx], yt[idx]
            if transform is not None:
                xb = transform(xb, generator)
                if not isinstance(xb, torch.Tensor) or tuple(xb.shape) != (len(idx), self.architecture[0]):
                    got = tuple(xb.shape) if isinstance(xb, torch.Tensor) else type(xb).__name__
                    raise ValueError(f"train_transform must return a tensor of shape "
                                     f"({len(idx)}, {self.architecture[0]}); got {got}")
                xb = xb.to(torch.float32)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with mixed:
                out = self.net(xb)
                loss = F.cross_entropy(out.float(), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(dim=1) == yb).sum().item()
        return loss_sum / len(Xt), correct / len(Xt)

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
        described = [self.architecture, self.activation] + ([] if self.kind == "mlp" else [self.kind, self.shape])
        digest = hashlib.sha256(json.dumps(described).encode())
        for name, tensor in self.net.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"|{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def save(self, path, meta=None) -> None:
        """Write one file atomically; it loads with torch.load(path, weights_only=True)."""
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict; got {type(meta).__name__}")
        payload = {"format": FORMAT, "architecture": list(self.architecture), "activation": self.activation,
                   "dropout": self.dropout, "state_dict": dict(self.net.state_dict()),
                   "meta": _clean_meta(meta or {}, "meta")}
        if self.kind != "mlp":
            payload.update(kind=self.kind, shape=dict(self.shape))
        with atomic_path(path, "wb") as f:
            torch.save(payload, f)

    @classmethod
    def load(cls, path) -> "Model":
        """Read a file written by save; the model comes back in eval mode with .meta set."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"model file not found: {path}")
        try:
            payload = torch.load(path, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: the unsafe way
            raise ValueError(f"{path} is refused: it holds objects other than tensors and plain data, which a "
                             f"torchly model file never does, and loading them could run code") from e
        except Exception as e:
            raise ValueError(f"{path} is not a readable torchly model file ({_first_line(e)})") from e
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"{path} is not a torchly model file (expected format {FORMAT!r})")
        try:
            args = (payload["architecture"], payload["activation"], payload["dropout"])
            kind, shape = payload.get("kind", "mlp"), payload.get("shape")
            _check_state_dict(*args, kind, shape, payload["state_dict"])
            model = cls(*args, seed=0, kind=kind, shape=shape)
            model.net.load_state_dict(payload["state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path} is a corrupt torchly model file ({_first_line(e)})") from e
        model.meta = payload.get("meta") or {}
        return model


# ---- helpers ---------------------------------------------------------------------------------

def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]


def _int(value, name, minimum) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


def _real(value, name, ok, expected) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not ok(value):
        raise ValueError(f"{name} must be {expected}; got {value!r}")
    return float(value)


def _check_choice(value, choices, name) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_architecture(architecture, kind="mlp") -> list:
    if isinstance(architecture, (str, bytes)) or not isinstance(architecture, (list, tuple, np.ndarray)):
        raise ValueError(f"architecture must be a list of ints [in, hidden..., out]; got {architecture!r}")
    arch = list(architecture)
    if len(arch) < 2 or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in arch):
        raise ValueError(f"architecture must be at least 2 ints, all >= 1; got {arch!r}")
    if kind != "mlp" and (len(arch) != 2 or arch[0] != math.prod(nets.IMAGE)):
        raise ValueError(f"a {kind}'s architecture is [{math.prod(nets.IMAGE)}, classes]; got {arch!r}")
    return [int(w) for w in arch]


def declared_network(kind, architecture, activation="relu", dropout=None, shape=None) -> nn.Module:
    """The network these arguments declare, checked, built on torch's meta device (no weights are
    allocated), and refused if it has more than MAX_PARAMETERS parameters."""
    shape = nets.check_shape(kind, shape or {})
    arch = _check_architecture(architecture, kind)
    with torch.device("meta"):
        net = nets.build(kind, arch, activation, dropout, shape)
    n = sum(p.numel() for p in net.parameters())
    if n > MAX_PARAMETERS:
        raise ValueError(f"architecture {_describe(kind, arch, shape)} has {n:,} parameters ({4 * n / 2**30:.1f} GiB "
                         f"of float32), more than the limit of {MAX_PARAMETERS:,}; use narrower layers")
    return net


def _describe(kind, architecture, shape) -> str:
    return str(architecture) if kind == "mlp" else f"{kind} {shape}"


def _check_state_dict(architecture, activation, dropout, kind, shape, state_dict) -> None:
    """The stored tensors must be exactly those the declared network has (compared on its meta-device
    copy): a file that declares huge layers and stores small tensors would otherwise allocate the huge
    ones before loading fails."""
    declared = declared_network(kind, architecture, activation, dropout, shape)
    described = _describe(kind, _check_architecture(architecture, kind), nets.check_shape(kind, shape or {}))
    expected = {k: tuple(v.shape) for k, v in declared.state_dict().items()}
    if not isinstance(state_dict, dict):
        raise ValueError("state_dict is not a dict")
    got = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state_dict.items()}
    if got != expected:
        wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))[:1]
        detail = ", ".join(f"{k}: stored {got.get(k, 'nothing')}, declared {expected.get(k, 'nothing')}" for k in wrong)
        raise ValueError(f"the stored tensors do not match the declared architecture {described} ({detail})")
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and v.dtype != torch.float32]
    if bad:
        raise ValueError(f"tensor {bad[0]} is {state_dict[bad[0]].dtype}, not float32")


def _as_labels(y, n, n_classes, name) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"{name} must be a 1-D array of {n} class ids; got shape {y.shape}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if y.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class ids; got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"{name} must be class ids in [0, {n_classes}); got values in [{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _writable(arr: np.ndarray) -> np.ndarray:
    """torch.from_numpy warns on read-only arrays (e.g. memory maps); copy those."""
    return arr if arr.flags.writeable else arr.copy()


def _make_optimizer(name, params, lr, weight_decay):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def _make_scheduler(name, opt, lr, total_steps):
    """Per-step schedules over the whole run."""
    if name == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)
    return None


def _clean_meta(value, key):
    """Copy meta into types torch.load(weights_only=True) accepts; numpy -> tensors / Python scalars."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, np.ndarray):
        try:
            return torch.from_numpy(np.array(value))
        except (TypeError, ValueError):
            raise TypeError(f"{key}: numpy array of dtype {value.dtype} cannot be stored") from None
    if isinstance(value, np.generic):
        return _clean_meta(value.item(), key)
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, dict):
        cleaned = {}
        for k, v in value.items():
            if type(k) is not str:
                raise TypeError(f"{key}: keys must be str; got {k!r}")
            cleaned[k] = _clean_meta(v, f"{key}[{k!r}]")
        return cleaned
    if isinstance(value, (list, tuple)):
        return [_clean_meta(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{key}: cannot store a {type(value).__name__} "
                    "(allowed: dict, list, str, int, float, bool, None, tensor, numpy array)")
