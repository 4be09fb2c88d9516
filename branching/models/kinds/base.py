"""The base of every parent kind (ParentKind), the registry (register_kind, get_kind) and what kinds share;
see branching.models.kinds."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from branching.errors import ConfigError, did_you_mean
from branching.models import nets

# How a parent of a kind gets its weights:
#   "trained": the whole network trains on the tree's images (the MLP, the CNN, the ViT);
#   "frozen":  a network loaded from a weights file and never trained; its own head used only where it says so;
#   "encoded": a frozen network run once per input, its taps pooled into vectors that are cached on disk; the
#              parent the tree sees reads those vectors, and only its head (when it has classes) trains.
TRUNKS = ("trained", "frozen", "encoded")
NORMALIZATIONS = ("pixel", "channel", "value")  # per pixel, per colour channel, per encoded value

_KINDS: dict[str, ParentKind] = {}


class ParentKind:
    """A kind of parent network. Subclasses set the attributes and override the methods that differ."""

    name: str = ""
    trunk: str = "trained"            # one of TRUNKS
    reads: str = "images"             # what the tree's inputs are: "images" or "texts"
    normalization: str = "channel"    # one of NORMALIZATIONS: how the parent's inputs are standardised
    config_keys: tuple = ()           # the [parent] keys of this kind (besides classes, kind, dropout, accept, ...)
    hidden_default: tuple | None = None  # default `hidden` (the MLP's layers, an encoded parent's head); None: no key
    wheres: tuple = (None,)           # what a tap's `where` can be: the MLP's pre and post, an encoded one's poolings
    compare_methods: tuple | None = ("scratch", "finetune")  # compare's methods on the trunk; None: no compare
    fused: bool = False               # routing runs its layers as fused NumPy arithmetic (an MLP of Linears)
    lists_layers: bool = False        # its architecture lists its hidden layers (the MLP's [in, hidden..., out])
    head_fix: str = ""                # how to give a parent of this kind a head, where it may have none
    staged: bool = False              # its frozen trunk runs tap by tap (kind.stages): early exits can stop it

    @property
    def encoded(self) -> bool:
        return self.trunk == "encoded"

    @property
    def mirrors(self) -> bool:
        """Whether the inputs have mirror images (images do, as pixels or as cached encodings; texts do not)."""
        return self.reads == "images"

    # ---- the network -----------------------------------------------------------------------------

    def check_shape(self, shape: dict) -> dict:
        """The kind's shape keys (what a model file records) with defaults filled in; a ValueError otherwise."""
        if shape:
            raise ValueError(f"a {self.name} parent has no shape keys; got {sorted(shape)}")
        return {}

    def check_architecture(self, arch: list) -> list:
        """[inputs, classes], the inputs a square RGB image (3 * side * side); a ValueError otherwise."""
        try:
            if len(arch) != 2:
                raise ValueError
            nets.image_side(arch[0])
        except ValueError:
            raise ValueError(f"a {self.name}'s architecture is [3 * side * side, classes] (e.g. [3072, classes] for "
                             f"32-pixel images); got {arch!r}") from None
        return arch

    def build(self, architecture: list, activation: str, dropout, shape: dict) -> nn.Module:
        raise NotImplementedError

    def architecture(self, width: int, hidden, classes: int) -> list:
        """The architecture of a parent reading `width` numbers per input: [width, classes] (the MLP lists its
        hidden layers between them)."""
        return [width, classes]

    def has_head(self, shape: dict) -> bool:
        """Whether the network's output is the parent's class logits."""
        return True

    def input_width(self, shape: dict, side: int) -> int:
        """The numbers per input the parent reads: the pixels of a side x side image by default."""
        return nets.image_width(side)

    def batch_rows(self, net: nn.Module, batch_size: int) -> int:
        """Inputs per inference batch through `net` (fewer than batch_size where the network enlarges them)."""
        return batch_size

    def describe(self, shape: dict) -> str:
        """The parent in a few words, for what a command says it will do."""
        return f"a {self.name}"

    def fingerprinted(self) -> bool:
        """Whether the kind and shape enter a model's fingerprint and file (not for the MLP: its files and
        fingerprints predate kinds)."""
        return True

    # ---- taps ------------------------------------------------------------------------------------

    def taps(self, shape: dict, side: int, classes: int, hidden=(), dropout=None) -> list[dict]:
        """The points a branch can read (the network's feature_info), without building it for real."""
        with torch.device("meta"):
            return self.build([self.input_width(shape, side), classes], "relu", dropout, self.check_shape(shape)
                              ).feature_info

    def tap(self, info: list[dict], layer, where=None) -> dict:
        """A feature_info entry: by name, or by index (negative counts from the end)."""
        if isinstance(layer, str):
            return by_name(info, layer, where)
        if where is not None:
            raise ValueError(f"where is for MLP layers; a {self.name}'s taps are {', '.join(i['name'] for i in info)}")
        return info[resolve_layer(layer, len(info))]

    def layers(self, info: list[dict]) -> list[str]:
        """The names of the layers a branch can read, in order (one per layer, whatever its wheres)."""
        return list(dict.fromkeys(i["name"] for i in info))

    def branch_where(self, where, default):
        """The `where` a branch reads a tap of this kind at: for an MLP's (pre or post) the config's, else the
        recipe's `default`; None for the other kinds (an encoded parent's pooling is the branch's pool)."""
        return (where or default) if self.wheres == nets.WHERE else None

    def read(self, where, pool) -> tuple:
        """(where, pool) of a read as a branch records it; the kinds whose taps are pooled already say so."""
        return where, pool

    def trunk_flops(self, shape: dict, layer: int) -> int:
        """FLOPs per input of the part of the network that the taps' vectors do not show, up to tap `layer`
        (an encoded parent's frozen trunk; 0 where the network is the one the tree runs)."""
        return 0

    # ---- the config ------------------------------------------------------------------------------

    def parse(self, table, classes: tuple, image_size: int | None, hidden=(), activation="relu") -> dict:
        """The [parent] table's keys of this kind (a branching.config.table.Table), checked before any work, with
        the parent's classes, [data] image_size and (where the kind has them) hidden and activation; returns the
        shape keys."""
        try:
            return self.check_shape({k: v for k, v in table.data.items() if k in self.config_keys})
        except ValueError as e:
            raise table.line(f"{e}; see the {self.name} keys in the README") from None

    def config_dict(self, shape: dict, classes: tuple, hidden: tuple) -> dict:
        """The TOML keys that give back this parent: its classes and the kind's own keys (the rest, such as
        accept, are every kind's)."""
        return {"classes": list(classes), "kind": self.name, **shape}

    def load_weights(self, net: nn.Module, shape: dict) -> None:
        """A frozen parent's weights into its network (strictly; a ValueError in one line otherwise)."""
        raise NotImplementedError(f"a {self.name} parent is not loaded from a weights file")

    def given_stats(self, shape: dict):
        """A frozen parent's per-channel mean and std (0..1 scale) that its config gives, or None."""
        return None

    def file_meta(self, shape: dict) -> dict:
        """What a frozen parent's checkpoint records of the files it was loaded from."""
        return {}

    def files(self, shape: dict) -> str:
        """The files outside the model file that a parent of this kind is built from (their sha256 is recorded)."""
        return "its files"

    def trust(self, table: dict) -> None:
        """Let the code a config the user passes names be imported (a model file's may not be: module_parent.trust)."""

    def export_encoder(self, shape: dict, depth: int):
        """An encoded parent's frozen network as an nn.Module from the tree's inputs to the vectors the parent
        reads (branching export puts it in the graph), running `depth` taps deep."""
        raise ConfigError(f"a {self.name} parent's tree does not export yet; use branching.load(RUN) in Python")

    def side(self, shape: dict, image_size: int | None) -> int | None:
        """The side of the images the tree's data are decoded at, where the kind sets it (None: the config's
        [data] image_size, or 32)."""
        return None


