"""Size and inference cost of the paths through a tree.

FLOPs count 2 per multiply-add (2 * fan_in * fan_out per Linear layer, the same for convolutions and
attention); biases, activations, normalisation and the softmax are left out. An MLP tree's are computed
from the config alone (`path_widths`); any tree's are counted by torch on the models themselves
(`path_flops`, `flops_to`), which gives the same figures for MLPs, with an encoded parent's frozen network up
to the tap read (its kind's trunk_flops; a text parent's transformer is not modelled).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from branching.config.tree import TreeConfig
from branching.models.forward import chain, node_input, read, read_tap


def input_widths(config: TreeConfig, name: str) -> list[int]:
    """Widths from the pixels to what node `name` reads: [3 * side * side] for the parent, then the hidden
    layers of each source on the way (up to and including the layer read)."""
    spec = config.node(name)
    if spec.source is None:
        return [config.input_width]
    return reading_widths(config, spec.source, spec.layer)


def reading_widths(config: TreeConfig, source: str, layer: int) -> list[int]:
    """Widths from the pixels to hidden layer `layer` of node `source`."""
    return input_widths(config, source) + list(config.node(source).hidden[:layer + 1])


def path_widths(config: TreeConfig, name: str) -> list[int]:
    """Every width on node `name`'s inference path, from the pixels to its outputs."""
    spec = config.node(name)
    return input_widths(config, name) + list(spec.hidden) + [len(spec.classes)]


def linear_flops(widths) -> int:
    """Inference FLOPs per image of a chain of Linear layers with these widths."""
    return sum(2 * a * b for a, b in zip(widths[:-1], widths[1:]))


def linear_params(widths) -> int:
    """Weights and biases of a chain of Linear layers with these widths."""
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def counted(fn) -> int:
    """FLOPs that torch counts while fn() runs."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def trunk_flops(models, node: str, layer: int | None = None) -> int:
    """FLOPs of an encoded parent's frozen network (0 for other parents) for what node `node` needs: up to the
    parent's tap `layer` when `node` is the parent, else up to the tap its chain's first branch reads (the parent's
    own path: its head's tap)."""
    parent = models["parent"]
    kind = parent.net_kind
    if not kind.encoded:
        return 0
    if node != "parent":
        layer = models[chain(models, node)[1]].meta.layer
    elif layer is None:
        layer = parent.shape["head_layer"]
    return kind.trunk_flops(parent.shape, read(models, "parent", layer)[1])


def flops_to(models, r) -> int:
    """FLOPs of one image from the pixels to read r (node, layer, where[, pool]), an encoded parent's network
    included."""
    return (counted(lambda: read_tap(models, r, torch.zeros(1, models["parent"].architecture[0])))
            + trunk_flops(models, r[0], r[1]))


def path_flops(models, name: str) -> int:
    """FLOPs of one image from the pixels to node `name`'s outputs, an encoded parent's network included."""
    return (counted(lambda: models[name].net(node_input(models, name, torch.zeros(1, models["parent"].architecture[0]))))
            + trunk_flops(models, name))
