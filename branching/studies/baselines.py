"""The methods that `compare` runs for a branch, each trained and evaluated on the same splits.

Each `run_*` function takes the seed's shared context and a branch's spec and returns an Outcome: test
logits, the acceptance rule fit on validation, and what the method cost. Per seed the default-recipe
parent is trained once and shared by every method that needs one; every method's temperature and
threshold are fit on validation images, never on the test split.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from branching.acceptance.rule import Acceptance
from branching.config.recipes import DEFAULT, ORIGINAL, Recipe, get_recipe
from branching.config.tree import NodeSpec, TreeConfig
from branching.console import log
from branching.data.tree_data import TreeData
from branching.models.device import CPU
from branching.models.batches import Augment
from branching.models.forward import augment_transform, chain, extract, node_input, node_inputs, read
from branching.models.model import Model
from branching.studies.probe import fit_linear_probe, held_out_split
from branching.train.features import FeatureCache
from branching.train.nodes import branch_read, fit_acceptance, fit_kwargs, parent_normalizer, train_branch, train_parent
from branching.tree import cost

# End-to-end fine-tuning: the default branch recipe at a tenth of its learning rate, larger batches
# (the whole trunk trains) and fewer epochs.
FINETUNE = replace(DEFAULT.branch, lr=1e-4, batch_size=128, epochs=20, patience=8)


@dataclass
class Recipes:
    """The recipes of one comparison: ours, the original's, and the fine-tuning one."""

    default: Recipe = DEFAULT
    original: Recipe = ORIGINAL
    finetune: object = FINETUNE

    @classmethod
    def capped(cls, max_epochs: int | None) -> "Recipes":
        """All recipes with every node's epochs capped (quick runs and tests)."""
        if max_epochs is None:
            return cls()
        return cls(get_recipe("default", max_epochs), get_recipe("original", max_epochs),
                   replace(FINETUNE, epochs=min(FINETUNE.epochs, max_epochs)))


@dataclass
class Outcome:
    """One method's output for one branch and seed, before scoring."""

    logits: np.ndarray            # test logits (N, classes) over the branch's test images
    acceptance: Acceptance | None  # temperature and threshold fit on validation; None: accuracy only
    trainable_parameters: int     # parameters this method trains (0: none)
    inference_flops: int          # per image, from the pixels to the prediction
    train_s: float                # own training time, including any branch it starts from
    parent_s: float               # training time of the parent it needs (0: none)
    detail: dict = field(default_factory=dict)


@dataclass
class SeedContext:
    """Everything shared by the methods of one seed."""

    config: TreeConfig
    data: TreeData
    seed: int
    recipes: Recipes
    progress: bool
    models: dict                   # the default-recipe tree, filled in as branches are trained
    original_models: dict          # the tree the original-recipe branches read
    parent_s: float
    original_parent_s: float
    branch_s: dict = field(default_factory=dict)
    cache_dir: str | None = None   # activations for the branches on other layers (features.FeatureCache)
    device: torch.device = CPU     # where every method trains


def count_parameters(net: nn.Module) -> int:
    """All parameters of a network, trainable or frozen."""
    return sum(p.numel() for p in net.parameters())


def restricted_logits(parent_logits: np.ndarray, parent_classes, classes) -> np.ndarray:
    """The parent's logits of `classes` only, in the order of `classes`."""
    return parent_logits[:, [list(parent_classes).index(c) for c in classes]]


def unrestricted_logits(parent_logits: np.ndarray, parent_classes, classes) -> np.ndarray:
    """The branch's classes' logits plus a last column holding the best other class's logit, so that
    argmax is the parent's own prediction and a prediction outside `classes` lands on the last column."""
    inside = restricted_logits(parent_logits, parent_classes, classes)
    others = [i for i, c in enumerate(parent_classes) if c not in classes]
    rest = parent_logits[:, others].max(axis=1, keepdims=True) if others else np.full((len(inside), 1), -np.inf)
    return np.concatenate([inside, rest], axis=1)


