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

from . import calibration, scores, selective
from .checkpoint import ModelStore
from .config import NodeSpec, TreeConfig
from .data import FINE_LABEL_NAMES, Split, load_label_names, load_split, resolve_classes, select
from .download import ensure_cifar100
from .errors import DataError
from .metrics import format_report
from .normalization import Normalizer
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
    resolve_classes(config.parent.classes, list(FINE_LABEL_NAMES))  # before any download
    if download:
        ensure_cifar100(data_dir, progress=progress)
    elif not all((data_dir / n).is_file() for n in ("train", "test", "meta")):
        raise DataError(f"no CIFAR-100 files (train, test, meta) in {data_dir}; put the official cifar-100-python "
                        f"files there, or run a training command without --no-download to fetch them")
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
    val_logits = model.logits(X[val_idx])
    fitted = fit_calibration(spec, r, val_logits, labels[val_idx])
    meta = {"kind": "parent", "name": "parent", "classes": list(spec.classes), "hidden": list(spec.hidden),
            "normalization": normalizer.to_dict(), "recipe": recipe.to_dict(), "seed": seed,
            "train_rows": torch.from_numpy(rows[train_idx]), "val_rows": torch.from_numpy(rows[val_idx]),
            "history": history, "calibration": fitted}
    if has_rule(spec):
        meta["acceptance"] = fit_acceptance(spec, r, val_logits, labels[val_idx], fitted)
    return model, meta, normalizer


def parent_normalizer(parent: Model) -> Normalizer:
    return Normalizer.from_dict(parent.meta["normalization"])


def train_branch(config: TreeConfig, name: str, models: dict[str, Model], data: TreeData, recipe: Recipe,
                 seed: int, progress: bool = True, cache_dir=None):
    """Train branch `name` on its source's activations; returns (model, checkpoint meta). With cache_dir
    the activations come from a features.FeatureCache there (built on first use)."""
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

    if cache_dir is not None:  # features (and their mirror images) computed once, kept on disk
        from .features import FeatureCache, branch_inputs
        train_X, transform, features_val = branch_inputs(
            FeatureCache(cache_dir, log), models, data.fingerprint(), spec.source, spec.layer, where, X, rows,
            train_idx, val_idx, r.flip)
    elif r.flip:
        features_val = batched(features, X[val_idx], models)
        def transform(xb, g):
            with torch.no_grad():
                return features(flip_images(xb, normalizer, g))
        train_X = X[train_idx]
    else:
        features_val = batched(features, X[val_idx], models)
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
    val_logits = model.logits(features_val)
    fitted = fit_calibration(spec, r, val_logits, labels[val_idx])
    acceptance = fit_acceptance(spec, r, val_logits, labels[val_idx], fitted)
    meta = {"kind": "branch", "name": name, "classes": list(spec.classes), "hidden": list(spec.hidden),
            "source": spec.source, "layer": spec.layer, "where": where,
            "source_fingerprint": source.fingerprint(), "parent_fingerprint": parent.fingerprint(),
            "recipe": recipe.to_dict(), "seed": seed, "validation": validation,
            "train_rows": torch.from_numpy(rows[train_idx]), "val_rows": torch.from_numpy(rows[val_idx]),
            "acceptance": acceptance, "calibration": fitted, "history": history}
    return model, meta


def fit_calibration(spec: NodeSpec, r, val_logits: np.ndarray, val_labels: np.ndarray) -> dict:
    """A node's temperature: fixed in the config, fit on validation logits (calibrate), or 1."""
    accept, n = spec.accept, len(val_labels)
    calibrate = r.calibrate if accept.calibrate is None else accept.calibrate
    if accept.temperature is not None:
        temperature, fitted = accept.temperature, False
    elif calibrate and n:
        temperature, fitted = calibration.fit_temperature(val_logits, val_labels), True
    else:
        temperature, fitted = 1.0, False
    out = {"temperature": float(temperature), "calibrated": fitted, "validation_samples": n}
    if n:
        out.update(val_nll_raw=calibration.nll(val_logits, val_labels),
                   val_nll=calibration.nll(val_logits, val_labels, temperature))
    elif calibrate and accept.temperature is None:
        out["reason"] = "no validation images to fit a temperature on; using 1"
    return out


