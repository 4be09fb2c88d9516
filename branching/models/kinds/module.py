"""Bring your own parent (kind = "module"): any importable torch.nn.Module with a local state_dict file,
frozen, never trained, tapped by module name (branching.models.module_parent); its own head is the parent's only
with head = true."""

from __future__ import annotations

from branching.models import module_parent
from branching.models.kinds.base import ParentKind, register_kind


@register_kind
class Module(ParentKind):
    name = "module"
    trunk = "frozen"
    config_keys = module_parent.SPEC_KEYS
    compare_methods = None  # its baselines would train or fine-tune the parent
    head_fix = "set head = true in [parent] if the module's outputs are the classes in order"

    def check_shape(self, shape: dict) -> dict:
        return module_parent.check_shape(shape)

    def build(self, architecture, activation, dropout, shape):
        return module_parent.ModuleNet(architecture[-1], **shape)

    def has_head(self, shape: dict) -> bool:
        return shape["head"]

    def files(self, shape: dict) -> str:
        return f"the weights file {shape.get('weights') or ''}".rstrip()

    def batch_rows(self, net, batch_size: int) -> int:
        return net.batch_rows(batch_size)

    def describe(self, shape: dict) -> str:
        return f"the module {shape['module']}"

    def parse(self, table, classes, image_size, hidden=(), activation="relu") -> dict:
        return module_parent.parse_keys(table, classes)

    def config_dict(self, shape, classes, hidden) -> dict:
        # the weights' hash is the file's, computed again when the config is read
        return {"classes": list(classes), "kind": self.name, **{k: v for k, v in shape.items() if k != "weights_sha256"}}

    def load_weights(self, net, shape: dict) -> None:
        module_parent.load_weights(net, shape["weights"])

    def file_meta(self, shape: dict) -> dict:
        return {k: shape[k] for k in ("module", "weights", "weights_sha256")}

    def trust(self, table: dict) -> None:
        module_parent.trust(table.get("module"))

    def given_stats(self, shape: dict):
        """The config's mean and std (0..1 scale), or None: then the training images' per-channel statistics."""
        return (shape["mean"], shape["std"]) if "mean" in shape else None
