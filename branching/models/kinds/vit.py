"""A small vision transformer trained from scratch (kind = "vit"): patch embedding, a class token, pre-norm
blocks; taps are its blocks' tokens. Images standardised per colour channel."""

from __future__ import annotations

from branching.models import nets
from branching.models.kinds.base import ParentKind, register_kind
from branching.models.kinds.cnn import checked_keys

DEFAULTS = {"dim": 96, "depth": 4, "heads": 4, "patch": 4, "mlp_ratio": 2}


@register_kind
class ViT(ParentKind):
    name = "vit"
    config_keys = tuple(DEFAULTS)

    def check_shape(self, shape: dict) -> dict:
        return checked_keys(self.name, shape, DEFAULTS)

    def build(self, architecture, activation, dropout, shape):
        return nets.ViTNet(architecture[-1], dropout=dropout, side=nets.image_side(architecture[0]), **shape)