def has_rule(spec: NodeSpec) -> bool:
    """Branches always have a reject option; the parent only when its [parent.accept] sets a threshold,
    a coverage or a risk."""
    a = spec.accept
    return spec.source is not None or any(v is not None for v in (a.threshold, a.coverage, a.risk))


def fit_acceptance(spec: NodeSpec, r, val_logits: np.ndarray, val_labels: np.ndarray,
                   fitted: dict | None = None) -> dict:
    """Temperature and threshold for a node, chosen on validation data only (see branching.selective).
    A rule that cannot be met accepts nothing (threshold None) and says why."""
    accept = spec.accept
    fitted = fitted or fit_calibration(spec, r, val_logits, val_labels)
    probabilities = calibration.softmax(val_logits, fitted["temperature"])
    threshold = accept.threshold if accept.threshold is not None else r.threshold
    rule = selective.fit_rule(accept.rule, probabilities.max(axis=1), probabilities.argmax(axis=1) == val_labels,
                              threshold=threshold, coverage=accept.coverage, risk=accept.risk, delta=accept.delta)
    if not rule["attained"]:
        log(f"{spec.name}: acceptance rule {accept.rule!r} cannot be met: {rule['reason']}; accepting nothing")
    return {**rule, "temperature": fitted["temperature"], "calibrated": fitted["calibrated"]}


# ---- evaluation ------------------------------------------------------------------------------

def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def node_temperature(model: Model) -> float:
    """The temperature a node's confidences use (1 for models trained without one)."""
    meta = model.meta
    return float((meta.get("calibration") or meta.get("acceptance") or {}).get("temperature", 1.0))


def evaluate_node(config: TreeConfig, name: str, models: dict[str, Model], data: TreeData):
    """Test metrics of one node and its per-image predictions (as rows for the CSV); a branch is also
    compared with the parent's own head restricted to the branch's classes."""
    spec, model = config.node(name), models[name]
    images, labels, rows = data.node_rows("test", spec)
    X = parent_normalizer(models["parent"]).transform(images)
    logits = model.logits(node_inputs(models, name, X))
    head = None
    if spec.source is not None:
        parent = models["parent"]
        head = scores.parent_head(parent.logits(X), config.parent.classes, spec.classes, node_temperature(parent))
    metrics, columns = scores.score_node(spec.classes, labels, logits, node_temperature(model),
                                         model.meta.get("acceptance"), head)
    return metrics, scores.prediction_rows(rows, spec.classes, columns)


# ---- writing ---------------------------------------------------------------------------------

def write_atomic(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


PREDICTION_COLUMNS = scores.PREDICTION_COLUMNS


def write_predictions(path, predictions: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(predictions[0]) if predictions else PREDICTION_COLUMNS)
    writer.writeheader()
    for row in predictions:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})  # exact
    write_atomic(path, buffer.getvalue())


def _history_summary(history: dict) -> dict:
    return {k: history[k] for k in ("epochs_run", "best_epoch", "stopped_early")}


# ---- the whole tree --------------------------------------------------------------------------

def run(config: TreeConfig, data_dir, out_dir, recipe: Recipe, seed: int = 0, download: bool = False,
        progress: bool = True, echo=print, report: bool = True, cache_dir=None) -> dict:
    """Train the parent and every branch, evaluate all on the test split, write OUT/metrics.json,
    OUT/predictions/<node>.csv, OUT/models/<node>.pt and (with report) OUT/report.md, OUT/report.html and
    OUT/plots/; returns the metrics."""
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
            model, meta = train_branch(config, spec.name, models, data, recipe, seed, progress, cache_dir)
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
    from .routing import evaluate_tree, format_tree_report
    metrics["tree"], tree_rows = evaluate_tree(config, models, data)
    write_predictions(out / "tree.csv", tree_rows)
    echo(format_tree_report(metrics["tree"], config.parent.classes))
    timings["evaluate_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    metrics["timings"] = timings
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if report:
        from .report import write_report  # matplotlib is only loaded when a report is written
        write_report(out)
    return metrics
