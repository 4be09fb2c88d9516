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
            lines += acceptance_lines(rule)
    lines += calibrated_lines(metrics)
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


def _ci(interval) -> str:
    return "" if not interval else f" [{100 * interval[0]:.1f}%, {100 * interval[1]:.1f}%]"


def _num(value, digits=4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def describe_rule(rule: dict) -> str:
    """What an acceptance rule asked for, e.g. "risk <= 2% with confidence 95%"."""
    asked = rule.get("asked") or {"threshold": rule.get("threshold")}
    if rule.get("rule") == "coverage":
        return f"coverage {100 * asked['coverage']:g}%"
    if rule.get("rule") == "risk":
        return f"risk <= {100 * asked['risk']:g}% with confidence {100 * (1 - asked['delta']):g}%"
    return f"threshold {asked['threshold']:g}"


def acceptance_lines(rule: dict) -> list[str]:
    """The rule asked for, the threshold it gave on validation, and what it delivered on test."""
    temperature = f"temperature {rule['temperature']:.3f}"
    if rule.get("threshold") is None:
        return [f"Acceptance: {rule.get('rule')} rule ({describe_rule(rule)}) cannot be met on validation: "
                f"{rule.get('reason')}; accepting nothing ({temperature})"]
    lines = [f"Acceptance: {rule.get('rule', 'threshold')} rule ({describe_rule(rule)}) -> max probability >= "
             f"{rule['threshold']:.4f} ({temperature})"]
    val, test = rule.get("validation"), rule.get("test")
    if val and test:
        bound = f", risk bound {_pct(rule['risk_bound'])}" if rule.get("risk_bound") is not None else ""
        lines.append(f"  on validation ({val['samples']} images): coverage {_pct(val['coverage'])}, "
                     f"risk {_pct(val['risk'])}{bound}; on test: coverage {_pct(test['coverage'])}, "
                     f"risk {_pct(test['risk'])}")
    return lines


def calibrated_lines(metrics: dict) -> list[str]:
    """Intervals, AURC and calibration of a node (absent for metrics written before they existed)."""
    if "aurc" not in metrics:
        return []
    lines = [f"Accuracy 95% CI:{_ci(metrics.get('test_accuracy_ci'))}"]
    if "coverage_ci" in metrics:
        lines.append(f"Coverage: {_pct(metrics['coverage'])}{_ci(metrics['coverage_ci'])}; accepted accuracy: "
                     f"{_pct(metrics['accepted_accuracy'])}{_ci(metrics['accepted_accuracy_ci'])} (95% Wilson)")
    lines.append(f"AURC {_num(metrics['aurc'])}, E-AURC {_num(metrics['eaurc'])}; ECE {_pct(metrics['ece_raw'])} "
                 f"raw -> {_pct(metrics['ece'])} at temperature {metrics['temperature']:.3f}; NLL "
                 f"{_num(metrics['nll_raw'])} -> {_num(metrics['nll'])}; Brier {_num(metrics['brier_raw'])} -> "
                 f"{_num(metrics['brier'])}")
    head = metrics.get("parent_head")
    if head:
        lines.append(f"Parent's own head on these classes: accuracy {_pct(head['test_accuracy'])}, AURC "
                     f"{_num(head['aurc'])}, risk {_pct(head['risk_at_branch_coverage'])} at the branch's coverage")
    return lines
