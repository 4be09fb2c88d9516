"""Training self-evaluation branches (branching.judge) on cross-fitted correctness labels.

A judge learns "is the node's answer right?". On the node's own training images the node is nearly
always right, so their correctness labels teach nothing; validation and test images are reserved for
the acceptance threshold and the measurements. So the labels are cross-fitted: the node's training
rows are cut into K stratified folds, and for each fold a copy of the node is trained, with the same
recipe, seed and validation images as the node itself, on the other K - 1 folds; the copy's logits and
correctness on the held-out fold are that fold's judge inputs and labels. Every training row so gets the
answer of a model that never saw it. The judge trains on all rows (its early stopping on a stratified
15% of them), never on validation or test images; the node's validation images then fit the
acceptance threshold on the judge's probabilities, as they do for the max softmax probability.

A frozen parent (a module) is never trained on the data, so its own answers on its training rows
are already out of sample: they are used as they are, with no copies.

What the copies do not replace: a branch's copies read the real (frozen) source, which did train on
those images, as the branch does; a parent judge reads the real parent's hidden layers on its training
images, since copies' hidden units do not correspond to the parent's. See docs/selfeval.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split

from branching.acceptance.rule import Acceptance, rejects
from branching.config.tree import TreeConfig
from branching.data.normalization import Normalizer
from branching.errors import ConfigError
from branching.models.batches import Augment
from branching.models.device import CPU
from branching.models.forward import extract, extract_mirrored, node_inputs, reads
from branching.models.meta import JudgeMeta
from branching.models.model import Model
from branching.train.nodes import acceptance_note, child_groups, fit_kwargs, fit_normalizer, noun, train_transform
from branching.tree import judge

JUDGE_FIT = dict(epochs=100, batch_size=128, lr=1e-3, weight_decay=0.01, optimizer="adamw",
                 early_stopping_patience=10)
JUDGE_DROPOUT = 0.2
JUDGE_EARLY_STOPPING_SHARE = 0.15


@dataclass
class Fold:
    index: int
    trained_on: np.ndarray     # rows (of the training split file) the fold's copy trained on
    held_out: np.ndarray       # rows whose labels the copy gave
    validated_on: np.ndarray   # rows of its early stopping: the node's own validation rows


@dataclass
class CrossFit:
    """Each training row of a node with the logits of the node's copy that did not train on it."""

    node: str
    rows: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    folds: list[Fold] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def correct(self) -> np.ndarray:
        return self.logits.argmax(axis=1) == self.labels

    def record(self) -> dict:
        """What a judge's checkpoint keeps of it (row lists included, to check the folds later)."""
        return {"scheme": "cross-fitting", "folds": [
            {"index": f.index, "trained_on": torch.from_numpy(f.trained_on), "held_out": torch.from_numpy(f.held_out),
             "validated_on": torch.from_numpy(f.validated_on)} for f in self.folds],
            "rows": len(self.rows), "copies_accuracy": float(self.correct.mean()) if len(self.rows) else None,
            "seconds": self.seconds}


def _module_parent_answers(models, images):
    """A module parent is never trained here, so on every row it is already a model that did not see it:
    its own answers stand in for the copies'."""
    parent = models["parent"]
    X = Normalizer.from_dict(parent.meta.normalization).lazy(images)
    return lambda keep, held, val, k: parent.logits(X[held])


def _parent_copies(config: TreeConfig, images, labels, recipe, seed, progress, device, augments, mirrored=None):
    """A function training a copy of the parent on some rows and answering others, as train_parent does
    (`mirrored`: the known mirror images of `images`, an encoded parent's)."""
    spec, r = config.parent, augments(recipe.parent_for(config.parent.kind))
    dropout = spec.dropout if spec.dropout is not None else r.dropout

    def train(keep, held, val, k):
        normalizer = fit_normalizer(spec.net_kind, images, keep)  # the fold's own statistics
        X = normalizer.lazy(images, mirrored=mirrored)
        model = Model(spec.net_kind.architecture(X.shape[1], spec.hidden, len(spec.classes)),
                      activation=spec.activation, dropout=dropout, seed=seed, kind=spec.kind, shape=spec.shape_dict)
        transform = train_transform(X[keep], normalizer, r)
        validation = (X[val], labels[val]) if len(val) else None
        model.fit(X[keep], labels[keep], validation_data=validation, train_transform=transform,
                  restore_best_weights=validation is not None, **fit_kwargs(r, seed, progress, f"parent copy {k}", device))
        return model.logits(X[held])
    return train


