"""torchly: the original's small Keras-like networks on PyTorch (build, fit, predict, activations,
save/load). The code lives in branching.models; this module keeps the original's name for its scripts."""

from branching.models.checks import MAX_PARAMETERS, as_2d_float, declared_network
from branching.models.device import resolve_device
from branching.models.kinds import kind_names
from branching.models.model import FORMAT, Model
from branching.models.nets import ACTIVATIONS, WHERE

KINDS = kind_names()  # the registered kinds of network (branching.models.kinds)

__all__ = ["ACTIVATIONS", "FORMAT", "KINDS", "MAX_PARAMETERS", "WHERE", "Model", "as_2d_float", "declared_network",
           "resolve_device"]