def node_split(ctx: SeedContext, spec: NodeSpec, split: str, parent: Model | None = None):
    """(normalised images, labels, row numbers) of a branch's classes in a split, for `parent`'s normaliser; an
    encoded parent's training vectors carry their mirror images' (NormalizedImages)."""
    normalizer = parent_normalizer(parent or ctx.models["parent"])
    if split == "train" and ctx.data.mirrored is not None:
        labels, rows = ctx.data.node_labels(split, spec)
        return normalizer.lazy(ctx.data.train.images, mirrored=ctx.data.mirrored)[rows], labels, rows
    images, labels, rows = ctx.data.node_rows(split, spec)
    return normalizer.transform(images), labels, rows


# ---- the methods ----------------------------------------------------------------------------

def run_branch(ctx: SeedContext, spec: NodeSpec) -> Outcome:
    start = time.perf_counter()
    # no feature cache here: the configured branch is trained exactly as `run` trains it, so that the
    # two report the same numbers for a seed (the cache changes the features' rounding)
    model, meta = train_branch(ctx.config, spec.name, ctx.models, ctx.data, ctx.recipes.default, ctx.seed,
                               ctx.progress, device=ctx.device)
    model.meta = meta
    ctx.models[spec.name] = model
    ctx.branch_s[spec.name] = seconds = time.perf_counter() - start
    X, _, _ = node_split(ctx, spec, "test")
    return Outcome(model.logits(node_inputs(ctx.models, spec.name, X)), Acceptance.of(meta),
                   count_parameters(model.net), cost.path_flops(ctx.models, spec.name),
                   seconds, ctx.parent_s, {"layer": spec.layer, "where": meta.where, "pool": meta.pool,
                                           "epochs_run": meta.history["epochs_run"]})


def run_branch_original(ctx: SeedContext, spec: NodeSpec) -> Outcome:
    start = time.perf_counter()
    models = ctx.original_models
    model, meta = train_branch(ctx.config, spec.name, models, ctx.data, ctx.recipes.original, ctx.seed, ctx.progress,
                               device=ctx.device, notes=False)
    model.meta = meta
    models[spec.name] = model
    seconds = time.perf_counter() - start
    X, _, _ = node_split(ctx, spec, "test", models["parent"])
    return Outcome(model.logits(node_inputs(models, spec.name, X)), Acceptance.of(meta), count_parameters(model.net),
                   cost.path_flops(models, spec.name), seconds, ctx.original_parent_s,
                   {"validation": meta.validation, "epochs_run": meta.history["epochs_run"]})


def _parent_head(ctx: SeedContext, spec: NodeSpec, restrict: bool) -> Outcome:
    parent, classes = ctx.models["parent"], ctx.config.parent.classes
    flops = cost.path_flops(ctx.models, "parent")
    X_test, _, _ = node_split(ctx, spec, "test")
    if not restrict:
        return Outcome(unrestricted_logits(parent.logits(X_test), classes, spec.classes), None, 0, flops, 0.0,
                       ctx.parent_s)
    start = time.perf_counter()
    X, labels, rows = node_split(ctx, spec, "train")
    _, val_idx, kind = held_out_split(parent, rows, labels)
    val_logits = restricted_logits(parent.logits(X[val_idx]), classes, spec.classes)
    acceptance = fit_acceptance(spec, ctx.recipes.default.branch, val_logits, labels[val_idx], notes=False)
    return Outcome(restricted_logits(parent.logits(X_test), classes, spec.classes), acceptance, 0, flops,
                   time.perf_counter() - start, ctx.parent_s, {"validation": kind})


def run_parent_head(ctx: SeedContext, spec: NodeSpec) -> Outcome:
    return _parent_head(ctx, spec, restrict=True)


def run_parent_unrestricted(ctx: SeedContext, spec: NodeSpec) -> Outcome:
    return _parent_head(ctx, spec, restrict=False)


