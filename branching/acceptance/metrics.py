"""Test-set metrics and the printed tables."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix

from branching.acceptance.rule import describe_rule
from branching.tables import PLAIN, interval, num, pct, table


def classification_summary(y_true, y_pred, classes) -> dict:
    """Accuracy, per-class accuracy (recall) and the confusion matrix (rows: true, columns: predicted)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    cm = confusion_matrix(y_true, y_pred, labels=np.arange(len(classes)))
    per_class = {name: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, name in enumerate(classes)}
    return {"test_samples": int(len(y_true)),
            "test_accuracy": float((y_true == y_pred).mean()) if len(y_true) else None,
            "per_class_accuracy": per_class,
            "confusion_matrix": cm.tolist()}


def format_report(title: str, metrics: dict, classes) -> str:
    """The original's lines (samples, accepted, accuracy, accuracy on accepted), per-class accuracy and
    a confusion matrix labelled with class names."""
    lines = [f"== {title} ==", f"Total Test Samples: {metrics['test_samples']}"]
    if "accepted" in metrics:
        lines.append(f"Accepted Predictions: {metrics['accepted']} ({pct(metrics['coverage'] or 0, 1)})")
    lines.append(f"Overall Accuracy: {pct(metrics['test_accuracy'])}")
    if "accepted" in metrics:
        lines.append(f"Accuracy on Accepted: {pct(metrics['accepted_accuracy'])}")
        rule = metrics.get("acceptance", {})
        if rule:
            lines += acceptance_lines(rule)
    lines += calibrated_lines(metrics)
    lines.append("Per-class accuracy:")
    lines.append(table(None, [[name, pct(acc)] for name, acc in metrics["per_class_accuracy"].items()], PLAIN,
                       align=("left", "right"), indent="  "))
    lines.append("Confusion matrix (rows: true class, columns: predicted):")
    lines.append(table(["", *(c[:10] for c in classes)], [[name, *row] for name, row in
                                                           zip(classes, metrics["confusion_matrix"])], PLAIN,
                       align=("left",) + ("right",) * len(classes), indent="  "))
    return "\n".join(lines)


def acceptance_lines(rule: dict) -> list[str]:
    """The rule asked for, the threshold it gave on validation, and what it delivered on test."""
    temperature = f"temperature {num(rule['temperature'], 3)}"
    if rule.get("threshold") is None:
        return [f"Acceptance: {rule.get('rule')} rule ({describe_rule(rule)}) cannot be met on validation: "
                f"{rule.get('reason')}; accepting nothing ({temperature})"]
    lines = [f"Acceptance: {rule.get('rule', 'threshold')} rule ({describe_rule(rule)}) -> max probability >= "
             f"{num(rule['threshold'])} ({temperature})"]
    val, test = rule.get("validation"), rule.get("test")
    if val and test:
        bound = f", risk bound {pct(rule['risk_bound'])}" if rule.get("risk_bound") is not None else ""
        lines.append(f"  on validation ({val['samples']} images): coverage {pct(val['coverage'])}, "
                     f"risk {pct(val['risk'])}{bound}; on test: coverage {pct(test['coverage'])}, "
                     f"risk {pct(test['risk'])}")
    return lines


def calibrated_lines(metrics: dict) -> list[str]:
    """Intervals, AURC and calibration of a node (absent for metrics written before they existed)."""
    if "aurc" not in metrics:
        return []
    lines = [f"Accuracy 95% CI:{interval(metrics.get('test_accuracy_ci'))}"]
    if "coverage_ci" in metrics:
        lines.append(f"Coverage: {pct(metrics['coverage'])}{interval(metrics['coverage_ci'])}; accepted accuracy: "
                     f"{pct(metrics['accepted_accuracy'])}{interval(metrics['accepted_accuracy_ci'])} (95% Wilson)")
    lines.append(f"AURC {num(metrics['aurc'])}, E-AURC {num(metrics['eaurc'])}; ECE {pct(metrics['ece_raw'])} "
                 f"raw -> {pct(metrics['ece'])} at temperature {num(metrics['temperature'], 3)}; NLL "
                 f"{num(metrics['nll_raw'])} -> {num(metrics['nll'])}; Brier {num(metrics['brier_raw'])} -> "
                 f"{num(metrics['brier'])}")
    head = metrics.get("parent_head")
    if head:
        lines.append(f"Parent's own head on these classes: accuracy {pct(head['test_accuracy'])}, AURC "
                     f"{num(head['aurc'])}, risk {pct(head['risk_at_branch_coverage'])} at the branch's coverage")
    return lines
