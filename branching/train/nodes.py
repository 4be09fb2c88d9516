"""Training one node: the parent (or loading a module parent), a branch on its source's activations,
and each node's acceptance rule fitted on its validation images."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch
from scipy.special import softmax
from sklearn.model_selection import train_test_split

from branching.acceptance.rule import Acceptance, rejects
from branching.config.recipes import Recipe
from branching.config.tree import NodeSpec, TreeConfig
from branching.console import log
from branching.data.normalization import Normalizer
from branching.data.tree_data import TreeData
from branching.errors import ConfigError, DataError
from branching.lazy_images import NormalizedImages
from branching.models.device import CPU, on_device
from branching.models.batches import Augment
from branching.models.forward import augment_transform, extract, mirror_all, read, read_tap
from branching.models.kinds import ParentKind
from branching.models.meta import NodeMeta
from branching.models.model import Model
from branching.train.exits import calibration_split
from branching.train.features import FeatureCache, branch_inputs

ORIGINAL_BRANCH_SPLIT_SEED = 42  # the original's random_state for a branch's 80/20 split
LOW_ACCEPTANCE = 0.25  # a node that lets through less of its validation images than this says how to change it


def _split(n_or_labels, test_size, seed):
    """A stratified hold-out of `test_size` of the rows; a DataError where the classes are too small for one."""
    labels = np.asarray(n_or_labels)
    try:
        return train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed)
    except ValueError:
        counts = np.bincount(labels)
        raise DataError(f"too few training images to hold out {test_size:.0%} of each class for validation: "
                        f"{len(labels)} images of {np.count_nonzero(counts)} classes, the smallest with "
                        f"{counts[counts > 0].min()}; add images (at least {math.ceil(2 / test_size)} per class), "
                        f"or, with image folders, a val/ folder") from None


def _hold_out(data: TreeData, rows: np.ndarray, labels: np.ndarray, fraction: float, seed: int):
    """(training positions, validation positions) in a node's rows: a val/ folder's images where the data
    have one, else a stratified `fraction` drawn with `seed` (none where fraction is 0)."""
    if data.val_rows is not None:
        in_val = np.isin(rows, data.val_rows)
        return np.flatnonzero(~in_val), np.flatnonzero(in_val)
    if not fraction:
        return np.arange(len(labels)), np.arange(0)
    return _split(labels, fraction, seed)


def fit_kwargs(r, seed, progress, desc, device=CPU) -> dict:
    """Model.fit's arguments for a node trained with recipe node `r` on `device`."""
    r = r.on(device)
    return dict(epochs=r.epochs, batch_size=r.batch_size, lr=r.lr, weight_decay=r.weight_decay,
                optimizer=r.optimizer, label_smoothing=r.label_smoothing, lr_schedule=r.lr_schedule,
                early_stopping_patience=r.patience, seed=seed, progress=progress, desc=desc, device=device)


def new_class_hold_out(config: TreeConfig, data: TreeData, seed: int, fraction: float) -> np.ndarray:
    """Training rows that no node trains on, of the classes the parent never sees: per class, a `fraction`
    drawn with the seed and the class (so every branch learning a class holds out the same images).
    The branches that learn those classes validate on them."""
    held = [np.zeros(0, dtype=np.int64)]
    for name in config.classes():
        if name in config.parent.classes or not fraction:
            continue
        rows = data.class_rows(name)
        if data.val_rows is not None:  # a val/ folder: its images of the class
            held.append(rows[np.isin(rows, data.val_rows)])
            continue
        rng = np.random.default_rng([seed, data.label_names.index(name)])
        held.append(rng.choice(rows, size=int(round(fraction * len(rows))), replace=False))
    return np.sort(np.concatenate(held))


def held_out_rows(parent: Model) -> np.ndarray:
    """Training rows no node trains on: the parent's validation images and the new classes' hold-out."""
    return np.concatenate([np.zeros(0, np.int64) if rows is None else rows
                           for rows in (parent.meta.val_rows, parent.meta.new_class_val_rows)])