def run_linear_probe(ctx: SeedContext, spec: NodeSpec, r: tuple | None = None) -> Outcome:
    """A linear probe on what the branch reads (or on read `r`)."""
    start = time.perf_counter()
    r = r or branch_read(ctx.models, spec, ctx.recipes.default.branch)
    X, labels, rows = node_split(ctx, spec, "train")
    train_idx, val_idx, kind = held_out_split(ctx.models["parent"], rows, labels)
    F = extract(ctx.models, [r], X)[0]
    probe, val = fit_linear_probe(F[train_idx], labels[train_idx], F[val_idx], labels[val_idx])
    acceptance = fit_acceptance(spec, ctx.recipes.default.branch, probe.logits(F[val_idx]), labels[val_idx],
                                notes=False)
    seconds = time.perf_counter() - start
    X_test, _, _ = node_split(ctx, spec, "test")
    flops = cost.flops_to(ctx.models, r) + cost.linear_flops([F.shape[1], len(spec.classes)])
    return Outcome(probe.logits(extract(ctx.models, [r], X_test)[0]), acceptance, probe.num_parameters, flops,
                   seconds, ctx.parent_s, {"layer": r[1], "where": r[2], "pool": r[3], "C": val["C"],
                                           "validation": kind})


def run_last_layer_probe(ctx: SeedContext, spec: NodeSpec) -> Outcome:
    """An encoded parent's last tap at its kind's default pooling, read by a linear probe: a text parent's sentence
    embedding (its last layer, mean-pooled, as sentence-transformers pools it), a pretrained CNN's features
    before its classifier (its head, averaged over positions)."""
    parent = ctx.models["parent"]
    kind = parent.net_kind
    last = len(kind.tap_widths(parent.shape)) - 1
    if last >= parent.shape["depth"]:
        raise ValueError("a probe on the last layer needs the last layer encoded")
    return run_linear_probe(ctx, spec, read(ctx.models, "parent", last, kind.default_pool))


def run_read(ctx: SeedContext, spec: NodeSpec, r: tuple) -> Outcome:
    """The branch, default recipe, reading another tap of its source: r = (source, layer, where, pool)."""
    encoded = ctx.models[r[0]].net_kind.encoded  # its tap's where is the pooling a config names `pool`
    variant = replace(spec, layer=r[1], where=None if encoded else r[2], pool=r[2] if encoded else r[3])
    config = replace(ctx.config, branches={**ctx.config.branches, spec.name: variant})
    start = time.perf_counter()
    model, meta = train_branch(config, spec.name, ctx.models, ctx.data, ctx.recipes.default, ctx.seed, ctx.progress,
                               ctx.cache_dir, ctx.device, notes=False)
    seconds = time.perf_counter() - start
    X, _, _ = node_split(ctx, spec, "test")
    model.meta = meta
    reading = {**ctx.models, spec.name: model}
    return Outcome(model.logits(extract(ctx.models, [r], X)[0]), Acceptance.of(meta), count_parameters(model.net),
                   cost.path_flops(reading, spec.name), seconds, ctx.parent_s,
                   {"layer": r[1], "where": r[2], "pool": r[3], "epochs_run": meta.history["epochs_run"]})


def concat_reads(ctx: SeedContext, spec: NodeSpec) -> list[tuple]:
    """Every tap of the branch's source once: each hidden layer of an MLP where the branch reads its own
    (before or after the activation), each layer of an encoded parent pooled as the branch pools, each stage or
    block of a CNN or ViT with its default pooling."""
    where = branch_read(ctx.models, spec, ctx.recipes.default.branch)[2]
    source = ctx.models[spec.source]  # an MLP's where, an encoded parent's pooling: the branch's own
    taps = [info for info in source.feature_info if len(source.net_kind.wheres) == 1 or info["where"] == where]
    return [read(ctx.models, spec.source, info["layer"], info["where"]) for info in taps]


