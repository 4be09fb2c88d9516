"""The routed tree evaluated on a test split: its accuracy with intervals beside the parent's flat accuracy
on the same images (exact McNemar), where images went and were rejected, and its report's lines."""

from __future__ import annotations

from scipy.stats import binomtest

from branching.acceptance.metrics import classification_summary, format_report
from branching.acceptance.selective import selective_summary
from branching.acceptance.stats import wilson_interval
from branching.config.tree import TreeConfig
from branching.models.device import CPU
from branching.models.model import Model
from branching.tree.routing import TreePredictor


def evaluate_tree(config: TreeConfig, models: dict[str, Model], data, device=CPU) -> tuple[dict, list[dict]]:
    """End-to-end test metrics of the routed tree over all its classes, beside the parent's flat
    accuracy on the same images; and one row per test image (for OUT/tree.csv)."""
    images, labels, rows = data.node_rows("test", config.parent)
    predictor = TreePredictor(config, models, device=device)
    result = predictor.predict(images)
    classes = predictor.classes
    metrics = classification_summary(labels, result.predicted, classes)
    metrics.update(selective_summary(result.predicted == labels, result.accepted), accuracy=metrics["test_accuracy"])
    tree_right, parent_right = result.predicted == labels, result.parent_predicted == labels
    only_tree, only_parent = int((tree_right & ~parent_right).sum()), int((parent_right & ~tree_right).sum())
    metrics.update(
        test_accuracy_ci=wilson_interval(int(tree_right.sum()), len(labels)),
        parent_accuracy=float(parent_right.mean()) if len(labels) else None,
        parent_accuracy_ci=wilson_interval(int(parent_right.sum()), len(labels)),
        tree_only_correct=only_tree, parent_only_correct=only_parent,
        # exact McNemar test: is the tree's accuracy different from the parent's on these images?
        mcnemar_p=float(binomtest(only_tree, only_tree + only_parent).pvalue) if only_tree + only_parent else 1.0,
        reached=result.reached(),
        rejected_at={name: int((result.rejected_at == i).sum()) for i, name in enumerate(result.nodes)},
        rules={node.name: node.rule for node in predictor.nodes},
        flops_per_image=predictor.flops_per_image(result.reached(), len(labels)))
    predictions = [{"index": int(row), "file": data.test.filenames[int(row)], "true_class": classes[t], **r}
                   for row, t, r in zip(rows, labels, result.rows())]
    return metrics, predictions


def format_tree_report(metrics: dict, classes) -> str:
    """The usual table for the routed tree, plus the parent's flat accuracy and where images went."""
    from branching.tables import interval, num, pct
    lines = [format_report("tree (routed, end to end)", metrics, classes),
             f"Tree accuracy at full coverage: {pct(metrics['test_accuracy'])}"
             f"{interval(metrics['test_accuracy_ci'])}; "
             f"parent's flat accuracy on the same images: {pct(metrics['parent_accuracy'])}"
             f"{interval(metrics['parent_accuracy_ci'])} (95% Wilson)",
             f"Only the tree right: {metrics['tree_only_correct']}, only the parent right: "
             f"{metrics['parent_only_correct']} (exact McNemar p = {metrics['mcnemar_p']:.3g})",
             "Reached: " + ", ".join(f"{k} {v}" for k, v in metrics["reached"].items()),
             "Rejected at: " + ", ".join(f"{k} {v}" for k, v in metrics["rejected_at"].items()),
             "Rules: " + ", ".join(f"{k} T={num(r['temperature'], 3)} threshold {num(r['threshold'], na='none')}"
                                   + (f" on score {r['score']}" if "score" in r else "")
                                   for k, r in metrics["rules"].items())]
    return "\n".join(lines)
