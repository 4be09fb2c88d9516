"""Linear probes on hidden layers: where should a branch read? (`probe-layers`), and the probe
baseline of `compare`.

A probe is a scikit-learn logistic regression on standardised activations, its regularisation
chosen on held-out images that the parent never trained on. It costs seconds, so it can be run
before any branch is trained.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from branching import tables
from branching.acceptance.stats import wilson_interval
from branching.config.recipes import Recipe, get_recipe
from branching.config.tree import TreeConfig
from branching.console import log
from branching.data.tree_data import TreeData
from branching.models.device import CPU
from branching.models.forward import extract, read
from branching.models.model import Model
from branching.train.nodes import (ORIGINAL_BRANCH_SPLIT_SEED, held_out_rows, parent_normalizer, shown_pool,
                                   train_branch, train_parent)
from branching.tree import cost

PROBE_CS = (1e-4, 1e-3, 1e-2, 1e-1)   # inverse regularisation strengths tried; the best on validation wins


@dataclass
class LinearProbe:
    """A fitted probe: standardisation then multinomial logistic regression."""

    pipeline: Pipeline
    C: float

    def logits(self, X) -> np.ndarray:
        """Class scores (N, classes); softmax of them is the probe's predict_proba."""
        z = self.pipeline.decision_function(X)
        return np.stack([np.zeros_like(z), z], axis=1) if z.ndim == 1 else z

    @property
    def num_parameters(self) -> int:
        """Weights and biases of the regression (the standardisation's statistics are not trained)."""
        regression = self.pipeline[-1]
        return int(regression.coef_.size + regression.intercept_.size)


def fit_linear_probe(X_train, y_train, X_val, y_val, Cs=PROBE_CS) -> tuple[LinearProbe, dict]:
    """Fit one probe per C and keep the one with the lowest validation log-loss.

    Returns the probe and its validation metrics {accuracy, log_loss, C}.
    """
    n_classes = int(max(y_train.max(), y_val.max())) + 1
    best = None
    for C in Cs:
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000))
        with threadpool_limits(1):  # small problems: BLAS threads on a busy machine cost 10x more than they gain
            pipeline.fit(X_train, y_train)
        proba = pipeline.predict_proba(X_val)
        loss = log_loss(y_val, proba, labels=np.arange(n_classes))
        if best is None or loss < best[1]["log_loss"]:
            accuracy = float((proba.argmax(axis=1) == y_val).mean())
            best = (LinearProbe(pipeline, C), {"accuracy": accuracy, "log_loss": float(loss), "C": C})
    return best


