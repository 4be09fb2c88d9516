"""A pretrained transformer as the parent (kind "text"): the network a tree sees over encoded texts.

The transformer itself (branching.models.encoder) is frozen and costly, so it runs once per text: it
turns the text into one vector per tap and pooling (every pooling of TEXT_POOLS at the embeddings and
at each layer, as deep as the tree reads), and those vectors, standardised, are the parent's inputs,
(N, depth * len(TEXT_POOLS) * width). `TextNet` is the parent over them: its taps are (layer, pool)
points, as an MLP's are (layer, pre or post), each a slice of its input, and its head, when the tree
gives the parent classes, is a small network trained on one of them (by default the last layer,
mean-pooled: the sentence embedding of a sentence-transformers model).
"""

from __future__ import annotations

import torch
from torch import nn

TEXT_POOLS = ("mean", "cls", "max", "last")  # over the attention mask: the mean, the first token, the max, the last
DEFAULT_MAX_LENGTH = 128
MAX_LENGTHS = (8, 8192)
# the network's shape keys (what a model file records); the config's keys are in branching.config.parse
SHAPE_KEYS = ("model", "files_sha256", "max_length", "width", "layers", "depth", "head_layer", "head_pool",
              "hidden", "activation", "head")


def tap_names(layers: int) -> list[str]:
    """The taps of a transformer of `layers` layers: the embeddings, then each layer's output."""
    return ["embeddings", *(f"layer{i}" for i in range(layers))]


def pool_tokens(states: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Token states (B, T, W) of texts with attention mask (B, T) made vectors (B, W)."""
    mask = mask.to(states.dtype)
    if how == "mean":
        return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
    if how == "cls":
        return states[:, 0]
    if how == "max":
        return states.masked_fill(mask[..., None] == 0, float("-inf")).amax(1)
    if how == "last":
        last = mask.sum(1).long().clamp_min(1) - 1
        return states[torch.arange(len(states), device=states.device), last]
    raise ValueError(f"unknown text pool {how!r}; use one of {', '.join(TEXT_POOLS)}")


def text_read(where, pool) -> tuple[str, str]:
    """(tap pooling, vector pooling) of a read of a text parent: the pooling over tokens is the tap's `where`
    (a config names it `pool`), and the tap is a vector already ("flat"). Idempotent."""
    for value in (where, pool):
        if value is not None and value != "flat" and value not in TEXT_POOLS:
            raise ValueError(f"pool {value!r} does not apply to a text parent's taps; use one of "
                             f"{', '.join(TEXT_POOLS)}")
    return next((v for v in (where, pool) if v in TEXT_POOLS), "mean"), "flat"


def check_shape(shape: dict) -> dict:
    """A text parent's shape keys (SHAPE_KEYS), checked; defaults for the head's."""
    if not isinstance(shape, dict) or set(shape) - set(SHAPE_KEYS):
        unknown = sorted(set(shape) - set(SHAPE_KEYS)) if isinstance(shape, dict) else shape
        raise ValueError(f"unknown text parent keys {unknown}; a text parent records {', '.join(SHAPE_KEYS)}")
    out = {"model": shape.get("model"), "files_sha256": shape.get("files_sha256", ""),
           "max_length": shape.get("max_length", DEFAULT_MAX_LENGTH), "width": shape.get("width"),
           "layers": shape.get("layers"), "depth": shape.get("depth"), "head_layer": shape.get("head_layer"),
           "head_pool": shape.get("head_pool", "mean"), "hidden": list(shape.get("hidden") or []),
           "activation": shape.get("activation", "relu"), "head": bool(shape.get("head", True))}
    if not isinstance(out["model"], str) or not out["model"]:
        raise ValueError("a text parent needs model: an installed package that ships a model, or a local folder")
    for key, low in (("width", 1), ("layers", 1), ("max_length", MAX_LENGTHS[0])):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < low:
            raise ValueError(f"text parent {key} must be an integer >= {low}; got {out[key]!r}")
    if out["depth"] is None:
        out["depth"] = out["layers"] + 1
    if out["head_layer"] is None:
        out["head_layer"] = out["layers"]  # the last layer's tap
    for key in ("depth", "head_layer"):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= out["layers"] + (key == "depth"):
            raise ValueError(f"text parent {key} must be an integer in 0..{out['layers'] + (key == 'depth')}; "
                             f"got {value!r}")
    if out["head"] and out["head_layer"] >= out["depth"]:
        raise ValueError(f"the head reads tap {out['head_layer']}, past the {out['depth']} taps encoded")
    if out["head_pool"] not in TEXT_POOLS:
        raise ValueError(f"text parent head_pool must be one of {', '.join(TEXT_POOLS)}; got {out['head_pool']!r}")
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in out["hidden"]):
        raise ValueError(f"text parent hidden must be a list of positive integers; got {out['hidden']!r}")
    return out


def input_width(shape: dict) -> int:
    """The numbers per text a text parent reads: every pooling at every tap encoded."""
    return shape["depth"] * len(TEXT_POOLS) * shape["width"]


class TextNet(nn.Module):
    """The parent over encoded texts: taps are slices of its input, its head (when `head`) an MLP of
    `hidden` layers (of `activation`, whose class nets.build passes) reading tap `head_layer` pooled by
    `head_pool`."""

    def __init__(self, classes, model, width, layers, depth=None, head_layer=None, head_pool="mean", hidden=(),
                 activation="relu", head=True, dropout=None, files_sha256="", max_length=DEFAULT_MAX_LENGTH,
                 activation_class=nn.ReLU):
        super().__init__()
        shape = check_shape({"model": model, "width": width, "layers": layers, "depth": depth,
                             "head_layer": head_layer, "head_pool": head_pool, "hidden": list(hidden),
                             "activation": activation, "head": head, "files_sha256": files_sha256,
                             "max_length": max_length})
        self.width, self.depth, self.has_head = shape["width"], shape["depth"], shape["head"]
        names = tap_names(shape["layers"])[:self.depth]
        self.feature_info = [{"name": names[i], "layer": i, "where": how, "shape": (self.width,), "module": "input"}
                             for i in range(self.depth) for how in TEXT_POOLS]
        self.head_index = self.index(shape["head_layer"], shape["head_pool"]) if self.has_head else None
        widths, parts = [self.width, *shape["hidden"], classes], []
        for fan_in, fan_out in zip(widths[:-2], widths[1:-1]):
            parts += [nn.Linear(fan_in, fan_out), activation_class()]
        if dropout:
            parts.append(nn.Dropout(dropout))
        self.head = nn.Sequential(*parts, nn.Linear(widths[-2], widths[-1]))

    def index(self, layer: int, how: str) -> int:
        """The feature_info index of tap `layer` pooled by `how`."""
        return layer * len(TEXT_POOLS) + TEXT_POOLS.index(how)

    def tap(self, x: torch.Tensor, index: int) -> torch.Tensor:
        return x[:, index * self.width:(index + 1) * self.width]

    def forward(self, x):
        return self.head(self.tap(x, self.head_index if self.has_head else 0))

    def forward_intermediates(self, x, indices, stop_early=True):
        return (None if stop_early else self(x)), [self.tap(x, i) for i in indices]