def run_taps_concat(ctx: SeedContext, spec: NodeSpec) -> Outcome:
    """The branch (default recipe, its own hidden layers) reading every tap of its source at once, each
    standardised on the training images and concatenated, as Head2Toe reads a frozen network from head to
    toe (without its feature selection)."""
    start = time.perf_counter()
    r = ctx.data.augments(ctx.recipes.default.branch_for(ctx.config.parent.kind))
    wanted = concat_reads(ctx, spec)
    X, labels, rows = node_split(ctx, spec, "train")
    train_idx, val_idx, kind = held_out_split(ctx.models["parent"], rows, labels)
    with tempfile.TemporaryDirectory(prefix="concat-features-") as scratch:
        cache = FeatureCache(ctx.cache_dir or scratch)
        parts = [cache.features(ctx.models, w, X, rows, ctx.data.fingerprint(), r.flip) for w in wanted]
    plain = np.concatenate([p["plain"] for p in parts], axis=1)
    mean, std = plain[train_idx].mean(axis=0), plain[train_idx].std(axis=0) + 1e-6
    standard = lambda F: ((F - mean) / std).astype(np.float32)  # noqa: E731
    if r.flip:
        flipped = np.concatenate([p["flipped"] for p in parts], axis=1)
        inputs, transform = standard(plain[train_idx]), Augment(mirrored=standard(flipped[train_idx]))
    else:
        inputs, transform = standard(plain[train_idx]), None
    dropout = spec.dropout if spec.dropout is not None else r.dropout
    model = Model([plain.shape[1], *spec.hidden, len(spec.classes)], activation=spec.activation, dropout=dropout,
                  seed=ctx.seed)
    val = (standard(plain[val_idx]), labels[val_idx])
    history = model.fit(inputs, labels[train_idx], validation_data=val, train_transform=transform,
                        restore_best_weights=True, **fit_kwargs(r, ctx.seed, ctx.progress, f"{spec.name} all taps",
                                                                       ctx.device))
    model.freeze()
    acceptance = fit_acceptance(spec, r, model.logits(val[0]), val[1], notes=False)
    seconds = time.perf_counter() - start
    X_test, _, _ = node_split(ctx, spec, "test")
    test = standard(np.concatenate(extract(ctx.models, wanted, X_test), axis=1))
    flops = max(cost.flops_to(ctx.models, w) for w in wanted) + cost.linear_flops(model.architecture)
    return Outcome(model.logits(test), acceptance, count_parameters(model.net), flops, seconds, ctx.parent_s,
                   {"taps": [ctx.models[w[0]].tap(*w[1:3])["name"] for w in wanted], "width": plain.shape[1],
                    "epochs_run": history["epochs_run"], "validation": kind})


def scratch_widths(config: TreeConfig, name: str) -> list[int]:
    """The branch's whole inference path (pixels -> source layers -> branch -> classes) as one MLP:
    same widths, hence the same parameter count and FLOPs as trunk plus branch."""
    return cost.path_widths(config, name)


def run_scratch_mlp(ctx: SeedContext, spec: NodeSpec) -> Outcome:
    """An MLP of the branch path's widths trained from scratch, parent recipe, on the branch's classes."""
    widths = scratch_widths(ctx.config, spec.name)
    own = replace(ctx.config.parent, classes=spec.classes, hidden=tuple(widths[1:-1]), accept=spec.accept)
    config = TreeConfig(parent=own, branches={}, path=ctx.config.path)
    log(f"{spec.name}: MLP {widths} from scratch on the pixels of its classes (logged as 'parent' below)")
    start = time.perf_counter()
    model, meta, normalizer = train_parent(config, ctx.data, ctx.recipes.default, ctx.seed, ctx.progress,
                                           ctx.device)
    images, labels, rows = ctx.data.node_rows("train", spec)
    val = np.isin(rows, np.asarray(meta.val_rows))
    acceptance = fit_acceptance(spec, ctx.recipes.default.branch, model.logits(normalizer.transform(images[val])),
                                labels[val], notes=False)
    seconds = time.perf_counter() - start
    test_images, _, _ = ctx.data.node_rows("test", spec)
    return Outcome(model.logits(normalizer.transform(test_images)), acceptance, count_parameters(model.net),
                   cost.linear_flops(widths), seconds, 0.0,
                   {"widths": widths, "epochs_run": meta.history["epochs_run"]})


