"""Bring your own parent: any importable torch.nn.Module, frozen, tapped by module name.

`[parent] kind = "module"` names a callable ("package.module:callable") that returns an nn.Module, its
keyword arguments and a local state_dict file. `ModuleNet` wraps the module with the interface of the
project's own networks: flat images (N, 3 * side * side) in, resized to `input_size` where the data's
images are of another side; `feature_info` lists its
submodules (at most two levels deep, called once per forward pass, with a tensor output) with the shape
found by one forward pass of a dummy image (on torch's meta device where the module allows it); and
`forward_intermediates` taps them with forward hooks, stopping the forward pass at the deepest tap.

Nothing here downloads or trains anything. The module's own output (its head) is only used as class
logits when the config says `head = true`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import os
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from branching.errors import ConfigError

SIDE = 32                       # CIFAR's side; input_size's default
INPUT_SIZES = (8, 1024)         # the range of input_size
TAP_DEPTH = 2                   # taps: submodules at most this many levels below the root
SPEC_KEYS = ("module", "kwargs", "weights", "input_size", "mean", "std", "head")
MODEL_KEYS = ("module", "kwargs", "input_size", "head", "weights_sha256")  # what the network's shape records
BATCH_BYTES = 64 * 2**20  # float32 images at the module's input_size in one batch (its feature maps are larger still)
MAX_PARAMETERS = 250_000_000  # torchly.MAX_PARAMETERS (which imports this module): no real build beyond it
CALLABLE = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*")


class _StopForward(Exception):
    """Raised by the deepest tap's hook: the rest of the forward pass is not needed."""


# ---- the user's module ------------------------------------------------------------------------

_TRUSTED: set[str] = set()  # module paths named by a config the user passed (load_config, parse_config)


def trust(path) -> None:
    """Let `path` be imported and called in this process. Only configs the user passes do this: a module
    path recorded in a model file may come from anyone, and loading it would run its code."""
    if isinstance(path, str):
        _TRUSTED.add(path)


def load_callable(path: str):
    """The callable that "package.module:callable" names; ValueError (one line) if it cannot be had."""
    if not isinstance(path, str) or not CALLABLE.fullmatch(path):
        raise ValueError(f"module must be \"package.module:callable\" (e.g. \"torchvision.models:resnet18\"); "
                         f"got {path!r}")
    if path not in _TRUSTED:
        raise ValueError(f"module {path!r} is named by a model file, not by a config you passed, and loading it "
                         f"would import and call that code; if you trust it, pass --config with the tree's TOML")
    name, attribute = path.split(":")
    try:
        found = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any failure of the user's import is reported in one line
        raise ValueError(f"module {path!r}: cannot import {name!r} ({type(e).__name__}: {_first_line(e)}); "
                         f"install it, put its folder on PYTHONPATH, or fix the module path") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ValueError(f"module {path!r}: {name!r} has no attribute {attribute!r}; fix the module path")
        found = getattr(found, part)
    if not callable(found):
        raise ValueError(f"module {path!r}: {attribute!r} is a {type(found).__name__}, not a callable; name a "
                         f"function or class that returns an nn.Module")
    return found


def build_module(path: str, kwargs: dict) -> nn.Module:
    """The user's module, built on torch's current default device, in eval mode."""
    fn = load_callable(path)
    try:
        net = fn(**kwargs)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"module {path!r}: calling it with kwargs {kwargs} failed ({type(e).__name__}: "
                         f"{_first_line(e)}); fix kwargs or the module") from None
    if not isinstance(net, nn.Module):
        raise ValueError(f"module {path!r} returned a {type(net).__name__}, not a torch.nn.Module; name a "
                         f"callable that returns one")
    return net.eval()


