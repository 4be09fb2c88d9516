"""Train and evaluate a tree: the parent, then each branch on its source's hidden activations."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from torchly import Model

from . import calibration
from .checkpoint import ModelStore
from .config import NodeSpec, TreeConfig
from .data import Normalizer, Split, ensure_cifar100, load_label_names, load_split, resolve_classes, select
from .errors import ConfigError, DataError
from .metrics import classification_summary, format_report, selective_summary
from .recipes import Recipe

ORIGINAL_BRANCH_SPLIT_SEED = 42  # the original's random_state for a branch's 80/20 split
BATCH = 4096


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- data ------------------------------------------------------------------------------------

@dataclass
class TreeData:
    """The two splits of a CIFAR-100 folder and the official ids of the tree's classes."""

    data_dir: Path
    label_names: list[str]
    train: Split
    test: Split

    def node_rows(self, split: str, spec: NodeSpec):
        """(uint8 images, labels as positions in spec.classes, row numbers in the split file)."""
        return select(getattr(self, split), resolve_classes(spec.classes, self.label_names))

    def fingerprint(self) -> dict:
        digest = lambda name: hashlib.sha256((self.data_dir / name).read_bytes()).hexdigest()[:16]  # noqa: E731
        return {"dir": str(self.data_dir), **{f"{n}_sha256": digest(n) for n in ("train", "test", "meta")}}


def load_tree_data(config: TreeConfig, data_dir, download: bool = False, progress: bool = True) -> TreeData:
    """Load (and, if asked, download) the data, checking that every class of the tree exists in it."""
    data_dir = Path(data_dir)
    if download:
        ensure_cifar100(data_dir, progress=progress)
    elif not all((data_dir / n).is_file() for n in ("train", "test", "meta")):
        raise DataError(f"no CIFAR-100 files (train, test, meta) in {data_dir}; pass --download to fetch them, "
                        f"or put the official cifar-100-python files there")
    label_names = load_label_names(data_dir)
    resolve_classes(config.parent.classes, label_names)
    return TreeData(data_dir, label_names, load_split(data_dir, "train"), load_split(data_dir, "test"))


# ---- features --------------------------------------------------------------------------------

def flip_images(x: torch.Tensor, normalizer: Normalizer, generator: torch.Generator) -> torch.Tensor:
    """Flip a random half of normalised images left-right (in pixel space, then normalise again)."""
    mean, std = torch.from_numpy(normalizer.mean), torch.from_numpy(normalizer.std)
    images = (x * std + mean).view(-1, 3, 32, 32)
    flip = torch.rand(len(x), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return (images.reshape(len(x), -1) - mean) / std


def node_input(models: dict[str, Model], name: str, x: torch.Tensor) -> torch.Tensor:
    """What node `name` reads, from normalised images: its source's hidden layer, through the chain."""
    if name == "parent":
        return x
    meta = models[name].meta
    return read_layer(models, meta["source"], meta["layer"], meta["where"], x)


def read_layer(models: dict[str, Model], source: str, layer: int, where: str, x: torch.Tensor) -> torch.Tensor:
    """Hidden layer `layer` of node `source` for normalised images x."""
    return models[source].hidden_forward(node_input(models, source, x), layer, where)


def batched(fn, X: np.ndarray, models: dict[str, Model]) -> np.ndarray:
    """Apply a tensor function to X in batches, with every model in eval mode and no gradients."""
    for m in models.values():
        m.net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(X), BATCH):
            out.append(fn(torch.from_numpy(np.ascontiguousarray(X[start:start + BATCH]))))
    return torch.cat(out).numpy()


def node_inputs(models: dict[str, Model], name: str, X: np.ndarray) -> np.ndarray:
    """node_input for a numpy array of normalised images."""
    return batched(lambda x: node_input(models, name, x), X, models)


def _split(n_or_labels, test_size, seed):
    labels = np.asarray(n_or_labels)
    return train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed)


# ---- training --------------------------------------------------------------------------------

def _fit_kwargs(r, seed, progress, desc) -> dict:
    return dict(epochs=r.epochs, batch_size=r.batch_size, lr=r.lr, weight_decay=r.weight_decay,
                optimizer=r.optimizer, label_smoothing=r.label_smoothing, lr_schedule=r.lr_schedule,
                early_stopping_patience=r.patience, seed=seed, progress=progress, desc=desc)


