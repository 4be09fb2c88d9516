"""The one forward path through a tree of models: from normalised images to any node's input or tap.

Each model declares the points it can be tapped at (`torchly.Model.feature_info`) and computes them
in one pass (`forward_intermediates`). A branch reads one tap of its source, recorded in its meta
as (source, layer, where). Here the models of a tree are chained: each node's trunk runs once per
batch, only as deep as the deepest tap that any request, or any reader downstream, needs.

Training, the activation cache, `compare`, `probe-layers` and the inference benchmark all go
through these functions. The routed tree (branching.routing) keeps a fused copy of the same
arithmetic for speed; the tests check it against this one.
"""

from __future__ import annotations

import numpy as np
import torch

from branching import distributed
from branching.lazy_images import NormalizedImages
from branching.models.batches import Augment, DeviceInputs, device_batches, mirror
from branching.models.device import CPU
from branching.models.model import Model

from branching.models import nets

BATCH = 4096
Tap = tuple   # (node, layer >= 0, where): a point of one model (where is None but for MLPs)
Read = tuple  # (node, layer, where, pool): a tap made a vector, as a branch reads it


def chain(models: dict[str, Model], node: str) -> list[str]:
    """The names of the models from the parent down to `node`."""
    names = [node]
    while names[0] != "parent":
        names.insert(0, models[names[0]].meta.source)
    return names


def read(models: dict[str, Model], node: str, layer, where=None, pool=None) -> Read:
    """A tap of `node` (validated by its model, the layer counted from 0) and the pooling that makes it a
    vector (default: nets.default_pool of the tap)."""
    where, pool = models[node].net_kind.read(where, pool)
    info = models[node].tap(layer, where)
    return node, info["layer"], info["where"], nets.check_pool(info["shape"], pool or nets.default_pool(info["shape"]))


def reads(models: dict[str, Model], node: str) -> Read:
    """What a branch reads (as its checkpoint records it)."""
    meta = models[node].meta
    return read(models, meta.source, meta.layer, meta.where, meta.pool)


def plan(models: dict[str, Model], wanted) -> dict[str, set[tuple]]:
    """For each node that must run: the (layer, where) taps wanted of it, by `wanted` (reads) or by its
    readers."""
    need: dict[str, set[tuple]] = {}
    pending = [read(models, *r) for r in wanted]
    while pending:
        node, layer, where, _ = pending.pop()
        need.setdefault(node, set()).add((layer, where))
        if node != "parent":
            pending.append(reads(models, node))
    return need


def forward_taps(models: dict[str, Model], need: dict, x: torch.Tensor) -> dict[Tap, torch.Tensor]:
    """The taps in `need` (see plan) for a batch of normalised images x, keyed (node, layer, where).

    Gradients flow as the caller has them (fine-tuning a trunk goes through here too)."""
    out: dict[Tap, torch.Tensor] = {}
    for node in sorted(need, key=lambda n: len(chain(models, n))):
        h = x.to(models[node].device) if node == "parent" else pooled(out, reads(models, node))
        wanted = sorted(need[node], key=lambda t: (t[0], t[1] or ""))
        _, tensors = models[node].forward_intermediates(h, wanted, stop_early=True)
        out.update({(node, *t): value for t, value in zip(wanted, tensors)})
    return out


def pooled(found: dict[Tap, torch.Tensor], r: Read) -> torch.Tensor:
    """A read's vectors from the taps forward_taps found."""
    return nets.pool(found[r[:3]], r[3])


def read_tap(models: dict[str, Model], r, x: torch.Tensor) -> torch.Tensor:
    """One read (node, layer, where[, pool]) for a batch of normalised images."""
    r = read(models, *r)
    return pooled(forward_taps(models, plan(models, [r]), x), r)


def node_input(models: dict[str, Model], node: str, x: torch.Tensor) -> torch.Tensor:
    """What `node` reads, for a batch of normalised images: x itself for the parent."""
    return x if node == "parent" else read_tap(models, reads(models, node), x)


def extract(models: dict[str, Model], wanted, X: np.ndarray, batch_size: int = BATCH) -> list[np.ndarray]:
    """Vectors (float32) of normalised images X for each read (node, layer, where[, pool]) in `wanted`, in
    order; every model in eval mode, no gradients. Under torchrun each rank extracts its share of the rows
    and every rank gets them all."""
    keys = [read(models, *r) for r in wanted]
    return list(distributed.over_shards(len(X), lambda rows: tuple(_extract(models, keys, X[rows], batch_size))))


def _extract(models: dict[str, Model], keys, X, batch_size: int) -> list[np.ndarray]:
    if not len(X):
        return [np.zeros((0, models[node].width(layer, where, how)), np.float32) for node, layer, where, how in keys]
    need = plan(models, keys)
    for m in models.values():
        m.net.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in keys]
    parent = models["parent"]
    batch_size = parent.net_kind.batch_rows(parent.net, batch_size)  # a module enlarging images: fewer at a time
    with torch.inference_mode():  # batches normalised on the parent's device; large images: fewer at a time
        for xb in device_batches(X, batch_size, parent.device):
            found = forward_taps(models, need, xb)
            for part, key in zip(parts, keys):
                part.append(pooled(found, key).cpu())
    return [torch.cat(part).numpy() for part in parts]


def parent_depth(models: dict[str, Model], nodes, judges=()) -> int:
    """The parent's taps (counted from its first) that running `nodes` needs: the parent's own output when it is
    among them, and the tap each chain leaves the parent at, as each judge reads it (judges: their reads). An
    encoded parent's network runs only this far."""
    parent = models["parent"]
    deepest = [parent.feature_info[-1]["layer"]] if "parent" in nodes else []
    deepest += [models[chain(models, n)[1]].meta.layer for n in nodes if n != "parent"]
    deepest += [r[1] for reads_ in judges for r in reads_ if r[0] == "parent"]
    return max(deepest, default=-1) + 1


def node_inputs(models: dict[str, Model], node: str, X: np.ndarray) -> np.ndarray:
    """node_input for a numpy array of normalised images."""
    return X if node == "parent" else extract(models, [reads(models, node)], X)[0]


# ---- augmentation of normalised images -----------------------------------------------------------

def augment_transform(normalizer, flip: bool = True, crop: int = 0) -> Augment:
    """A Model.fit train_transform: mirror a random half of the images (flip), then shift each by up to `crop`
    pixels (batches.Augment, on the training device)."""
    return Augment(flip=flip, crop=crop, normalizer=normalizer)


def extract_mirrored(models: dict[str, Model], r, X, normalizer) -> np.ndarray:
    """extract of one read for every normalised image of X mirrored, a batch of BATCH images at a time."""
    parts = [extract(models, [r], mirror_all(X[start:start + BATCH], normalizer))[0] for start in range(0, len(X), BATCH)]
    return np.concatenate(parts) if parts else extract(models, [r], X)[0]


def mirror_all(X, normalizer) -> np.ndarray:
    """Every image of X (normalised, or NormalizedImages) mirrored left-right, normalised; the known mirror
    images where X carries them (an encoded parent's vectors)."""
    if isinstance(X, NormalizedImages) and X.mirrored is not None:
        return np.asarray(X.mirror_images())
    if isinstance(X, NormalizedImages):
        inputs = DeviceInputs(X, CPU, hold=False)
        every = torch.arange(len(X))
        return inputs.normalize(mirror(inputs.raw(every), torch.ones(len(X), dtype=torch.bool))).numpy()
    x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    return Augment(normalizer=normalizer).mirror_normalized(x, torch.ones(len(X), dtype=torch.bool)).numpy()