@functools.lru_cache(maxsize=8)
def _described(path: str, kwargs_json: str, input_size: int) -> dict:
    """One build and one dummy forward pass (meta device where possible): taps, output and state_dict
    shapes, parameter count."""
    kwargs = json.loads(kwargs_json)
    load_callable(path)  # a path that does not import fails here, on either device
    size = None
    try:
        with torch.device("meta"):
            net = build_module(path, kwargs)
        size = sum(p.numel() for p in net.parameters())
        return _trace(net, torch.empty(1, 3, input_size, input_size, device="meta"))
    except Exception:  # noqa: BLE001 - it does not build or run on the meta device: again for real, on zeros
        pass
    if size is not None and size > MAX_PARAMETERS:
        raise ValueError(f"module {path!r} has {size:,} parameters, more than the limit of {MAX_PARAMETERS:,}; "
                         f"use a smaller module")
    net = build_module(path, kwargs)
    with torch.no_grad():
        return _trace(net, torch.zeros(1, 3, input_size, input_size))


def _trace(net: nn.Module, x: torch.Tensor) -> dict:
    calls: dict[str, int] = {}
    order: list[tuple[str, tuple]] = []

    def hook(name):
        def record(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and 2 <= output.dim() <= 4 and len(output) == 1:
                order.append((name, tuple(output.shape[1:])))
        return record

    named = [(n, m) for n, m in net.named_modules() if n and n.count(".") < TAP_DEPTH]
    handles = [m.register_forward_hook(hook(n)) for n, m in named]
    try:
        output = net(x)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"the module fails on a (1, 3, {x.shape[-1]}, {x.shape[-1]}) image "
                         f"({type(e).__name__}: {_first_line(e)}); set input_size to a size it takes") from None
    finally:
        for h in handles:
            h.remove()
    taps = [{"name": n, "shape": s} for n, s in order if calls[n] == 1]
    return {"taps": taps, "output": tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None,
            "state": {k: tuple(v.shape) for k, v in net.state_dict().items()},
            "parameters": sum(p.numel() for p in net.parameters())}


def describe(path: str, kwargs: dict, input_size: int) -> dict:
    """Cached description of the module (see _described)."""
    return _described(path, json.dumps(kwargs, sort_keys=True), int(input_size))


# ---- the network ------------------------------------------------------------------------------