def train_parent(config: TreeConfig, data: TreeData, recipe: Recipe, seed: int, progress: bool = True):
    """Train the parent; returns (model, checkpoint meta, normaliser)."""
    spec, r = config.parent, recipe.parent
    images, labels, rows = data.node_rows("train", spec)
    if r.validation:
        train_idx, val_idx = _split(labels, r.validation, seed)
    else:
        train_idx, val_idx = np.arange(len(labels)), np.arange(0)
    normalizer = Normalizer.fit(images[train_idx])
    X = normalizer.transform(images)
    dropout = spec.dropout if spec.dropout is not None else r.dropout
    model = Model([X.shape[1], *spec.hidden, len(spec.classes)], activation=spec.activation, dropout=dropout, seed=seed)
    transform = (lambda xb, g: flip_images(xb, normalizer, g)) if r.flip else None
    validation = (X[val_idx], labels[val_idx]) if len(val_idx) else None
    log(f"parent: {len(train_idx)} training images, {len(val_idx)} validation, {len(spec.classes)} classes, "
        f"recipe {recipe.name}")
    history = model.fit(X[train_idx], labels[train_idx], validation_data=validation, train_transform=transform,
                        restore_best_weights=validation is not None, **_fit_kwargs(r, seed, progress, "parent"))
    model.freeze()
    meta = {"kind": "parent", "name": "parent", "classes": list(spec.classes), "hidden": list(spec.hidden),
            "normalization": normalizer.to_dict(), "recipe": recipe.to_dict(), "seed": seed,
            "train_rows": torch.from_numpy(rows[train_idx]), "val_rows": torch.from_numpy(rows[val_idx]),
            "history": history}
    return model, meta, normalizer


def parent_normalizer(parent: Model) -> Normalizer:
    return Normalizer.from_dict(parent.meta["normalization"])


def train_branch(config: TreeConfig, name: str, models: dict[str, Model], data: TreeData, recipe: Recipe,
                 seed: int, progress: bool = True):
    """Train branch `name` on its source's activations; returns (model, checkpoint meta)."""
    spec, r = config.node(name), recipe.branch
    parent = models["parent"]
    normalizer = parent_normalizer(parent)
    images, labels, rows = data.node_rows("train", spec)
    X = normalizer.transform(images)
    validation = r.validation
    parent_val = set(parent.meta["val_rows"].tolist())
    if validation == "parent" and not parent_val:
        log(f"{name}: the parent holds out no images (trained with the original recipe); "
            f"validating on an 80/20 split of the branch's training images instead")
        validation = "own"
    if validation == "parent":
        in_val = np.array([row in parent_val for row in rows.tolist()], dtype=bool)
        train_idx, val_idx = np.flatnonzero(~in_val), np.flatnonzero(in_val)
    else:
        train_idx, val_idx = _split(labels, 0.2, ORIGINAL_BRANCH_SPLIT_SEED)
    where = spec.where or r.where
    source = models[spec.source]
    def features(x):
        return read_layer(models, spec.source, spec.layer, where, x)

    features_val = batched(features, X[val_idx], models)
    if r.flip:
        def transform(xb, g):
            with torch.no_grad():
                return features(flip_images(xb, normalizer, g))
        train_X = X[train_idx]
    else:
        transform, train_X = None, batched(features, X[train_idx], models)
    width = source.width(spec.layer)
    dropout = spec.dropout if spec.dropout is not None else r.dropout
    model = Model([width, *spec.hidden, len(spec.classes)], activation=spec.activation, dropout=dropout, seed=seed)
    log(f"{name}: reads {spec.source} layer {spec.layer} ({where}, width {width}); {len(train_idx)} training "
        f"images, {len(val_idx)} validation ({validation}), recipe {recipe.name}")
    history = model.fit(train_X, labels[train_idx], validation_data=(features_val, labels[val_idx]),
                        train_transform=transform, restore_best_weights=True,
                        **_fit_kwargs(r, seed, progress, name))
    model.freeze()
    acceptance = fit_acceptance(spec, r, model.logits(features_val), labels[val_idx])
    meta = {"kind": "branch", "name": name, "classes": list(spec.classes), "hidden": list(spec.hidden),
            "source": spec.source, "layer": spec.layer, "where": where,
            "source_fingerprint": source.fingerprint(), "parent_fingerprint": parent.fingerprint(),
            "recipe": recipe.to_dict(), "seed": seed, "validation": validation,
            "train_rows": torch.from_numpy(rows[train_idx]), "val_rows": torch.from_numpy(rows[val_idx]),
            "acceptance": acceptance, "history": history}
    return model, meta


