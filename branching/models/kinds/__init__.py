"""The registry of parent kinds, as timm registers its models: a kind is one class in one file of this folder,
registered under its name with `register_kind`, and found by `get_kind(name)` (the `kind` of a tree's
[parent] table, of a model file). The class says how a parent of its kind is built or loaded (`build`,
`parse`, `check_shape`), its taps and their shapes and costs (`taps`, `tap`, `trunk_flops`), how a tap is
read and pooled (`read`, `wheres`), its preprocessing (`normalization`) and whether it trains or stays frozen
(`trunk`). Everything else in the package asks the kind; its name appears elsewhere only as data (the recipes'
table of parents by kind; "mlp", the kind of model files written before kinds).

Adding a kind: a file here with a subclass of ParentKind decorated with @register_kind, imported at the end of
this module.
"""

from branching.models.kinds.base import (NORMALIZATIONS, TRUNKS, ParentKind, by_name, config_keys, get_kind,
                                         kind_names, owners, reads_of, register_kind, resolve_layer)
# the built-in kinds register themselves on import, in this order
from branching.models.kinds import mlp, cnn, vit, module, text, pretrained  # noqa: E402,F401,I001

__all__ = ["NORMALIZATIONS", "TRUNKS", "ParentKind", "by_name", "config_keys", "get_kind", "kind_names", "owners",
           "reads_of", "register_kind", "resolve_layer"]