def train_parent(config: TreeConfig, data: TreeData, recipe: Recipe, seed: int, progress: bool = True,
                 device: torch.device = CPU, compile: bool = False):
    """Train the parent on `device` (a frozen one is loaded instead, an encoded one's head alone trains; `compile`:
    a trained parent's network through torch.compile); returns (model, checkpoint meta, normaliser), the model
    back on the CPU."""
    spec = config.parent
    kind, r = spec.net_kind, recipe.parent_for(spec.kind)
    if kind.trunk == "frozen":
        return load_frozen_parent(config, data, recipe, seed, device)
    if kind.encoded:
        return encoded_parent(config, data, recipe, seed, progress, device)
    labels, rows = data.node_labels("train", spec)
    images = data.train.images  # the whole split, read a batch at a time through `rows`
    # a val/ folder: the parent, and so every branch, validates on it
    train_idx, val_idx = _hold_out(data, rows, labels, r.validation, seed)
    # the MLP standardises every pixel (the original recipe), the CNN and the ViT every colour channel
    normalizer = fit_normalizer(kind, images, rows[train_idx])
    X = normalizer.lazy(images)[rows]
    dropout = spec.dropout if spec.dropout is not None else r.dropout
    model = Model(kind.architecture(X.shape[1], spec.hidden, len(spec.classes)), activation=spec.activation,
                  dropout=dropout, seed=seed, kind=spec.kind, shape=spec.shape_dict)
    transform = train_transform(X[train_idx], normalizer, r)
    validation = (X[val_idx], labels[val_idx]) if len(val_idx) else None
    log(f"parent ({spec.kind}, {model.num_parameters:,} parameters): {len(train_idx)} training images, "
        f"{len(val_idx)} validation, {len(spec.classes)} classes, recipe {recipe.name}"
        + (" (through torch.compile: its first epoch compiles, 10-30 s)" if compile else ""))
    history = model.fit(X[train_idx], labels[train_idx], validation_data=validation, train_transform=transform,
                        restore_best_weights=validation is not None, compile=compile,
                        **fit_kwargs(r, seed, progress, "parent", device))
    model.freeze()
    val_logits = model.logits(X[val_idx])
    acceptance = fit_acceptance(spec, r, val_logits, labels[val_idx], groups=child_groups(config, "parent"))
    return model, _parent_meta(config, data, recipe, seed, normalizer, rows, train_idx, val_idx, history, acceptance,
                               val_logits), normalizer


def _parent_meta(config, data, recipe, seed, normalizer, rows, train_idx, val_idx, history, acceptance,
                 val_logits) -> NodeMeta:
    """A parent's checkpoint meta: its classes, normaliser, recipe, rows, history and acceptance (None: no head),
    and the augmentation it trained with (the recipe's as the data allow it: TreeData.augments)."""
    spec, r = config.parent, recipe.parent_for(config.parent.kind)
    used = r if spec.net_kind.trunk == "trained" else data.augments(r)
    groups = child_groups(config, "parent")
    held = new_class_hold_out(config, data, seed, r.validation)
    return NodeMeta(
        "parent", "parent", list(spec.classes), list(spec.hidden), seed=seed, recipe=recipe.to_dict(spec.kind),
        history=history, acceptance=None if acceptance is None else acceptance.to_dict(),
        acceptance_note=None if acceptance is None else acceptance_note(spec, acceptance, val_logits, noun(config),
                                                                        groups),
        augmentation={"flip": used.flip, "crop": used.crop}, tree=config.to_dict(), train_rows=rows[train_idx],
        val_rows=rows[val_idx], normalization=normalizer.to_dict(), new_class_val_rows=held if len(held) else None)


