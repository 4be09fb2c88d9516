"""A pretrained image network as the parent (kind = "pretrained"): EfficientNet-Lite0, -Lite1 or -Lite2 from
installed packages (branching.models.trunks), frozen. Every image is encoded once, on the device, into the
average and the maximum over positions of each tap (stem, block0 .., head) up to the deepest the tree reads;
those vectors are cached, and a head on one of them (when the parent has classes) and the branches train on
them.

    [parent]
    kind = "pretrained"
    model = "efficientnet-lite0"   # lite1, lite2 the same way
    classes = [...]                # the head's; without them the tree's classes are its branches'
    # layer = "head"; pool = "avg" # the tap the head reads (default: the last, averaged)
    # weights = "file.pth"         # another state_dict of the same network (default: the packaged one)
    # mirrors = true               # also encode the training images mirrored, to train with mirror images

[data] image_size is the size the network sees (default its own, 224 for Lite0): image folders are decoded at
it, CIFAR-100's 32-pixel images are resized up to it inside the trunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from branching.errors import ConfigError, MissingPackageError, past_or_close
from branching.models import trunks
from branching.models.kinds.base import register_kind
from branching.models.kinds.encoded import HEAD_KEYS, EncodedKind

TRUNK_KEYS = ("model", "weights", "weights_sha256", "input_size", "mirrors")  # then the head's (HEAD_KEYS)
SIZES = (32, 1024)  # the network's stride is 32: below it, more than its last stage sees a single position


@register_kind
class Pretrained(EncodedKind):
    name = "pretrained"
    config_keys = ("model", "weights", "mirrors", "layer", "pool")
    wheres = trunks.IMAGE_POOLS
    default_pool = "avg"
    compare_methods = ("finetune_block",)

    def tap_widths(self, shape: dict) -> list[tuple[str, int]]:
        return list(trunks.tap_widths(shape["model"], shape["input_size"]))

    def check_shape(self, shape: dict) -> dict:
        if not isinstance(shape, dict) or set(shape) - {*TRUNK_KEYS, *HEAD_KEYS}:
            unknown = sorted(set(shape) - {*TRUNK_KEYS, *HEAD_KEYS}) if isinstance(shape, dict) else shape
            raise ValueError(f"unknown pretrained parent keys {unknown}; a pretrained parent records "
                             f"{', '.join((*TRUNK_KEYS, *HEAD_KEYS))}")
        net = trunks.network(shape.get("model"))
        out = {"model": net.name, "weights": shape.get("weights", ""), "weights_sha256": shape.get("weights_sha256", ""),
               "input_size": shape.get("input_size", net.size), "mirrors": shape.get("mirrors", False)}
        size = out["input_size"]
        if isinstance(size, bool) or not isinstance(size, int) or not SIZES[0] <= size <= SIZES[1]:
            raise ValueError(f"pretrained parent input_size must be an integer in {SIZES[0]}..{SIZES[1]}; got {size!r}")
        if not isinstance(out["weights"], str) or not isinstance(out["weights_sha256"], str):
            raise ValueError("pretrained parent weights and weights_sha256 must be strings")
        if not isinstance(out["mirrors"], bool):
            raise ValueError(f"pretrained parent mirrors must be true or false; got {out['mirrors']!r}")
        return self.check_head(shape, out)

    def files(self, shape: dict) -> str:
        return f"the weights file {shape['weights']}" if shape["weights"] else f"the weights {shape['model']}'s package ships"

    def encode_to(self, shape: dict, inputs, device, depth: int, progress: bool):
        return trunks.encode_images(trunks.cached_trunk(shape, device), inputs, depth, progress=progress)

    def export_encoder(self, shape: dict, depth: int):
        depth = max(1, min(depth, shape["depth"]))  # as encode runs it
        return trunks.Encoder(trunks.load_trunk(shape, torch.device("cpu")), depth, self.input_width(shape))

    def describe(self, shape: dict) -> str:
        return f"the pretrained {shape['model']} at {shape['input_size']} px"

    def side(self, shape: dict, image_size: int | None) -> int | None:
        return shape["input_size"]

    def trunk_flops(self, shape: dict, layer: int) -> int:
        return trunks.tap_flops(shape["model"], shape["input_size"])[layer]

    def tap_costs(self, shape: dict, inputs=None, device=None) -> np.ndarray:
        """The trunk's FLOPs to each tap, (1, taps): the same for every image."""
        return np.asarray(trunks.tap_flops(shape["model"], shape["input_size"]), np.float64)[None, :]

    def config_dict(self, shape, classes, hidden) -> dict:
        d = {"classes": list(classes)} if shape["head"] else {}
        extra = {"weights": shape["weights"]} if shape["weights"] else {}
        extra.update({"mirrors": True} if shape["mirrors"] else {})
        return {**d, "kind": self.name, "model": shape["model"], **extra, **self.head_config(shape, hidden)}

    def parse(self, table, classes, image_size, hidden=(), activation="relu") -> dict:
        """The [parent] keys checked before any work: the network is known and its code and weights are installed,
        the weights file matches it, the head's tap exists, the image size suits it."""
        from branching.models.module_parent import weights_sha256
        data, headless = table.data, not classes
        name = table.require("model", f'write e.g. model = "efficientnet-lite0" (one of {", ".join(trunks.NETWORKS)})')
        try:
            net = trunks.network(name)
            with torch.device("meta"):
                trunks.build(net.name, 32)  # its code imports
        except ValueError as e:
            raise table.line(f"model: {e}") from None
        except MissingPackageError as e:
            raise MissingPackageError(f"{table.origin}: [{table.name}] model: {e}") from None
        size = net.size if image_size is None else image_size
        if not SIZES[0] <= size <= SIZES[1]:
            raise ConfigError(f"{table.origin}: [data] image_size: {net.name} cannot take {size}-pixel images (its "
                              f"stride is 32: at 32 px its last stage sees a single position, below it earlier ones "
                              f"do too); write image_size = {net.size} (its own size) or at least {SIZES[0]}")
        weights = data.get("weights", "")
        if weights:
            beside = Path(table.origin).parent / str(weights)  # a file named relative to the config file
            if isinstance(weights, str) and not Path(weights).is_absolute() and beside.is_file():
                weights = str(beside.resolve())
            if not isinstance(weights, str) or not Path(weights).is_file():
                raise table.error("weights", "is not a file", f"pass the path of a state_dict of {net.name}, or leave "
                                                              f"it out for the packaged weights")
            weights = str(Path(weights).resolve())
        try:
            path = weights or trunks.packaged_weights(net)
        except MissingPackageError as e:
            raise MissingPackageError(f"{table.origin}: [{table.name}] model: {e}") from None
        try:
            state = trunks.read_weights(path, mmap=True)
            with torch.device("meta"):
                wanted = trunks.build(net.name, size).state_dict()
            shapes = {k: tuple(v.shape) for k, v in state.items()}
            trunks.match_weights(shapes, {k: tuple(v.shape) for k, v in wanted.items()}, path,
                                 f"pass a state_dict of {net.name}{trunks.whose(shapes, net.name)}")
        except ValueError as e:
            raise table.line(f"weights: {e}") from None
        if headless and any(k in data for k in ("layer", "pool", "hidden")):
            key = next(k for k in ("layer", "pool", "hidden") if k in data)
            raise table.error(key, "is for the parent's head, and a pretrained parent without classes has none",
                              "remove it, or give the parent classes")
        names = [n for n, _ in trunks.tap_widths(net.name, size)]
        layer = data.get("layer", -1)
        if isinstance(layer, str):
            if layer not in names:
                raise table.error("layer", f"is not a tap of {net.name}{past_or_close(layer, names)}; its taps are "
                                           f"{', '.join(names)}", 'write e.g. layer = "block10" or layer = -1 (the head)')
            layer = names.index(layer)
        elif isinstance(layer, bool) or not isinstance(layer, int) or not -len(names) <= layer < len(names):
            raise table.error("layer", f"is past {net.name}'s taps ({len(names)}: {names[0]} .. {names[-1]})",
                              f"write an index in -{len(names)}..{len(names) - 1} or a tap name")
        pool = data.get("pool", self.default_pool)
        if pool not in self.pools:
            raise table.error("pool", "does not apply to a pretrained parent's taps", f"use one of: {', '.join(self.pools)}")
        return self.check_shape({"model": net.name, "weights": weights, "weights_sha256": weights_sha256(path),
                                 "input_size": size, "mirrors": bool(table.flag("mirrors")),
                                 "head_layer": layer % len(names), "head_pool": pool,
                                 "hidden": list(hidden), "activation": activation, "head": not headless})
