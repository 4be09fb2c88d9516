"""Test-set scores of one node from its logits: classification, calibration and selective metrics,
and the per-image rows of OUT/predictions/<node>.csv from which every selective figure can be
recomputed (see recompute_selective)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from branching.acceptance import calibration, selective
from branching.acceptance.metrics import classification_summary
from branching.acceptance.stats import wilson_interval

# Columns of OUT/predictions/<node>.csv; a branch adds the parent head's (parent_predicted_class, parent_confidence).
PREDICTION_COLUMNS = ("index", "file", "true_class", "predicted_class", "confidence", "accepted", "raw_confidence")


def per_class_scores(labels, predicted, classes) -> dict:
    """Precision, recall, F1 and support per class (scikit-learn; 0 where undefined)."""
    p, r, f, s = precision_recall_fscore_support(labels, predicted, labels=np.arange(len(classes)),
                                                 zero_division=0)
    return {name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(classes)}


def parent_head(parent_logits, parent_classes, classes, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The parent's own head restricted to a branch's classes: argmax over those classes' logits and the
    max of the softmax over them (at the parent's temperature). Returns (predicted ids, confidence)."""
    columns = [list(parent_classes).index(c) for c in classes]
    restricted = np.asarray(parent_logits, dtype=np.float64)[:, columns]
    return restricted.argmax(axis=1), calibration.softmax(restricted, temperature).max(axis=1)


def score_node(classes, labels, logits, acceptance, parent: tuple | None = None, judge=None) -> tuple[dict, dict]:
    """Metrics of a node on the test images and the per-image columns for its CSV.

    `acceptance` is the node's acceptance.Acceptance, fit on validation (a node without a reject option
    accepts everything, as the parent by default); `parent` is (predicted ids, confidence) of the
    parent's restricted head, for branches; `judge` the self-evaluation branch's probabilities, for a
    node whose acceptance score is "selfeval".
    """
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    predicted = logits.argmax(axis=1)
    correct = predicted == labels
    raw_confidence = calibration.softmax(logits).max(axis=1)
    confidence = acceptance.confidence(logits, judge)
    metrics = classification_summary(labels, predicted, classes)
    metrics["test_accuracy_ci"] = wilson_interval(int(correct.sum()), len(labels))
    metrics["per_class"] = per_class_scores(labels, predicted, classes)
    metrics["temperature"] = float(acceptance.temperature)
    metrics.update(calibration.calibration_summary(logits, labels, acceptance.temperature))
    metrics.update(aurc=selective.aurc(confidence, correct), eaurc=selective.eaurc(confidence, correct))
    accepted = acceptance.accepts(confidence)
    if acceptance.rejects:
        summary = selective.selective_summary(correct, accepted)
        metrics.update(summary, accuracy=metrics["test_accuracy"])
        metrics["acceptance"] = {**acceptance.summary(), "test": {"samples": len(labels), "accepted": summary["accepted"],
                                                                  "coverage": summary["coverage"],
                                                                  "risk": summary["selective_risk"]}}
    columns = {"true": labels, "predicted": predicted, "confidence": confidence, "accepted": accepted,
               "raw_confidence": raw_confidence}
    if parent is not None:
        parent_predicted, parent_confidence = parent
        parent_correct = parent_predicted == labels
        coverage = metrics.get("coverage")
        metrics["parent_head"] = {
            "test_accuracy": float(parent_correct.mean()) if len(labels) else None,
            "test_accuracy_ci": wilson_interval(int(parent_correct.sum()), len(labels)),
            "aurc": selective.aurc(parent_confidence, parent_correct),
            "eaurc": selective.eaurc(parent_confidence, parent_correct),
            "risk_at_branch_coverage": (selective.risk_at_coverage(parent_confidence, parent_correct, coverage)
                                        if coverage else None)}
        columns.update(parent_predicted=parent_predicted, parent_confidence=parent_confidence)
    return metrics, columns


def prediction_rows(rows, classes, columns: dict, files=None) -> list[dict]:
    """One dict per test image in PREDICTION_COLUMNS order (plus the parent head's, for a branch); `files`: the
    name of each of the split's images (or texts' ids), by row."""
    out = []
    for i, row in enumerate(rows):
        item = {"index": int(row), "file": "" if files is None else files[int(row)],
                "true_class": classes[columns["true"][i]],
                "predicted_class": classes[columns["predicted"][i]], "confidence": float(columns["confidence"][i]),
                "accepted": int(columns["accepted"][i]), "raw_confidence": float(columns["raw_confidence"][i])}
        if "parent_predicted" in columns:
            item.update(parent_predicted_class=classes[columns["parent_predicted"][i]],
                        parent_confidence=float(columns["parent_confidence"][i]))
        out.append(item)
    return out


def recompute_selective(rows: list[dict]) -> dict:
    """The selective figures of a node from its predictions CSV alone (rows as read by csv.DictReader)."""
    correct = np.array([r["true_class"] == r["predicted_class"] for r in rows], dtype=bool)
    confidence = np.array([float(r["confidence"]) for r in rows])
    raw = np.array([float(r["raw_confidence"]) for r in rows])
    accepted = np.array([r["accepted"] == "1" for r in rows], dtype=bool)
    out = {"test_samples": len(rows), "test_accuracy": float(correct.mean()) if len(rows) else None,
           "test_accuracy_ci": wilson_interval(int(correct.sum()), len(rows)),
           "aurc": selective.aurc(confidence, correct), "eaurc": selective.eaurc(confidence, correct),
           "ece": calibration.ece(confidence, correct), "ece_raw": calibration.ece(raw, correct),
           **selective.selective_summary(correct, accepted)}
    if rows and "parent_confidence" in rows[0]:
        parent_correct = np.array([r["true_class"] == r["parent_predicted_class"] for r in rows], dtype=bool)
        parent_confidence = np.array([float(r["parent_confidence"]) for r in rows])
        out["parent_head"] = {
            "test_accuracy": float(parent_correct.mean()),
            "aurc": selective.aurc(parent_confidence, parent_correct),
            "eaurc": selective.eaurc(parent_confidence, parent_correct),
            "risk_at_branch_coverage": (selective.risk_at_coverage(parent_confidence, parent_correct,
                                                                   out["coverage"]) if out["coverage"] else None)}
    return out