def load_frozen_parent(config: TreeConfig, data: TreeData, recipe: Recipe, seed: int, device: torch.device = CPU):
    """A frozen parent (a module): built, loaded from its weights file, never trained. Like a trained parent it
    holds out a stratified share of the training images per seed (recipe validation), on which its branches
    validate and its head, if used, is calibrated. Normalised by the config's mean and std (0..1 scale) or else by
    the per-channel statistics of the other training images."""
    start = time.perf_counter()
    spec = config.parent
    kind, r, shape = spec.net_kind, recipe.parent_for(spec.kind), spec.shape_dict
    labels, rows = data.node_labels("train", spec)
    images = data.train.images
    train_idx, val_idx = _hold_out(data, rows, labels, r.validation, seed)
    stats = kind.given_stats(shape)
    if stats is not None:  # repeated over the pixels of the data's images
        normalizer = Normalizer.of_channels(255 * np.array(stats[0]), 255 * np.array(stats[1]), side=data.side)
    else:
        normalizer = fit_normalizer(kind, images, rows[train_idx])
    model = Model([images.shape[1], len(spec.classes)], seed=seed, kind=spec.kind, shape=shape)
    try:
        kind.load_weights(model.net, shape)
    except ValueError as e:
        raise ConfigError(f"{config.path or '<config>'}: [parent] weights: {e}") from None
    model.freeze()
    log(f"parent ({kind.describe(shape)}, {sum(p.numel() for p in model.net.parameters()):,} parameters, frozen, "
        f"{'its head used' if model.has_head else 'no head'}): {len(train_idx)} training images, {len(val_idx)} "
        f"held out for validation, {len(spec.classes)} classes")
    acceptance, val_logits = None, None
    if model.has_head:
        with on_device([model], device):
            val_logits = model.logits(normalizer.lazy(images)[rows[val_idx]])
        acceptance = fit_acceptance(spec, r, val_logits, labels[val_idx], groups=child_groups(config, "parent"))
    history = {"epochs_run": 0, "best_epoch": 0, "stopped_early": False, "seconds": time.perf_counter() - start}
    meta = _parent_meta(config, data, recipe, seed, normalizer, rows, train_idx, val_idx, history, acceptance, val_logits)
    return model, meta.replace(files=kind.file_meta(shape) or None), normalizer


def encoded_parent(config: TreeConfig, data: TreeData, recipe: Recipe, seed: int, progress: bool = True,
                   device: torch.device = CPU):
    """An encoded parent (a pretrained transformer on texts, a pretrained network on images): its network frozen
    (the data are its encoded inputs), every vector standardised on the training inputs, and its head, where the
    tree gives it classes, trained on them with early stopping on the held-out share (and, where the images' mirror
    images were encoded too and the recipe flips, a coin per image choosing the mirror image's vector)."""
    spec = config.parent
    kind, r, shape = spec.net_kind, data.augments(recipe.parent_for(spec.kind)), spec.shape_dict
    labels, rows = data.node_labels("train", spec)
    vectors = data.train.images
    train_idx, val_idx = _hold_out(data, rows, labels, r.validation, seed)
    train_idx, calibration = calibration_split(config, rows, labels, train_idx, seed)  # None without exits
    normalizer = fit_normalizer(kind, vectors, rows[train_idx])
    X = normalizer.lazy(vectors, mirrored=data.mirrored)[rows]
    dropout = spec.dropout if spec.dropout is not None else r.dropout
    model = Model([X.shape[1], len(spec.classes)], dropout=dropout, seed=seed, kind=spec.kind, shape=shape)
    tap = model.tap(shape["head_layer"], shape["head_pool"])["name"] if model.has_head else None
    what = noun(config)
    log(f"parent ({kind.describe(shape)}, frozen, {shape['depth']} taps encoded; "
        + (f"a head of {model.num_parameters:,} parameters on {tap} ({shape['head_pool']})" if tap else "no head")
        + f"): {len(train_idx)} training {what}, {len(val_idx)} validation, {len(spec.classes)} classes"
        + ("" if model.has_head else " (its branches')"))
    history = {"epochs_run": 0, "best_epoch": 0, "stopped_early": False}
    acceptance, val_logits = None, None
    if model.has_head:
        validation = (X[val_idx], labels[val_idx]) if len(val_idx) else None
        history = model.fit(X[train_idx], labels[train_idx], validation_data=validation,
                            train_transform=train_transform(X[train_idx], normalizer, r),
                            restore_best_weights=validation is not None,
                            **fit_kwargs(r, seed, progress, "parent head", device))
        val_logits = model.logits(X[val_idx])
        acceptance = fit_acceptance(spec, r, val_logits, labels[val_idx], what, child_groups(config, "parent"))
    model.freeze()
    meta = _parent_meta(config, data, recipe, seed, normalizer, rows, train_idx, val_idx, history, acceptance, val_logits)
    return model, meta.replace(calibration_rows=calibration), normalizer


