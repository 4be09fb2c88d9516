"""Training recipes: the original study's, exactly, and ours (`default`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from branching.errors import ConfigError
from branching.models.kinds import get_kind


@dataclass(frozen=True)
class NodeRecipe:
    """How one node is trained and how its predictions are accepted by default."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str
    dropout: float
    label_smoothing: float = 0.0
    lr_schedule: str | None = None
    patience: int | None = None        # early stopping on validation loss; None: no early stopping
    flip: bool = False                 # random horizontal flips of the training images
    # Parent: fraction of its training images held out for validation (0: none).
    # Branch: "own" = an 80/20 stratified split of its own training images (the original's);
    #         "parent" = the parent's held-out images, which the parent never trained on.
    validation: float | str = 0.0
    crop: int = 0                      # random shifts of the training images by up to this many pixels
    where: str = "pre"                 # branches: read the source layer before/after its activation
    threshold: float = 0.96            # acceptance threshold on the max softmax probability
    calibrate: bool = False            # fit a temperature on validation logits before the threshold
    # On a CUDA device, the batch size, learning rate and epochs to train with instead (None: the ones above):
    # a GPU reaches its speed only with large batches; chosen on validation like the rest (tune_kinds.py)
    gpu_batch_size: int | None = None
    gpu_lr: float | None = None
    gpu_epochs: int | None = None

    def on(self, device) -> "NodeRecipe":
        """The recipe as it trains on `device` (a torch.device): with its GPU batch size, rate and epochs on CUDA."""
        if getattr(device, "type", None) != "cuda" or self.gpu_batch_size is None:
            return self
        return replace(self, batch_size=self.gpu_batch_size, lr=self.gpu_lr or self.lr,
                       epochs=self.gpu_epochs or self.epochs)


@dataclass(frozen=True)
class Recipe:
    name: str
    parent: NodeRecipe             # an MLP parent's
    branch: NodeRecipe
    kinds: tuple = ()              # (kind, NodeRecipe): the parents of the other kinds

    def parent_for(self, kind: str) -> NodeRecipe:
        """How a parent of `kind` is trained; a recipe without one for the kind is a ConfigError."""
        if kind == "mlp":
            return self.parent
        found = dict(self.kinds).get(kind)
        if found is None:
            raise ConfigError(f"recipe {self.name!r} trains MLP parents only (the original study's); a {kind} "
                              f"parent needs --recipe default")
        return found

    def branch_for(self, parent_kind: str) -> NodeRecipe:
        """How a branch is trained in a tree whose parent is of `parent_kind`: mirror images only where the
        inputs have them (not texts), shifts only of pixels (not of an encoded parent's vectors)."""
        kind = get_kind(parent_kind)
        if kind.mirrors and not kind.encoded:
            return self.branch
        return replace(self.branch, flip=self.branch.flip and kind.mirrors, crop=0)

    def to_dict(self, kind: str = "mlp") -> dict:
        """The recipe as a checkpoint records it: with the parent recipe of `kind` (None where it has none,
        as the original's for a branch of a CNN parent)."""
        parent = self.parent if kind == "mlp" else dict(self.kinds).get(kind)
        return {"name": self.name, "parent": None if parent is None else asdict(parent), "branch": asdict(self.branch)}


ORIGINAL = Recipe(
    name="original",
    parent=NodeRecipe(epochs=200, batch_size=64, lr=1e-3, weight_decay=0.0, optimizer="adam", dropout=0.3),
    branch=NodeRecipe(epochs=500, batch_size=32, lr=3e-4, weight_decay=0.01, optimizer="adam", dropout=0.5,
                      patience=50, validation="own"),
)

# Chosen on validation data of cifar100-6 (see README, "Recipes"): larger batches and a one-cycle
# schedule make the parent about 10x cheaper; flips and label smoothing regularise it; every node
# validates on images the parent never trained on.
DEFAULT = Recipe(
    name="default",
    parent=NodeRecipe(epochs=40, batch_size=256, lr=2e-3, weight_decay=0.05, optimizer="adamw", dropout=0.3,
                      label_smoothing=0.1, lr_schedule="onecycle", flip=True, validation=0.15,
                      calibrate=True),
    branch=NodeRecipe(epochs=60, batch_size=64, lr=1e-3, weight_decay=0.01, optimizer="adamw", dropout=0.5,
                      label_smoothing=0.1, patience=20, flip=True, validation="parent", calibrate=True),
)

# Parents of the other kinds (branching.nets): flips and shifts of up to 4 pixels, one-cycle AdamW. The
# CNN's and the ViT's epochs were chosen on validation accuracy (benchmarks/tune_kinds.py, docs/kinds.md);
# the module parent is never trained, its recipe holds out the branches' validation images.
DEFAULT = replace(DEFAULT, kinds=(
    # on a GPU: batches of 512 (a quarter of the steps), which need twice the epochs to match 128's validation
    # accuracy (91.3% pooled over seeds 0-2 for both; 18 epochs of 512 gave 87.9%; docs/scale.md)
    ("cnn", NodeRecipe(epochs=18, batch_size=128, lr=3e-3, weight_decay=0.05, optimizer="adamw", dropout=0.1,
                       label_smoothing=0.1, lr_schedule="onecycle", flip=True, crop=4, validation=0.15,
                       calibrate=True, gpu_batch_size=512, gpu_lr=6e-3, gpu_epochs=36)),
    ("vit", NodeRecipe(epochs=60, batch_size=128, lr=1e-3, weight_decay=0.05, optimizer="adamw", dropout=0.0,
                       label_smoothing=0.1, lr_schedule="onecycle", flip=True, crop=4, validation=0.15,
                       calibrate=True)),
    # a module parent is never trained: only its validation hold-out (on which its branches validate) and,
    # where it has a head, its calibration and threshold apply; epochs and the rest are unused
    ("module", NodeRecipe(epochs=1, batch_size=256, lr=1e-3, weight_decay=0.0, optimizer="adamw", dropout=0.0,
                          validation=0.15, calibrate=True)),
    # a text parent's transformer is frozen: only its head (when it has classes) is trained, on the encoded
    # texts, with early stopping on the held-out share
    ("text", NodeRecipe(epochs=60, batch_size=128, lr=1e-3, weight_decay=0.01, optimizer="adamw", dropout=0.1,
                        patience=10, validation=0.15, calibrate=True)),
    # a pretrained image network is frozen too: its head trains on the encoded images (where the parent encodes
    # their mirror images too, mirrors = true, a coin per image chooses the mirror image's; TreeData.augments)
    ("pretrained", NodeRecipe(epochs=60, batch_size=128, lr=1e-3, weight_decay=0.01, optimizer="adamw", dropout=0.1,
                              patience=10, flip=True, validation=0.15, calibrate=True))))

RECIPES = {r.name: r for r in (ORIGINAL, DEFAULT)}


def get_recipe(name: str, max_epochs: int | None = None) -> Recipe:
    """The recipe called `name`; `max_epochs` caps every node's epochs (for quick runs and tests)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    if max_epochs is None:
        return recipe
    if max_epochs < 1:
        raise ConfigError(f"--max-epochs must be at least 1, got {max_epochs}")
    cap = lambda node: replace(node, epochs=min(node.epochs, max_epochs),  # noqa: E731
                               gpu_epochs=None if node.gpu_epochs is None else min(node.gpu_epochs, max_epochs))
    return replace(recipe, parent=cap(recipe.parent), branch=cap(recipe.branch),
                   kinds=tuple((kind, cap(node)) for kind, node in recipe.kinds))
