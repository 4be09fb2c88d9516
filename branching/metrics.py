"""Test-set metrics and the printed tables."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix


def classification_summary(y_true, y_pred, classes) -> dict:
    """Accuracy, per-class accuracy (recall) and the confusion matrix (rows: true, columns: predicted)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(len(classes)))
    per_class = {name: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, name in enumerate(classes)}
    return {"test_samples": int(len(y_true)),
            "test_accuracy": float((y_true == y_pred).mean()) if len(y_true) else None,
            "per_class_accuracy": per_class,
            "confusion_matrix": cm.tolist()}


def selective_summary(y_true, y_pred, accepted) -> dict:
    """Coverage and accuracy among the accepted predictions, as the original reported them."""
    y_true, y_pred, accepted = np.asarray(y_true), np.asarray(y_pred), np.asarray(accepted, dtype=bool)
    n_accepted = int(accepted.sum())
    correct = y_true == y_pred
    return {"accepted": n_accepted,
            "coverage": float(n_accepted / len(y_true)) if len(y_true) else None,
            "accuracy": float(correct.mean()) if len(y_true) else None,
            "accepted_accuracy": float(correct[accepted].mean()) if n_accepted else None}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def format_report(title: str, metrics: dict, classes) -> str:
    """The original's lines (samples, accepted, accuracy, accuracy on accepted), per-class accuracy and
    a confusion matrix labelled with class names."""
    lines = [f"== {title} ==", f"Total Test Samples: {metrics['test_samples']}"]
    if "accepted" in metrics:
        lines.append(f"Accepted Predictions: {metrics['accepted']} ({100 * (metrics['coverage'] or 0):.1f}%)")
    lines.append(f"Overall Accuracy: {_pct(metrics['test_accuracy'])}")
    if "accepted" in metrics:
        lines.append(f"Accuracy on Accepted: {_pct(metrics['accepted_accuracy'])}")
        rule = metrics.get("acceptance", {})
        if rule:
            lines.append(f"Acceptance: max probability >= {rule['threshold']:.4f} "
                         f"(temperature {rule['temperature']:.3f})")
    width = max(len(c) for c in classes)
    lines.append("Per-class accuracy:")
    lines += [f"  {name:<{width}}  {_pct(acc)}" for name, acc in metrics["per_class_accuracy"].items()]
    lines.append("Confusion matrix (rows: true class, columns: predicted):")
    cols = [c[:10] for c in classes]
    cell = max(6, max(len(c) for c in cols))
    lines.append(" " * (width + 2) + "".join(f"{c:>{cell + 1}}" for c in cols))
    for name, row in zip(classes, metrics["confusion_matrix"]):
        lines.append(f"  {name:<{width}}" + "".join(f"{v:>{cell + 1}}" for v in row))
    return "\n".join(lines)