def train_transform(X, normalizer: Normalizer, r):
    """Model.fit's augmentation of inputs X by recipe node `r`: mirror images (the known ones where X carries
    them, an encoded parent's), shifts of pixels; None for none."""
    if isinstance(X, NormalizedImages) and X.mirrored is not None:
        return Augment(mirrored=mirror_all(X, normalizer)) if r.flip else None
    return augment_transform(normalizer, r.flip, r.crop) if r.flip or r.crop else None


TEXT_MIN_STD = 1e-3  # of the mean std: a value (nearly) constant over the training inputs is not blown up


def fit_normalizer(kind: ParentKind, inputs, rows) -> Normalizer:
    """A parent's standardisation (its kind's `normalization`), fitted on its training rows: per pixel (MLP), per
    colour channel (CNN, ViT, module), per value (an encoded parent's vectors, each std at least TEXT_MIN_STD of
    their mean: the first token at a transformer's embeddings is the same for every text, and a std of 0 would
    make a last-bit difference at prediction a large one)."""
    if kind.normalization != "value":
        return Normalizer.fit(inputs, per_channel=kind.normalization == "channel", rows=rows)
    fitted = Normalizer.fit(inputs, rows=rows)
    return Normalizer(fitted.mean, np.maximum(fitted.std, TEXT_MIN_STD * float(fitted.std.mean())))


def parent_normalizer(parent: Model) -> Normalizer:
    return Normalizer.from_dict(parent.meta.normalization)