def run_scratch(ctx: SeedContext, spec: NodeSpec) -> Outcome:
    """The branch's whole inference path (trunk of the parent's kind up to the tap, then the branch) with
    fresh weights, trained end to end on the pixels of the branch's classes with the parent's recipe."""
    kind = ctx.models["parent"].kind
    r = ctx.recipes.default.parent_for(kind)
    fresh = {}
    for i, name in enumerate(chain(ctx.models, spec.name)):
        old = ctx.models[name]
        fresh[name] = Model(old.architecture, old.activation, old.dropout, seed=ctx.seed + i, kind=old.kind,
                            shape=old.shape)
        fresh[name].meta = old.meta
    log(f"{spec.name}: the same {kind} trunk and branch from scratch on the pixels of its classes")
    return _train_end_to_end(ctx, spec, EndToEnd(fresh, spec.name), r, "from scratch", branch_s=0.0, parent_s=0.0)


class EndToEnd(nn.Module):
    """A trainable copy of a branch and every model on its path from the pixels, as one network.

    Only the parameters on that path train: the rest of each source (e.g. the parent's later layers
    and its head) gets no gradient and is frozen.
    """

    def __init__(self, models: dict[str, Model], name: str):
        super().__init__()
        self.copies = {n: copy.deepcopy(models[n]) for n in chain(models, name)}
        self.nets = nn.ModuleList(m.net for m in self.copies.values())
        self.name = name
        for p in self.nets.parameters():
            p.requires_grad_(True)
        self.eval()
        self(torch.zeros(2, models["parent"].architecture[0])).sum().backward()  # find the parameters on the path
        for p in self.nets.parameters():
            p.requires_grad_(p.grad is not None)
            p.grad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.copies[self.name].net(node_input(self.copies, self.name, x))


def run_finetune(ctx: SeedContext, spec: NodeSpec) -> Outcome:
    """Trunk and trained branch fine-tuned together on the branch's classes (the parent stays as it was)."""
    return _train_end_to_end(ctx, spec, EndToEnd(ctx.models, spec.name), ctx.recipes.finetune, "fine-tune",
                             branch_s=ctx.branch_s[spec.name], parent_s=ctx.parent_s)


def _train_end_to_end(ctx: SeedContext, spec: NodeSpec, net: EndToEnd, r, what: str, branch_s: float,
                      parent_s: float) -> Outcome:
    model = Model([ctx.models["parent"].architecture[0], len(spec.classes)], seed=ctx.seed)
    model.net = net
    X, labels, rows = node_split(ctx, spec, "train")
    train_idx, val_idx, kind = held_out_split(ctx.models["parent"], rows, labels)
    normalizer = parent_normalizer(ctx.models["parent"])
    transform = augment_transform(normalizer, r.flip, r.crop) if r.flip or r.crop else None
    start = time.perf_counter()
    history = model.fit(X[train_idx], labels[train_idx], validation_data=(X[val_idx], labels[val_idx]),
                        epochs=r.epochs, batch_size=r.batch_size, lr=r.lr, weight_decay=r.weight_decay,
                        optimizer=r.optimizer, label_smoothing=r.label_smoothing, lr_schedule=r.lr_schedule,
                        early_stopping_patience=r.patience, restore_best_weights=True, train_transform=transform,
                        seed=ctx.seed, progress=ctx.progress, desc=f"{spec.name} {what}", device=ctx.device)
    acceptance = fit_acceptance(spec, r, model.logits(X[val_idx]), labels[val_idx], notes=False)
    seconds = time.perf_counter() - start + branch_s
    X_test, _, _ = node_split(ctx, spec, "test")
    return Outcome(model.logits(X_test), acceptance, model.num_parameters, cost.path_flops(net.copies, spec.name),
                   seconds, parent_s, {"epochs_run": history["epochs_run"], "validation": kind})
