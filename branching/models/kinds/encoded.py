"""What the encoded kinds share (a pretrained transformer on texts, a pretrained CNN on images): a frozen
network runs once per input and its taps, each pooled every way the kind knows, are cached; the parent the tree
sees is an EncodedNet over those vectors. A tap is (layer, pooling): the pooling is the tap's `where` (a config
names it `pool`), and the vector a branch reads is that slice as it is ("flat")."""

from __future__ import annotations

import numpy as np

from branching.models import nets
from branching.models.encoded import EncodedNet
from branching.models.kinds.base import ParentKind, by_name, resolve_layer

# the shape keys of an encoded parent's head (its trunk's keys are the kind's own)
HEAD_KEYS = ("depth", "head_layer", "head_pool", "hidden", "activation", "head")


class EncodedKind(ParentKind):
    trunk = "encoded"
    normalization = "value"
    hidden_default = ()
    compare_methods = ("finetune_layer",)
    head_fix = "give the parent classes"
    staged = True
    default_pool: str = ""
    last_probe: str = "last_layer_probe"  # compare's key of a linear probe on its last tap

    @property
    def pools(self) -> tuple:
        return self.wheres

    def tap_widths(self, shape: dict) -> list[tuple[str, int]]:
        """(name, width) of every tap of the frozen network, in order (all of them, whatever the depth)."""
        raise NotImplementedError

    def check_head(self, shape: dict, out: dict) -> dict:
        """The head's keys of `shape` added to `out` (the trunk's keys, checked), with their defaults."""
        n = len(self.tap_widths(out))
        out.update(depth=shape.get("depth"), head_layer=shape.get("head_layer"),
                   head_pool=shape.get("head_pool", self.default_pool), hidden=list(shape.get("hidden") or []),
                   activation=shape.get("activation", "relu"), head=bool(shape.get("head", True)))
        if out["depth"] is None:
            out["depth"] = n
        if out["head_layer"] is None:
            out["head_layer"] = n - 1  # the last tap
        for key, low, top in (("depth", 1, n), ("head_layer", 0, n - 1)):
            value = out[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
                raise ValueError(f"{self.name} parent {key} must be an integer in {low}..{top}; got {value!r}")
        if out["head"] and out["head_layer"] >= out["depth"]:
            raise ValueError(f"the head reads tap {out['head_layer']}, past the {out['depth']} taps encoded")
        if out["head_pool"] not in self.pools:
            raise ValueError(f"{self.name} parent head_pool must be one of {', '.join(self.pools)}; "
                             f"got {out['head_pool']!r}")
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in out["hidden"]):
            raise ValueError(f"{self.name} parent hidden must be a list of positive integers; got {out['hidden']!r}")
        if out["activation"] not in nets.ACTIVATIONS:
            raise ValueError(f"{self.name} parent activation must be one of {', '.join(nets.ACTIVATIONS)}")
        return out

    def check_architecture(self, arch: list) -> list:
        if len(arch) != 2:
            raise ValueError(f"an encoded parent's architecture is [numbers per encoded input, classes]; got {arch!r}")
        return arch

    def input_width(self, shape: dict, side: int = 0) -> int:
        return sum(width for _, width in self.tap_widths(shape)[:shape["depth"]]) * len(self.pools)

    def build(self, architecture, activation, dropout, shape):
        taps = self.tap_widths(shape)[:shape["depth"]]
        net = EncodedNet(architecture[-1], taps, self.pools,
                         (shape["head_layer"], shape["head_pool"]) if shape["head"] else None, shape["hidden"],
                         nets.ACTIVATIONS[shape["activation"]], dropout)
        if architecture[0] != net.width:
            raise ValueError(f"a {self.name} parent over {shape['depth']} taps reads {net.width} numbers per input, "
                             f"not {architecture[0]}")
        return net

    def has_head(self, shape: dict) -> bool:
        return shape["head"]

    def taps(self, shape, side, classes, hidden=(), dropout=None) -> list[dict]:
        widths = self.tap_widths(shape)[:shape.get("depth") or None]
        return [{"name": name, "layer": i, "where": how, "shape": (width,)}
                for i, (name, width) in enumerate(widths) for how in self.pools]

    def tap(self, info, layer, where=None) -> dict:
        how = where or self.default_pool
        if how not in self.pools:
            raise ValueError(f"pool {how!r} does not apply to a {self.name} parent's taps; use one of "
                             f"{', '.join(self.pools)}")
        names = self.layers(info)
        if isinstance(layer, str):
            by_name(info, layer)  # a did-you-mean for a misspelt name
            layer = names.index(layer)
        return info[resolve_layer(layer, len(names)) * len(self.pools) + self.pools.index(how)]

    def read(self, where, pool) -> tuple:
        """(tap pooling, vector pooling): the pooling over positions or tokens is the tap's `where` (a config names
        it `pool`), and the tap is a vector already ("flat"). Idempotent."""
        for value in (where, pool):
            if value is not None and value != "flat" and value not in self.pools:
                raise ValueError(f"pool {value!r} does not apply to a {self.name} parent's taps; use one of "
                                 f"{', '.join(self.pools)}")
        return next((v for v in (where, pool) if v in self.pools), self.default_pool), "flat"

    def encode(self, shape: dict, inputs, device, progress: bool = True, depth: int | None = None):
        """The vectors the parent reads (N, input_width) of new inputs (texts, or images (N, 3 * side * side) of
        any side), through the frozen network on `device` as deep as `depth` taps (default: the parent's depth);
        the columns of deeper taps, which nothing then reads, are zeros."""
        depth = shape["depth"] if depth is None else max(1, min(depth, shape["depth"]))
        vectors = self.encode_to(shape, inputs, device, depth, progress)
        width = self.input_width(shape)
        return vectors if vectors.shape[1] == width else np.pad(vectors, ((0, 0), (0, width - vectors.shape[1])))

    def encode_to(self, shape: dict, inputs, device, depth: int, progress: bool):
        """encode's vectors of the first `depth` taps."""
        raise NotImplementedError

    def every_tap(self, shape: dict) -> dict:
        """The shape encoding every tap (probe-layers and compare read them all)."""
        return {**shape, "depth": len(self.tap_widths(shape))}

    def head_config(self, shape: dict, hidden) -> dict:
        return {"layer": shape["head_layer"], "pool": shape["head_pool"], "hidden": list(hidden)} if shape["head"] else {}