def train_branch(config: TreeConfig, name: str, models: dict[str, Model], data: TreeData, recipe: Recipe,
                 seed: int, progress: bool = True, cache_dir=None, device: torch.device = CPU, notes: bool = True):
    """Train branch `name` on its source's activations; returns (model, checkpoint meta). With cache_dir
    the activations come from a features.FeatureCache there (built on first use); `notes`: fit_acceptance's."""
    spec, r = config.node(name), data.augments(recipe.branch_for(config.parent.kind))
    parent = models["parent"]
    normalizer = parent_normalizer(parent)
    labels, rows = data.node_labels("train", spec)
    if parent.meta.calibration_rows is not None:  # the exits' cascade is fitted on them: no node sees them
        kept = ~np.isin(rows, parent.meta.calibration_rows)
        labels, rows = labels[kept], rows[kept]
    X = normalizer.lazy(data.train.images, mirrored=data.mirrored)[rows]
    validation = r.validation
    parent_val = set(held_out_rows(parent).tolist())
    if validation == "parent" and not parent_val:
        log(f"{name}: the parent holds out no images (trained with the original recipe); "
            f"validating on an 80/20 split of the branch's training images instead")
        validation = "own"
    if validation == "parent":
        in_val = np.array([row in parent_val for row in rows.tolist()], dtype=bool)
        train_idx, val_idx = np.flatnonzero(~in_val), np.flatnonzero(in_val)
    else:
        train_idx, val_idx = _hold_out(data, rows, labels, 0.2, ORIGINAL_BRANCH_SPLIT_SEED)
    source = models[spec.source]
    tap = branch_read(models, spec, r)
    where = tap[2]
    if cache_dir is None and not parent.net_kind.fused:  # a trunk costlier than the branch: its features once
        with tempfile.TemporaryDirectory(prefix="branch-features-") as scratch:
            return train_branch(config, name, models, data, recipe, seed, progress, scratch, device, notes)
    with on_device(list(models.values()), device):  # the trunk reads where the branch trains
        if cache_dir is not None:  # features (and their mirror images) computed once, kept on disk
            train_X, transform, features_val = branch_inputs(
                FeatureCache(cache_dir, log), models, data.fingerprint(), tap, X, rows, train_idx, val_idx, r.flip)
        else:
            features_val = extract(models, [tap], X[val_idx])[0]
            if r.flip:  # the trunk reads each batch's images, a random half mirrored
                def trunk_read(xb):
                    with torch.no_grad():
                        return read_tap(models, tap, xb)
                transform, train_X = Augment(flip=True, then=trunk_read), X[train_idx]
            else:
                transform, train_X = None, extract(models, [tap], X[train_idx])[0]
        width = source.width(*tap[1:])
        dropout = spec.dropout if spec.dropout is not None else r.dropout
        model = Model([width, *spec.hidden, len(spec.classes)], activation=spec.activation, dropout=dropout, seed=seed)
        log(f"{name}: reads {spec.source} {source.tap(*tap[1:3])['name']} (pool {shown_pool(source, tap)}, width {width}); "
            f"{len(train_idx)} training {noun(config)}, {len(val_idx)} validation ({validation}), recipe {recipe.name}")
        history = model.fit(train_X, labels[train_idx], validation_data=(features_val, labels[val_idx]),
                            train_transform=transform, restore_best_weights=True,
                            **fit_kwargs(r, seed, progress, name, device))
    model.freeze()
    val_logits = model.logits(features_val)
    acceptance = fit_acceptance(spec, r, val_logits, labels[val_idx], noun(config), child_groups(config, name),
                                notes and not spec.exit)  # an exit answers by the cascade's threshold
    meta = NodeMeta(
        "branch", name, list(spec.classes), list(spec.hidden), seed=seed, recipe=recipe.to_dict(parent.kind),
        history=history, acceptance=acceptance.to_dict(),
        acceptance_note=None if spec.exit else acceptance_note(spec, acceptance, val_logits, noun(config),
                                                               child_groups(config, name)),
        augmentation={"flip": r.flip, "crop": r.crop}, tree=config.to_dict(), train_rows=rows[train_idx],
        val_rows=rows[val_idx], source=spec.source, layer=spec.layer, where=where, pool=tap[3],
        tap=source.tap(*tap[1:3])["name"], source_fingerprint=source.fingerprint(),
        parent_fingerprint=parent.fingerprint(), validation=validation)
    return model, meta


def noun(config: TreeConfig) -> str:
    """What a tree's inputs are called in what it tells its user."""
    return config.parent.net_kind.reads


def shown_pool(source: Model, r: tuple) -> str:
    """The pooling of a read as a config names it: a text parent's is its tap's `where`."""
    return r[2] if source.net_kind.encoded else r[3]


def branch_read(models: dict[str, Model], spec: NodeSpec, r) -> tuple:
    """What branch `spec` reads, trained with recipe node r: (source, layer, where, pool); an MLP source's
    layer is read before or after its activation (`where`, else the recipe's)."""
    where = models[spec.source].net_kind.branch_where(spec.where, r.where)
    return read(models, spec.source, spec.layer, where, spec.pool)


