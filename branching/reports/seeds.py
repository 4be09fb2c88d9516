"""Several seeds of one run: each seed's full run in OUT/seed-<n>/, and in OUT/ the mean and standard
deviation of every headline figure (metrics.json, the printed table, report.md/.html with the seeds'
risk-coverage curves overlaid)."""

from __future__ import annotations

from branching.acceptance.stats import sample_summary
from branching.errors import ConfigError
from branching.tables import TEXT, mean_std, table

MAX_SEED = 2**32 - 1  # numpy and scikit-learn take seeds below 2**32

# Dotted paths into a node's metrics; the parent has no reject option or parent head unless configured.
HEADLINE = ("test_accuracy", "coverage", "accepted_accuracy", "selective_risk", "aurc", "eaurc", "ece_raw", "ece",
            "nll_raw", "nll", "brier_raw", "brier", "temperature", "acceptance.threshold",
            "acceptance.validation.coverage", "parent_head.test_accuracy", "parent_head.aurc",
            "parent_head.eaurc", "parent_head.risk_at_branch_coverage")
TREE_HEADLINE = ("test_accuracy", "parent_accuracy", "coverage", "accepted_accuracy", "mcnemar_p")
PERCENT = {"test_accuracy", "coverage", "accepted_accuracy", "selective_risk", "ece_raw", "ece",
           "acceptance.validation.coverage", "parent_head.test_accuracy", "parent_head.risk_at_branch_coverage",
           "parent_accuracy"}


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2]; distinct integers >= 0."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        seeds = [-1]
    if not seeds or min(seeds) < 0 or max(seeds) > MAX_SEED or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must be distinct integers from 0 to {MAX_SEED} separated by commas, e.g. "
                          f"0,1,2; got {text!r}")
    return seeds


def lookup(metrics: dict, path: str):
    for key in path.split("."):
        if not isinstance(metrics, dict) or key not in metrics:
            return None
        metrics = metrics[key]
    return metrics


def summarise(runs: dict[int, dict]) -> dict:
    """{"parent": {figure: stats}, "branches": {name: {figure: stats}}, "tree": {figure: stats} (the routed
    tree end to end), "timings": {...: stats}}."""
    first = next(iter(runs.values()))
    def node(get, figures=HEADLINE):
        out = {}
        for path in figures:
            values = [lookup(get(m), path) for m in runs.values()]
            if any(v is not None for v in values):
                out[path] = sample_summary(values)
        return out
    return {"parent": node(lambda m: m["parent"]),
            "branches": {name: node(lambda m, name=name: m["branches"][name]) for name in first["branches"]},
            "tree": node(lambda m: m.get("tree") or {}, TREE_HEADLINE),
            "timings": {k: sample_summary([m["timings"].get(k) for m in runs.values()]) for k in first["timings"]}}


def format_figure(summary: dict | None, percent: bool) -> str:
    """Mean ± std of one headline figure: "81.2 ± 1.3%" for a percentage, "0.0412 ± 0.0031" otherwise."""
    if percent:
        return mean_std(summary, scale=100, digits=1, unit="%", na="-")
    return mean_std(summary, digits=4, na="-")


TABLE = (("accuracy", "test_accuracy"), ("coverage", "coverage"), ("accepted acc.", "accepted_accuracy"),
         ("AURC", "aurc"), ("ECE", "ece"), ("threshold", "acceptance.threshold"))


def summary_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    header = ["node", "rule", *(label for label, _ in TABLE), "parent head acc.", "parent head AURC"]
    rows = []
    for name, node in [("parent", metrics["parent"]), *metrics["branches"].items()]:
        rows.append([name, metrics.get("rules", {}).get(name, "accept all"),
                     *(format_figure(node.get(key), key in PERCENT) for _, key in TABLE),
                     format_figure(node.get("parent_head.test_accuracy"), True),
                     format_figure(node.get("parent_head.aurc"), False)])
    return header, rows


def format_summary(metrics: dict) -> str:
    """The printed table: mean ± std over seeds of the headline figures of every node."""
    header, rows = summary_rows(metrics)
    seeds = ", ".join(map(str, metrics["seeds"]))
    lines = [f"== mean ± std over seeds {seeds} (recipe {metrics['recipe']}; sample std; test split) ==",
             table(header, rows, TEXT)]
    lines += tree_lines(metrics.get("tree"))
    total = metrics["timings"].get("total_s")
    if total:
        lines.append(f"time per seed: {mean_std(total, digits=1)} s")
    return "\n".join(lines)


def tree_lines(tree: dict | None) -> list[str]:
    """The routed tree's headline figures over seeds, beside the parent's flat accuracy."""
    if not tree:
        return []
    f = lambda key: format_figure(tree.get(key), True)  # noqa: E731
    return [f"routed tree, end to end: accuracy {f('test_accuracy')} (parent's flat accuracy on the same images "
            f"{f('parent_accuracy')}); coverage {f('coverage')} at accepted accuracy {f('accepted_accuracy')}"]
