"""Size and inference cost of the dense paths through a tree, from the config alone.

FLOPs count 2 * fan_in * fan_out per Linear layer (one multiply and one add per weight); biases,
activations and the softmax are left out, as is usual for MLPs.
"""

from __future__ import annotations

from .config import TreeConfig
from .data import N_PIXELS


def input_widths(config: TreeConfig, name: str) -> list[int]:
    """Widths from the pixels to what node `name` reads: [3072] for the parent, then the hidden
    layers of each source on the way (up to and including the layer read)."""
    spec = config.node(name)
    if spec.source is None:
        return [N_PIXELS]
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