def _branch_copies(config: TreeConfig, name, models, images, labels, recipe, seed, progress, device, data, rows):
    """A function training a copy of branch `name` on the same read of the same source."""
    spec, r = config.node(name), data.augments(recipe.branch_for(config.parent.kind))
    normalizer = Normalizer.from_dict(models["parent"].meta.normalization)
    X = normalizer.lazy(images, mirrored=None if data.mirrored is None else data.mirrored[rows])
    tap = reads(models, name)
    plain = extract(models, [tap], X)[0]
    flipped = extract_mirrored(models, tap, X, normalizer) if r.flip else None
    dropout = spec.dropout if spec.dropout is not None else r.dropout

    def train(keep, held, val, k):
        model = Model([plain.shape[1], *spec.hidden, len(spec.classes)], activation=spec.activation,
                      dropout=dropout, seed=seed)
        inputs = plain[keep]
        transform = None if flipped is None else Augment(mirrored=flipped[keep])  # the branch's own coins
        model.fit(inputs, labels[keep], validation_data=(plain[val], labels[val]), train_transform=transform,
                  restore_best_weights=True, **fit_kwargs(r, seed, progress, f"{name} copy {k}", device))
        return model.logits(plain[held])
    return train


def crossfit(config: TreeConfig, name: str, models: dict[str, Model], data, recipe, seed: int, folds: int,
             progress: bool = False, device: torch.device = CPU) -> CrossFit:
    """K-fold cross-fitted logits of node `name` on its training rows (see the module docstring)."""
    start = time.perf_counter()
    spec, meta = config.node(name), models[name].meta
    images, labels, rows = data.node_rows("train", spec)
    position = {int(row): i for i, row in enumerate(rows)}
    train_pos = np.array([position[int(row)] for row in meta.train_rows.tolist()], dtype=np.int64)
    val_pos = np.array([position[int(row)] for row in meta.val_rows.tolist()], dtype=np.int64)
    counts = np.bincount(labels[train_pos], minlength=len(spec.classes))
    if counts.min() < folds:
        raise ConfigError(f"[{'parent' if name == 'parent' else 'branches.' + name}.selfeval] folds: {folds} folds "
                          f"need {folds} training images of every class, but {spec.classes[int(counts.argmin())]!r} "
                          f"has {int(counts.min())}; set a lower folds in that table (or give the class more images)")
    module = name == "parent" and spec.net_kind.trunk == "frozen"
    if module:
        train = _module_parent_answers(models, images)
    elif name == "parent":
        train = _parent_copies(config, images, labels, recipe, seed, progress, device, data.augments,
                               None if data.mirrored is None else data.mirrored[rows])
    else:
        train = _branch_copies(config, name, models, images, labels, recipe, seed, progress, device, data, rows)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    order, logits, records = [], [], []
    for k, (a, b) in enumerate(splitter.split(train_pos, labels[train_pos])):
        keep, held = train_pos[a], train_pos[b]
        logits.append(train(keep, held, val_pos, k))
        order.append(held)
        records.append(Fold(k, rows[keep[:0] if module else keep], rows[held], rows[val_pos]))
    order = np.concatenate(order)
    return CrossFit(name, rows[order], labels[order], np.concatenate(logits).astype(np.float32), records,
                    time.perf_counter() - start)