def fit_acceptance(spec: NodeSpec, r, val_logits: np.ndarray, val_labels: np.ndarray) -> dict:
    """Temperature and threshold for a node, chosen on validation data only."""
    accept = spec.accept
    if accept.rule != "threshold":
        raise ConfigError(f"acceptance rule {accept.rule!r} of {spec.name!r} is not supported yet; use rule = "
                          f"\"threshold\"")
    calibrate = r.calibrate if accept.calibrate is None else accept.calibrate
    if accept.temperature is not None:
        temperature = accept.temperature
    elif calibrate:
        temperature = calibration.fit_temperature(val_logits, val_labels)
    else:
        temperature = 1.0
    threshold = accept.threshold if accept.threshold is not None else r.threshold
    return {"rule": "threshold", "temperature": float(temperature), "threshold": float(threshold),
            "calibrated": bool(calibrate and accept.temperature is None)}


# ---- evaluation ------------------------------------------------------------------------------

def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def evaluate_node(config: TreeConfig, name: str, models: dict[str, Model], data: TreeData):
    """Test metrics of one node and its per-image predictions (as rows for the CSV)."""
    spec, model = config.node(name), models[name]
    images, labels, rows = data.node_rows("test", spec)
    X = parent_normalizer(models["parent"]).transform(images)
    logits = model.logits(node_inputs(models, name, X))
    predicted = logits.argmax(axis=1)
    metrics = classification_summary(labels, predicted, spec.classes)
    acceptance = model.meta.get("acceptance")
    if acceptance is None:  # the parent: no reject option
        confidence, accepted = softmax(logits).max(axis=1), np.ones(len(labels), bool)
    else:
        confidence = softmax(logits, acceptance["temperature"]).max(axis=1)
        accepted = confidence >= acceptance["threshold"]
        metrics.update(selective_summary(labels, predicted, accepted), acceptance=acceptance)
    predictions = [{"index": int(row), "true_class": spec.classes[t], "predicted_class": spec.classes[p],
                    "confidence": float(c), "accepted": int(a)}
                   for row, t, p, c, a in zip(rows, labels, predicted, confidence, accepted)]
    return metrics, predictions


# ---- writing ---------------------------------------------------------------------------------

def write_atomic(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


PREDICTION_COLUMNS = ("index", "true_class", "predicted_class", "confidence", "accepted")


def write_predictions(path, predictions: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(predictions[0]) if predictions else PREDICTION_COLUMNS)
    writer.writeheader()
    for row in predictions:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    write_atomic(path, buffer.getvalue())


def _history_summary(history: dict) -> dict:
    return {k: history[k] for k in ("epochs_run", "best_epoch", "stopped_early")}


# ---- the whole tree --------------------------------------------------------------------------

def run(config: TreeConfig, data_dir, out_dir, recipe: Recipe, seed: int = 0, download: bool = False,
        progress: bool = True, echo=print) -> dict:
    """Train the parent and every branch, evaluate all on the test split, write OUT/metrics.json,
    OUT/predictions/<node>.csv and OUT/models/<node>.pt; returns the metrics."""
    start = time.perf_counter()
    data = load_tree_data(config, data_dir, download=download, progress=progress)
    out = Path(out_dir)
    store = ModelStore(out / "models")
    timings: dict[str, float] = {}
    models: dict[str, Model] = {}
    for spec in config.nodes():
        t = time.perf_counter()
        if spec.source is None:
            model, meta, _ = train_parent(config, data, recipe, seed, progress)
        else:
            model, meta = train_branch(config, spec.name, models, data, recipe, seed, progress)
        store.save(spec.name, model, meta)
        models[spec.name] = store.load(spec.name)
        timings[f"train_{spec.name}_s"] = time.perf_counter() - t

    t = time.perf_counter()
    metrics = {"seed": seed, "recipe": recipe.name, "config": config.to_dict(), "data": data.fingerprint(),
               "parent": None, "branches": {}}
    for spec in config.nodes():
        node_metrics, predictions = evaluate_node(config, spec.name, models, data)
        node_metrics.update(train_samples=len(models[spec.name].meta["train_rows"]),
                            val_samples=len(models[spec.name].meta["val_rows"]),
                            **_history_summary(models[spec.name].meta["history"]))
        write_predictions(out / "predictions" / f"{spec.name}.csv", predictions)
        if spec.source is None:
            metrics["parent"] = node_metrics
        else:
            metrics["branches"][spec.name] = node_metrics
        echo(format_report(spec.name, node_metrics, spec.classes))
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    metrics["timings"] = timings
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