def held_out_split(parent: Model, rows: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(training positions, validation positions, kind) among a node's training images.

    kind "parent": validation is the parent's held-out images of these classes (as the default
    recipe's branches use). kind "own": the parent held nothing out (original recipe), so an 80/20
    split of images the parent trained on; probe accuracies then look better than they are.
    """
    parent_val = held_out_rows(parent)
    if len(parent_val):
        in_val = np.isin(rows, parent_val)
        return np.flatnonzero(~in_val), np.flatnonzero(in_val), "parent"
    train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                          random_state=ORIGINAL_BRANCH_SPLIT_SEED)
    return np.sort(train_idx), np.sort(val_idx), "own"


def train_sources(config: TreeConfig, data: TreeData, recipe: Recipe, seed: int, progress: bool = True,
                  device: torch.device = CPU):
    """Train the parent and every branch that another branch reads; returns the models by name."""
    parent, meta, _ = train_parent(config, data, recipe, seed, progress, device)
    parent.meta = meta
    models = {"parent": parent}
    sources = {spec.source for spec in config.branches.values()}
    for spec in config.nodes()[1:]:
        if spec.name in sources:
            model, meta = train_branch(config, spec.name, models, data, recipe, seed, progress, device=device)
            model.meta = meta
            models[spec.name] = model
    return models


def probe_layers(config: TreeConfig, models: dict[str, Model], data: TreeData) -> list[dict]:
    """One row per (branch, tap of its source): validation accuracy and log-loss of a linear probe on the
    branch's classes, with the tap's shape, the width of the vector its pooling gives, and the FLOPs from
    the pixels to it."""
    table = []
    normalizer = parent_normalizer(models["parent"])
    default_where = get_recipe("default").branch.where
    for spec in config.nodes()[1:]:
        images, labels, rows = data.node_rows("train", spec)
        X = normalizer.transform(images)
        train_idx, val_idx, kind = held_out_split(models["parent"], rows, labels)
        source = models[spec.source]
        configured = read(models, spec.source, spec.layer, source.net_kind.branch_where(spec.where, default_where),
                          spec.pool)
        candidates = [read(models, spec.source, info["layer"], info["where"]) for info in source.feature_info]
        if configured not in candidates:
            candidates.append(configured)
        for r in candidates:
            start = time.perf_counter()
            features = extract(models, [r], X)[0]
            _, val = fit_linear_probe(features[train_idx], labels[train_idx], features[val_idx], labels[val_idx])
            info = source.tap(*r[1:3])
            table.append({"branch": spec.name, "source": spec.source, "tap": info["name"], "layer": r[1],
                          "where": None if source.net_kind.encoded else r[2], "pool": shown_pool(source, r),
                          "shape": list(info["shape"]), "width": features.shape[1],
                          "flops_to_layer": cost.flops_to(models, r), "val_accuracy": val["accuracy"],
                          "val_log_loss": val["log_loss"], "C": val["C"], "train_samples": int(len(train_idx)),
                          "val_samples": int(len(val_idx)), "validation": kind,
                          "seconds": time.perf_counter() - start, "configured": r == configured})
    return table


def recommend(table: list[dict]) -> dict[str, dict]:
    """Per branch, the row with the best validation accuracy (ties: lower log-loss, then fewer FLOPs)."""
    best: dict[str, dict] = {}
    for row in table:
        key = (-row["val_accuracy"], row["val_log_loss"], row["flops_to_layer"])
        current = best.get(row["branch"])
        if current is None or key < (-current["val_accuracy"], current["val_log_loss"], current["flops_to_layer"]):
            best[row["branch"]] = row
    return best


def format_probe_table(table: list[dict], best: dict[str, dict]) -> str:
    """The table the recommendation was decided from, then one line per branch."""
    header = ["branch", "source", "tap", "shape", "pool", "width", "MFLOPs", "val acc", "val NLL", "C", ""]
    rows = [[row["branch"], row["source"], row["tap"], "x".join(map(str, row["shape"])), row["pool"], row["width"],
             tables.num(row["flops_to_layer"] / 1e6, 2), tables.pct(row["val_accuracy"], 1),
             tables.num(row["val_log_loss"], 3), f"{row['C']:g}",
             " ".join(note for note, on in (("<- recommended", best[row["branch"]] is row),
                                            ("(configured)", row["configured"])) if on)] for row in table]
    align = ("left", "left", "left", "right", "left", "right", "right", "right", "right", "right", "left")
    lines = [tables.table(header, rows, tables.PLAIN, align=align),
             "width: of the vector the pooling makes of the tap; MFLOPs: per image, from the pixels to the tap; "
             "val: the images named below, never the test split.",
             ""]
    for name, row in best.items():
        ci = wilson_interval(round(row["val_accuracy"] * row["val_samples"]), row["val_samples"])
        noise = tables.num(None if ci is None else 100 * (ci[1] - ci[0]) / 2, 1)
        where = ("held-out images no node trains on" if row["validation"] == "parent"
                 else "an 80/20 split of images the parent trained on (optimistic)")
        lines.append(f"{name}: read {row['source']} {row['tap']} (pool {row['pool']}); validated on "
                     f"{row['val_samples']} images, {where}; differences under about {noise} points are "
                     f"within noise (95% interval)")
        cheap = cheapest_within_noise(table, row)
        if cheap is not row:
            lines.append(f"{name}: the cheapest tap within one standard error of it: {cheap['tap']} (pool "
                         f"{cheap['pool']}), {tables.pct(cheap['val_accuracy'], 1)} at "
                         f"{tables.num(cheap['flops_to_layer'] / 1e6, 1)} MFLOPs against "
                         f"{tables.num(row['flops_to_layer'] / 1e6, 1)}")
    return "\n".join(lines)


def cheapest_within_noise(table: list[dict], best: dict) -> dict:
    """The row of best's branch with the fewest FLOPs whose validation accuracy is at most one binomial standard
    error below best's (the rule benchmarks/tune_kinds.py applies to recipes)."""
    p, n = best["val_accuracy"], best["val_samples"]
    floor = p - (p * (1 - p) / n) ** 0.5 if n else p
    rows = [r for r in table if r["branch"] == best["branch"] and r["val_accuracy"] >= floor]
    return min(rows, key=lambda r: (r["flops_to_layer"], -r["val_accuracy"]))


def run_probe_layers(config: TreeConfig, models: dict[str, Model], data: TreeData) -> tuple[list[dict], dict, float]:
    """probe_layers + recommend, timed; returns (table, recommendations, seconds)."""
    start = time.perf_counter()
    table = probe_layers(config, models, data)
    seconds = time.perf_counter() - start
    log(f"{len(table)} probes in {seconds:.1f} s")
    return table, recommend(table), seconds