def fit_judge(name: str, spec, judge_reads: list[tuple], taps: list[np.ndarray], cf: CrossFit, seed: int,
              progress: bool = False, device: torch.device = CPU) -> Model:
    """A judge of node `name` (config.SelfEvalSpec `spec`) on the taps of the cross-fitted rows and the
    copies' logits and correctness; returns it with its checkpoint meta as .meta."""
    X = judge.inputs(taps, cf.logits, spec.logits)
    mean, std = judge.standardisation(X)
    X = (X - mean) / std
    y = cf.correct.astype(np.int64)
    stratify = y if np.bincount(y, minlength=2).min() >= 2 else None
    fit_idx, stop_idx = train_test_split(np.arange(len(y)), test_size=JUDGE_EARLY_STOPPING_SHARE, stratify=stratify,
                                         random_state=seed)
    model = Model([X.shape[1], *spec.hidden, 2], activation=spec.activation, seed=seed,
                  dropout=spec.dropout if spec.dropout is not None else JUDGE_DROPOUT)
    history = model.fit(X[fit_idx], y[fit_idx], validation_data=(X[stop_idx], y[stop_idx]), restore_best_weights=True,
                        seed=seed, progress=progress, desc=f"{name} judge", device=device, **JUDGE_FIT)
    model.freeze()
    model.meta = JudgeMeta(name, judge_reads, spec.logits, mean, std, [int(t.shape[1]) for t in taps], seed=seed,
                           history=history)
    return model


def judge_taps(models, judge_reads, data, rows) -> list[np.ndarray]:
    """The judge's taps (of the real models) for some rows of the training split."""
    normalizer = Normalizer.from_dict(models["parent"].meta.normalization)
    return extract(models, judge_reads, normalizer.lazy(data.train.images)[rows])


def train_judge(config: TreeConfig, name: str, models: dict[str, Model], data, recipe, seed: int,
                progress: bool = False, cf: CrossFit | None = None, device: torch.device = CPU) -> tuple[Model, CrossFit]:
    """Cross-fit node `name` (unless `cf` is given) and train its declared judge; the judge's .meta is
    its checkpoint's."""
    spec = config.node(name).selfeval
    cf = cf or crossfit(config, name, models, data, recipe, seed, spec.folds, progress, device)
    judge_reads = judge.judge_reads(models, name, spec, recipe.branch.where)
    model = fit_judge(name, spec, judge_reads, judge_taps(models, judge_reads, data, cf.rows), cf, seed, progress,
                      device)
    model.meta = model.meta.replace(node_fingerprint=models[name].fingerprint(), crossfit=cf.record(),
                                    recipe=recipe.name, spec=spec.to_dict())
    return model, cf


def validation_view(config: TreeConfig, name: str, models: dict[str, Model], data):
    """(normalised images, labels, node logits) of the node's validation rows."""
    spec, meta = config.node(name), models[name].meta
    labels, rows = data.node_labels("train", spec)
    position = {int(row): i for i, row in enumerate(rows)}
    val = np.array([position[int(row)] for row in meta.val_rows.tolist()], dtype=np.int64)
    X = Normalizer.from_dict(models["parent"].meta.normalization).lazy(data.train.images)[rows[val]]
    return X, labels[val], models[name].logits(node_inputs(models, name, X))


def attach_judge(config: TreeConfig, name: str, models: dict[str, Model], data, recipe, seed: int,
                 models_dir, progress: bool = False, log=print, device: torch.device = CPU) -> dict:
    """Train node `name`'s judge, save it beside the node as <name>.selfeval.pt, and return the node's
    checkpoint meta with its acceptance fit again on validation (on the judge's score if it asks for it)."""
    spec = config.node(name)
    model, cf = train_judge(config, name, models, data, recipe, seed, progress, device=device)
    path = judge.save(models_dir, name, model, model.meta)
    size = sum(p.numel() for p in model.net.parameters())
    log(f"{name}: self-evaluation branch ({size:,} parameters) on {len(cf.rows)} cross-fitted "
        f"rows ({spec.selfeval.folds} copies, {100 * cf.correct.mean():.1f}% right, {cf.seconds:.0f} s); saved as {path.name}")
    meta = models[name].meta.replace(path=None, fingerprint=None)
    if spec.accept.score != "selfeval":
        return meta
    X, labels, logits = validation_view(config, name, models, data)
    probability = judge.Judge(model).score_images(models, X, logits)
    r = recipe.parent_for(config.parent.kind) if name == "parent" else recipe.branch_for(config.parent.kind)
    acceptance = Acceptance.fit(spec.accept, r, logits, labels, rejects=rejects(spec), judge=probability)
    if not acceptance.attained:
        log(f"{name}: acceptance rule {acceptance.rule!r} cannot be met: {acceptance.reason}; accepting nothing")
    note = acceptance_note(spec, acceptance, logits, noun(config), child_groups(config, name))
    return meta.replace(acceptance=acceptance.to_dict(), acceptance_note=note)
