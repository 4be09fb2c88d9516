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

from torchly import Model

BATCH = 4096
Tap = tuple  # (node, layer >= 0, where)


def chain(models: dict[str, Model], node: str) -> list[str]:
    """The names of the models from the parent down to `node`."""
    names = [node]
    while names[0] != "parent":
        names.insert(0, models[names[0]].meta["source"])
    return names


def tap(models: dict[str, Model], node: str, layer: int, where: str) -> Tap:
    """A tap of `node`, its layer counted from 0 (validated by the model)."""
    return node, models[node].tap(layer, where)["layer"], where


def reads(models: dict[str, Model], node: str) -> Tap:
    """The tap a branch reads."""
    meta = models[node].meta
    return tap(models, meta["source"], meta["layer"], meta["where"])


def plan(models: dict[str, Model], taps) -> dict[str, set[tuple[int, str]]]:
    """For each node that must run: the (layer, where) taps wanted of it, by `taps` or by its readers."""
    need: dict[str, set[tuple[int, str]]] = {}
    pending = [tap(models, *t) for t in taps]
    while pending:
        node, layer, where = pending.pop()
        need.setdefault(node, set()).add((layer, where))
        if node != "parent":
            pending.append(reads(models, node))
    return need


def forward_taps(models: dict[str, Model], need: dict, x: torch.Tensor) -> dict[Tap, torch.Tensor]:
    """The taps in `need` (see plan) for a batch of normalised images x, keyed (node, layer, where).

    Gradients flow as the caller has them (fine-tuning a trunk goes through here too)."""
    out: dict[Tap, torch.Tensor] = {}
    for node in sorted(need, key=lambda n: len(chain(models, n))):
        h = x if node == "parent" else out[reads(models, node)]
        wanted = sorted(need[node])
        _, tensors = models[node].forward_intermediates(h, wanted, stop_early=True)
        out.update({(node, *t): value for t, value in zip(wanted, tensors)})
    return out


def read_tap(models: dict[str, Model], tap_: Tap, x: torch.Tensor) -> torch.Tensor:
    """One tap (node, layer, where) for a batch of normalised images."""
    key = tap(models, *tap_)
    return forward_taps(models, plan(models, [key]), x)[key]


def node_input(models: dict[str, Model], node: str, x: torch.Tensor) -> torch.Tensor:
    """What `node` reads, for a batch of normalised images: x itself for the parent."""
    return x if node == "parent" else read_tap(models, reads(models, node), x)


def extract(models: dict[str, Model], taps, X: np.ndarray, batch_size: int = BATCH) -> list[np.ndarray]:
    """Features (float32) of normalised images X for each (node, layer, where) in taps, in order;
    every model in eval mode, no gradients."""
    keys = [tap(models, *t) for t in taps]
    if not len(X):
        return [np.zeros((0, models[node].width(layer)), np.float32) for node, layer, _ in keys]
    need = plan(models, keys)
    for m in models.values():
        m.net.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in keys]
    with torch.inference_mode():
        for start in range(0, len(X), batch_size):
            found = forward_taps(models, need, torch.from_numpy(np.ascontiguousarray(X[start:start + batch_size])))
            for part, key in zip(parts, keys):
                part.append(found[key])
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
    images = (x * std + mean).view(-1, 3, 32, 32)
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return (images.reshape(len(x), -1) - mean) / std


def random_flip_transform(normalizer):
    """A Model.fit train_transform that mirrors a random half of each batch of normalised images."""
    return lambda xb, generator: flip_images(xb, normalizer, random_flips(len(xb), generator))


def mirror_all(X: np.ndarray, normalizer) -> np.ndarray:
    """Every normalised image of X mirrored left-right."""
    x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    return flip_images(x, normalizer, torch.ones(len(X), dtype=torch.bool)).numpy()
