"""The original's parent (kind = "mlp", the default): an MLP on flattened pixels, each pixel standardised; its
taps are every hidden layer before ("pre") and after ("post") its activation. Branches are MLPs too."""

from __future__ import annotations

from branching.models import nets
from branching.models.kinds.base import ParentKind, by_name, register_kind, resolve_layer


@register_kind
class MLP(ParentKind):
    name = "mlp"
    normalization = "pixel"
    hidden_default = (1024, 512)
    wheres = nets.WHERE
    compare_methods = ("scratch_mlp", "finetune")
    fused = True
    lists_layers = True

    def check_architecture(self, arch: list) -> list:
        return arch  # any widths [in, hidden..., out]

    def architecture(self, width, hidden, classes) -> list:
        return [width, *hidden, classes]

    def build(self, architecture, activation, dropout, shape):
        return nets.MLPNet(architecture, activation, dropout)

    def fingerprinted(self) -> bool:
        return False

    def describe(self, shape: dict) -> str:
        return "an mlp"

    def taps(self, shape, side, classes, hidden=(), dropout=None) -> list[dict]:
        return [{"name": f"hidden{i}.{where}", "layer": i, "where": where, "shape": (width,)}
                for i, width in enumerate(hidden) for where in nets.WHERE]

    def tap(self, info, layer, where=None) -> dict:
        if isinstance(layer, str):
            return by_name(info, layer, where)
        where = "post" if where is None else where
        if where not in nets.WHERE:
            raise ValueError(f"where must be 'pre' or 'post'; got {where!r}")
        return info[2 * resolve_layer(layer, len(info) // 2) + nets.WHERE.index(where)]

    def layers(self, info) -> list[str]:
        return [i["name"].split(".")[0] for i in info[::2]]

    def config_dict(self, shape, classes, hidden) -> dict:
        return {"classes": list(classes), "hidden": list(hidden)}
