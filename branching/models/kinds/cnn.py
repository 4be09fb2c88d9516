"""A small CNN trained from scratch (kind = "cnn"): stages of 3x3 convolutions, batch norm and ReLU, each
after the first halving the image; taps are its stages. Images standardised per colour channel."""

from __future__ import annotations

from branching.models import nets
from branching.models.kinds.base import ParentKind, positive_ints, register_kind

MAX_STAGES = 6  # a stage halves the side: at 32 pixels 32, 16, 8, 4, 2, 1
DEFAULTS = {"widths": [32, 64, 128], "depth": 2}


@register_kind
class CNN(ParentKind):
    name = "cnn"
    config_keys = tuple(DEFAULTS)

    def check_shape(self, shape: dict) -> dict:
        out = checked_keys(self.name, shape, DEFAULTS)
        if len(out["widths"]) > MAX_STAGES:
            raise ValueError(f"cnn widths: at most {MAX_STAGES} stages (each halves the image's side); got "
                             f"{len(out['widths'])}")
        return out

    def build(self, architecture, activation, dropout, shape):
        return nets.ConvNet(architecture[-1], dropout=dropout, side=nets.image_side(architecture[0]), **shape)


def checked_keys(kind: str, shape, defaults: dict) -> dict:
    """A small network's shape keys: known, positive integers (lists of them where the default is a list)."""
    if not isinstance(shape, dict) or set(shape) - set(defaults):
        unknown = sorted(set(shape) - set(defaults)) if isinstance(shape, dict) else shape
        raise ValueError(f"unknown {kind} shape keys {unknown}; {kind} takes {', '.join(defaults)}")
    out = {**defaults, **shape}
    for key, value in out.items():
        positive_ints(value, key, isinstance(defaults[key], list), kind)
    return out