class ModuleNet(nn.Module):
    """The user's module on flat images: (N, 3 * side * side) viewed as (N, 3, side, side), resized
    (bilinear, antialiased) to input_size when that differs (a tree whose [data] image_size is the module's
    input_size gives it the cached pixels as they are), then the module. Its output is the parent's logits only
    when `head` is true. Taps: named submodules (see feature_info)."""

    def __init__(self, classes, module, kwargs=None, input_size=SIDE, head=False, weights_sha256=""):
        super().__init__()
        kwargs = dict(kwargs or {})
        self.module = build_module(module, kwargs).float()  # float32, as every model here
        self.input_size, self.head = int(input_size), bool(head)
        found = describe(module, kwargs, input_size)
        if self.head and found["output"] != (classes,):
            raise ValueError(f"head = true needs the module's output to be ({classes},), one logit per class in "
                             f"the order of classes; it gives {found['output']}")
        self.output_shape = found["output"]
        self.feature_info = [{"name": t["name"], "layer": i, "where": None, "shape": t["shape"],
                              "module": f"module.{t['name']}"} for i, t in enumerate(found["taps"])]

    def batch_rows(self, batch_size: int) -> int:
        """batch_size, or fewer images where that many resized to input_size would pass BATCH_BYTES: 4,096
        32-pixel images made 224 would take 2.3 GB before the module's first layer."""
        return max(1, min(batch_size, BATCH_BYTES // (4 * 3 * self.input_size ** 2)))

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """Flat images as the module takes them."""
        side = math.isqrt(int(x.shape[1]) // 3)  # a Python int: an exported graph keeps the image size fixed
        x = x.reshape(-1, 3, side, side)
        if self.input_size != side:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def forward(self, x):
        return self.module(self.images(x))

    def forward_intermediates(self, x, indices, stop_early=True):
        indices = list(indices)
        if stop_early and not indices:
            return None, []
        last = max(indices) if stop_early else None  # feature_info is in the order the taps complete
        found: dict[int, torch.Tensor] = {}

        def hook(i):
            def record(module, inputs, output):
                if i == last:
                    found[i] = output
                    raise _StopForward
                found[i] = output.clone()  # a later in-place operation (ReLU(inplace=True)) would change it
            return record

        handles = [self.module.get_submodule(self.feature_info[i]["name"]).register_forward_hook(hook(i))
                   for i in sorted(set(indices))]
        output = None
        try:
            output = self.module(self.images(x))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return output, [found[i] for i in indices]


def check_shape(shape: dict) -> dict:
    """The network's keys (MODEL_KEYS) of a module parent's config keys; the others (weights, mean, std)
    are the pipeline's."""
    if not isinstance(shape, dict) or set(shape) - set(SPEC_KEYS) - set(MODEL_KEYS):
        unknown = sorted(set(shape) - set(SPEC_KEYS) - set(MODEL_KEYS)) if isinstance(shape, dict) else shape
        raise ValueError(f"unknown module parent keys {unknown}; a module parent takes {', '.join(SPEC_KEYS)}")
    out = {"module": shape.get("module"), "kwargs": dict(shape.get("kwargs") or {}),
           "input_size": shape.get("input_size", SIDE), "head": bool(shape.get("head", False)),
           "weights_sha256": shape.get("weights_sha256", "")}
    load_callable(out["module"])
    size = out["input_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not INPUT_SIZES[0] <= size <= INPUT_SIZES[1]:
        raise ValueError(f"module input_size must be an integer in {INPUT_SIZES[0]}..{INPUT_SIZES[1]}; got {size!r}")
    return out


# ---- the weights file -------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path) -> str:
    """sha256 of a file (cached while its size and modification time stay the same)."""
    stat = os.stat(path)
    return _sha256(os.fspath(path), stat.st_size, stat.st_mtime_ns)


def read_weights(path, mmap: bool = False) -> dict:
    """A state_dict file read with weights_only=True: a dict of tensors, or a one-line ValueError."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy format: no mmap
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of objects: not a torch file at all
            raise ValueError(f"{path} is not a readable torch file; save the module's state_dict with torch.save") \
                from None
        raise ValueError(f"{path} holds objects other than tensors and plain data, which loading could "
                         f"run code from; save only the module's state_dict (torch.save(net.state_dict(), path))") \
            from None
    except Exception as e:  # noqa: BLE001
        detail = _first_line(e) if not isinstance(e, KeyError) and len(_first_line(e)) > 12 else ""
        raise ValueError(f"{path} is not a readable torch file{f' ({detail})' if detail else ''}; save the module's "
                         f"state_dict with torch.save") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ValueError(f"{path} is not a state_dict (a dict of tensors); save "
                         f"torch.save(net.state_dict(), path)")
    return state


def match_weights(state_shapes: dict, wanted: dict, path,
                  fix: str = "pass the state_dict saved from this module with these kwargs") -> None:
    """The file's tensors must be exactly the module's (load_state_dict strict=True, shapes too); `fix` ends the
    message."""
    missing = sorted(set(wanted) - set(state_shapes))
    unexpected = sorted(set(state_shapes) - set(wanted))
    wrong = sorted(k for k in set(wanted) & set(state_shapes) if tuple(wanted[k]) != tuple(state_shapes[k]))
    if missing or unexpected or wrong:
        parts = [f"{label} {_some(keys)}" for label, keys in (("missing keys", missing),
                                                              ("unexpected keys", unexpected)) if keys]
        parts += [f"{k}: file {tuple(state_shapes[k])}, module {tuple(wanted[k])}" for k in wrong[:2]]
        raise ValueError(f"{path} does not match the module ({'; '.join(parts)}); {fix}")


def load_weights(net: ModuleNet, path) -> None:
    """Load the weights file into the wrapped module (strict), checked first without allocating."""
    state = read_weights(path)
    match_weights({k: tuple(v.shape) for k, v in state.items()},
                  {k: tuple(v.shape) for k, v in net.module.state_dict().items()}, path)
    net.module.load_state_dict(state, strict=True)


# ---- config keys ------------------------------------------------------------------------------

def parse_keys(table, classes) -> dict:
    """A [parent] table of kind "module" (a branching.config.table.Table) checked before any work: the module imports and
    builds, the weights file is a state_dict of exactly its tensors, the head (if used) gives one logit per
    class. Returns the parent's shape keys, the weights path made absolute and its sha256 added."""
    data = table.data
    for key in ("dropout", "activation"):
        if key in data:
            raise table.error(key, "is not used by a module parent (it is never trained)", "remove it")
    path = table.require("module", 'write e.g. module = "torchvision.models:resnet18"')
    kwargs = data.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise table.error("kwargs", "must be a table of keyword arguments", "write e.g. kwargs = { num_classes = 6 }")
    size = data.get("input_size", SIDE)
    if isinstance(size, bool) or not isinstance(size, int) or not INPUT_SIZES[0] <= size <= INPUT_SIZES[1]:
        raise table.error("input_size", f"must be an integer in {INPUT_SIZES[0]}..{INPUT_SIZES[1]}",
                          "write e.g. input_size = 224, or leave it out for 32 (no resize)")
    head = table.flag("head") or False
    stats = {}
    for key, ok in (("mean", lambda v: True), ("std", lambda v: v > 0)):
        value = data.get(key)
        if value is None:
            continue
        if not (isinstance(value, list) and len(value) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and ok(v) for v in value)):
            raise table.error(key, "must be 3 numbers, one per colour channel, on the 0..1 scale"
                                   + (", all > 0" if key == "std" else ""), f"write e.g. {key} = "
                                   + ("[0.485, 0.456, 0.406]" if key == "mean" else "[0.229, 0.224, 0.225]"))
        stats[key] = tuple(float(v) for v in value)
    if len(stats) == 1:
        missing = "std" if "mean" in stats else "mean"
        raise table.error(missing, "is required with " + ("mean" if missing == "std" else "std"),
                          "give both mean and std, or neither (then the training images' statistics are used)")
    weights = table.require("weights", 'write e.g. weights = "path/to/weights.pth" (a state_dict file)')
    if not isinstance(weights, str) or not Path(weights).is_file():
        raise table.error("weights", "is not a file", "pass the path of a local state_dict file (the project "
                          "never downloads weights)")
    try:
        found = describe(path, kwargs, size)
    except ValueError as e:  # the message names the module and the fix
        raise ConfigError(f"{table.origin}: [{table.name}] {e}") from None
    if found["parameters"] > MAX_PARAMETERS:
        raise table.error("module", f"has {found['parameters']:,} parameters, more than the limit of "
                                    f"{MAX_PARAMETERS:,}", "use a smaller module or other kwargs")
    if head and found["output"] != (len(classes),):
        raise table.error("head", f"the module's output is {found['output']}, not ({len(classes)},) (one logit per "
                                  f"class, in the order of classes)", "remove head = true, or set kwargs so that "
                                                                      "the module outputs the classes")
    try:
        match_weights({k: tuple(v.shape) for k, v in read_weights(weights, mmap=True).items()}, found["state"],
                      weights)
    except ValueError as e:  # the message names the file and the fix
        raise ConfigError(f"{table.origin}: [{table.name}] weights: {e}") from None
    weights = str(Path(weights).resolve())
    return {"module": path, "kwargs": kwargs, "weights": weights, "input_size": size, **stats, "head": head,
            "weights_sha256": weights_sha256(weights)}


def _some(keys, n=3) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:200]