def register_kind(cls):
    """Class decorator: register a ParentKind subclass under its `name`."""
    if not cls.name or cls.name in _KINDS:
        raise ValueError(f"parent kind {cls.name!r} is unnamed or registered twice")
    if cls.trunk not in TRUNKS or cls.normalization not in NORMALIZATIONS:
        raise ValueError(f"parent kind {cls.name!r}: trunk must be one of {TRUNKS}, normalization one of "
                         f"{NORMALIZATIONS}")
    _KINDS[cls.name] = cls()
    return cls


def get_kind(name) -> ParentKind:
    """The registered kind called `name`; a ValueError listing them otherwise."""
    if name not in _KINDS:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}; got {name!r}{did_you_mean(name, _KINDS)}")
    return _KINDS[name]


def reads_of(name: str | None) -> str:
    """What a tree whose parent is of kind `name` (None: the MLP, as files written before kinds) reads."""
    return get_kind(name or "mlp").reads


def kind_names() -> tuple[str, ...]:
    return tuple(_KINDS)


def owners(key: str) -> list[str]:
    """The kinds whose [parent] table takes `key` (hidden and activation: those with a head or layers of their own)."""
    if key in ("hidden", "activation"):
        return [k.name for k in _KINDS.values() if k.hidden_default is not None]
    return [k.name for k in _KINDS.values() if key in k.config_keys]


def config_keys() -> tuple[str, ...]:
    """Every kind's own [parent] keys, once each."""
    return tuple(dict.fromkeys(key for k in _KINDS.values() for key in k.config_keys))


# ---- shared by the kinds -----------------------------------------------------------------------------

def by_name(info: list[dict], layer: str, where=None) -> dict:
    found = [i for i in info if i["name"] == layer]
    if not found:
        raise ValueError(f"no tap named {layer!r}{did_you_mean(layer, [i['name'] for i in info])}; taps are "
                         f"{', '.join(dict.fromkeys(i['name'] for i in info))}")
    if where is not None and where != found[0]["where"]:
        raise ValueError(f"tap {layer!r} is {found[0]['where']!r}, not {where!r}")
    return found[0]


def resolve_layer(layer, n: int) -> int:
    """An index into n layers (negative counts from the end), checked."""
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer must be an int or a tap name; got {layer!r}")
    if n == 0:
        raise ValueError("model has no hidden layers")
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} out of range: valid layers are {-n}..{n - 1}")
    return int(layer) % n


def positive_ints(value, key: str, listed: bool, kind: str) -> None:
    values = value if listed and isinstance(value, (list, tuple)) else [value]
    if (listed and not isinstance(value, (list, tuple))) or not values or \
            any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{kind} {key} must be {'a list of positive integers' if listed else 'a positive integer'}; "
                         f"got {value!r}")