def fit_acceptance(spec: NodeSpec, r, val_logits: np.ndarray, val_labels: np.ndarray, noun: str = "images",
                   groups: np.ndarray | None = None, notes: bool = True) -> Acceptance:
    """A node's temperature and, if it has a reject option, its rule's threshold, chosen on validation
    data only. A rule that cannot be met accepts nothing and says why; `notes`: say what to change in the tree's
    TOML where it lets few through (not for a study's variants of the node, whose TOML it is not)."""
    accept = spec.accept
    if accept.score == "selfeval":  # until its judge is trained (selfeval.attach_judge fits it again)
        accept = replace(accept, score="msp")
    acceptance = Acceptance.fit(accept, r, val_logits, val_labels, rejects=rejects(spec))
    if not acceptance.attained and notes:
        log(f"{spec.name}: acceptance rule {acceptance.rule!r} cannot be met: {acceptance.reason}; accepting nothing")
    note = acceptance_note(spec, acceptance, val_logits, noun, groups) if notes else None
    if note:
        log(f"note: {note}")
    return acceptance


def child_groups(config: TreeConfig, name: str) -> np.ndarray | None:
    """Classes x groups, 1 where a class is in a group: each child routing reaches from node `name`, then
    each class no child covers on its own (as routing groups them); None for a node without children."""
    spec = config.node(name)
    routed = config.routed(None if name == "parent" else name)  # a standalone branch or an exit routes below itself
    children = routed.children(name)
    if not children:
        return None
    covered = {c for child in children for c in child.classes}
    own = [c for c in spec.classes if c not in covered]
    groups = np.zeros((len(spec.classes), len(children) + len(own)), np.float64)
    for g, members in enumerate([child.classes for child in children] + [(c,) for c in own]):
        for c in members:
            groups[spec.classes.index(c), g] = 1.0
    return groups


def accepted_share(acceptance: Acceptance, val_logits: np.ndarray, groups: np.ndarray | None = None) -> float | None:
    """The share of validation images a node lets through: its rule's, or for a node without one (a parent
    that routes by its recipe's threshold) the share whose routing mass (softmax at the temperature summed
    over the classes of the group it goes to, `groups` as child_groups gives them) reaches it."""
    if acceptance.rejects:
        view = acceptance.validation or {}
        return view.get("coverage") if acceptance.attained else 0.0
    if not len(val_logits) or acceptance.threshold is None:
        return None
    mass = softmax(np.asarray(val_logits, np.float64) / acceptance.temperature, axis=1)
    if groups is not None:
        mass = mass @ groups
    return float(np.mean(mass.max(axis=1) >= acceptance.threshold))


def acceptance_note(spec: NodeSpec, acceptance: Acceptance, val_logits: np.ndarray, noun: str = "images",
                    groups: np.ndarray | None = None) -> str | None:
    """None, or, when node `spec` lets through less than LOW_ACCEPTANCE of its validation images (or texts:
    `noun`), what that means and the TOML lines that would change it (printed by the run and shown in its
    report)."""
    share = accepted_share(acceptance, val_logits, groups)
    if share is None or share >= LOW_ACCEPTANCE:
        return None
    table = "[parent.accept]" if spec.source is None else f"[branches.{spec.name}.accept]"
    n = f"only {100 * share:.1f}% of its {len(val_logits)} validation {noun}"
    if not acceptance.rejects:
        said = (f"{spec.name} passes {n} on down the tree (the rest are rejected at it): its routing threshold "
                f"{acceptance.threshold:g} (the recipe's) on max softmax")
    elif not acceptance.attained:
        said = f"{spec.name} accepts {n}: its rule ({acceptance.describe()}) cannot be met, so it accepts nothing"
    elif acceptance.rule == "threshold":
        said = f"{spec.name} accepts {n}: its rule (threshold {acceptance.threshold:g})"
    else:
        said = f"{spec.name} accepts {n}: its rule ({acceptance.describe()}, chosen threshold {acceptance.threshold:.4f})"
    lines = [table, 'rule = "coverage"', "coverage = 0.8"]
    return (f"{said}. To let more through, put these lines in the tree TOML, in place of any {table} it has "
            f"(the 80% of {noun} it is surest of; or rule = \"risk\" with risk = 0.1: at most 10% wrong):") + "".join(
        "\n    " + line for line in lines)

