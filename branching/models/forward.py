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
import torch.nn.functional as F

from branching.models.checks import rows_per_batch
from branching.models.model import Model
from branching.models.text import text_read

from branching.models import nets

BATCH = 4096
Tap = tuple   # (node, layer >= 0, where): a point of one model (where is None but for MLPs)
Read = tuple  # (node, layer, where, pool): a tap made a vector, as a branch reads it


def chain(models: dict[str, Model], node: str) -> list[str]:
    """The names of the models from the parent down to `node`."""
    names = [node]
    while names[0] != "parent":
        names.insert(0, models[names[0]].meta["source"])
    return names


def read(models: dict[str, Model], node: str, layer, where=None, pool=None) -> Read:
    """A tap of `node` (validated by its model, the layer counted from 0) and the pooling that makes it a
    vector (default: nets.default_pool of the tap)."""
    if models[node].kind == "text":
        where, pool = text_read(where, pool)
    info = models[node].tap(layer, where)
    return node, info["layer"], info["where"], nets.check_pool(info["shape"], pool or nets.default_pool(info["shape"]))


def reads(models: dict[str, Model], node: str) -> Read:
    """What a branch reads (as its checkpoint records it)."""
    meta = models[node].meta
    return read(models, meta["source"], meta["layer"], meta["where"], meta.get("pool"))


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
    order; every model in eval mode, no gradients."""
    keys = [read(models, *r) for r in wanted]
    if not len(X):
        return [np.zeros((0, models[node].width(layer, where, how)), np.float32) for node, layer, where, how in keys]
    need = plan(models, keys)
    for m in models.values():
        m.net.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in keys]
    batch_size = rows_per_batch(batch_size, X.shape[1])  # large images: fewer at a time
    with torch.inference_mode():
        for start in range(0, len(X), batch_size):
            found = forward_taps(models, need, torch.from_numpy(np.ascontiguousarray(X[start:start + batch_size])))
            for part, key in zip(parts, keys):
                part.append(pooled(found, key).cpu())
    return [torch.cat(part).numpy() for part in parts]


def node_inputs(models: dict[str, Model], node: str, X: np.ndarray) -> np.ndarray:
    """node_input for a numpy array of normalised images."""
    return X if node == "parent" else extract(models, [reads(models, node)], X)[0]


# ---- left-right flips of normalised images --------------------------------------------------

def random_flips(n: int, generator: torch.Generator) -> torch.Tensor:
    """Which of n images to mirror: a fair coin each, drawn from `generator`."""
    return torch.rand(n, generator=generator) < 0.5


def flip_images(x: torch.Tensor, normalizer, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images where `flip` is true (in pixel space, then normalise again)."""
    mean, std = torch.from_numpy(normalizer.mean), torch.from_numpy(normalizer.std)
    side = nets.image_side(x.shape[1])
    images = (x * std + mean).view(-1, nets.CHANNELS, side, side)
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return (images.reshape(len(x), -1) - mean) / std


def augment_transform(normalizer, flip: bool = True, crop: int = 0):
    """A Model.fit train_transform for batches of normalised images: mirror a random half (flip), then
    shift each image by up to `crop` pixels (random crops of the image padded with zeros, the mean colour
    of per-channel normalised images)."""
    def transform(xb, generator):
        if flip:
            xb = flip_images(xb, normalizer, random_flips(len(xb), generator))
        return random_crops(xb, crop, generator) if crop else xb
    return transform


def random_crops(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each flat image (N, 3 * side * side) padded by `pad` zeros on every side and cropped back to its side
    at a random offset."""
    n, channels, side = len(x), nets.CHANNELS, nets.image_side(x.shape[1])
    padded = F.pad(x.reshape(n, channels, side, side), (pad,) * 4)
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=generator) for _ in range(2))
    rows = (dy[:, None] + torch.arange(side))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(side))[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(channels)[None, :, None, None], rows, cols].reshape(n, -1)


def extract_mirrored(models: dict[str, Model], r, X, normalizer) -> np.ndarray:
    """extract of one read for every normalised image of X mirrored, a batch of BATCH images at a time."""
    parts = [extract(models, [r], mirror_all(X[start:start + BATCH], normalizer))[0] for start in range(0, len(X), BATCH)]
    return np.concatenate(parts) if parts else extract(models, [r], X)[0]


def mirror_all(X: np.ndarray, normalizer) -> np.ndarray:
    """Every normalised image of X mirrored left-right."""
    x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    return flip_images(x, normalizer, torch.ones(len(X), dtype=torch.bool)).numpy()
