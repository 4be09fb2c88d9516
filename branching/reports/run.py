"""OUT/report.md and OUT/report.html of a run, rebuilt from its files alone (metrics.json,
predictions/<node>.csv and the histories in models/<node>.pt), with PNG figures in OUT/plots/.

The HTML page is self-contained: the same tables, with the figures embedded as data URIs.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

import numpy as np

from branching.acceptance.confidence import PROBABILITY_SCORES
from branching.acceptance.rule import describe_rule
from branching.fileio import write_text
from branching.models.model import Model
from branching.reports import plots
from branching.models.kinds import reads_of
from branching.tables import HTML, MARKDOWN, in_texts, interval, num, pct, table

NOTE = ("Intervals are 95% Wilson score intervals; with about 100 test images per class they span roughly "
        "+-5 to +-10 points, so differences smaller than that are not evidence. Confidence is the max softmax "
        "probability after temperature scaling (temperature fit on validation logits by NLL); thresholds "
        "are chosen on validation data only. AURC is the mean selective risk over all coverages (lower is "
        "better); E-AURC subtracts the AURC of a perfect ranking of the same predictions. ECE uses 15 "
        "equal-width bins. \"raw -> calibrated\" gives a figure at temperature 1 and at the fitted "
        "temperature. A risk-coverage curve starts at the coverage of its most confident group of equal "
        "confidences (often exactly 1.0 for an overconfident model): no threshold separates them.")


# ---- reading a run -----------------------------------------------------------------------------

def read_predictions(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def node_classes(metrics: dict) -> dict[str, list[str]]:
    config = metrics["config"]
    return {"parent": config["parent"].get("classes", []), **{n: b["classes"] for n, b in config["branches"].items()}}


def columns(rows: list[dict]) -> dict:
    """The arrays the figures need from a predictions CSV."""
    out = {"correct": np.array([r["true_class"] == r["predicted_class"] for r in rows], dtype=bool),
           "confidence": np.array([float(r["confidence"]) for r in rows]),
           "raw_confidence": np.array([float(r["raw_confidence"]) for r in rows])}
    if rows and "parent_confidence" in rows[0]:
        out["parent_correct"] = np.array([r["true_class"] == r["parent_predicted_class"] for r in rows], dtype=bool)
        out["parent_confidence"] = np.array([float(r["parent_confidence"]) for r in rows])
    return out


def node_metrics(metrics: dict, name: str) -> dict:
    return metrics["parent"] if name == "parent" else metrics["branches"][name]


# ---- text helpers ------------------------------------------------------------------------------

def arrow(m: dict, key: str, percent: bool = False) -> str:
    """"raw -> calibrated" of a figure: m[key + "_raw"] and m[key]."""
    fmt = (lambda v: pct(v, 1)) if percent else num
    return f"{fmt(m.get(f'{key}_raw'))} -> {fmt(m.get(key))}"


def operating_label(rule: dict) -> str:
    test = rule.get("test", {})
    if rule.get("threshold") is None:
        return f"{describe_rule(rule)}: cannot be met, accepts nothing"
    asked = "" if rule.get("rule", "threshold") == "threshold" else f"{describe_rule(rule)}, "
    return (f"operating point ({asked}threshold {num(rule['threshold'], 3)}): "
            f"test coverage {pct(test.get('coverage'), 1)}, risk {pct(test.get('risk'), 1)}")


# ---- documents: blocks rendered as Markdown and as HTML ---------------------------------------

def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + rest[0])
        elif kind == "p":
            out.append(rest[0])
        elif kind == "code":
            out.append("```toml\n" + rest[0] + "\n```")
        elif kind == "table":
            out.append(table(*rest, MARKDOWN))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
    return "\n\n".join(out) + "\n"


def render_html(blocks: list[tuple], base: Path, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
           "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
           "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
           "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}</style></head><body>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{html.escape(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{html.escape(rest[0])}</p>")
        elif kind == "code":
            out.append(f"<pre>{html.escape(rest[0])}</pre>")
        elif kind == "table":
            out.append(table(*rest, HTML))
        elif kind == "img":
            data = base64.b64encode((base / rest[0]).read_bytes()).decode()
            out.append(f"<p><img alt='{html.escape(rest[1])}' src='data:image/png;base64,{data}'></p>")
    return "\n".join(out) + "</body></html>\n"


def write_documents(out: Path, blocks: list[tuple], title: str, parent_kind: str | None = None) -> Path:
    """report.html and report.md of the blocks (a text tree's words for images made words for texts)."""
    reads = reads_of(parent_kind)
    blocks = [(kind, *(in_texts(r, reads) if isinstance(r, str) and kind != "img" else
                       [in_texts(h, reads) for h in r] if kind == "table" and i == 0 else r
                       for i, r in enumerate(rest))) for kind, *rest in blocks]
    write_text(out / "report.html", render_html(blocks, out, title))
    write_text(out / "report.md", render_markdown(blocks))
    return out / "report.md"


# ---- one run -----------------------------------------------------------------------------------

SUMMARY_HEADER = ["node", "test images", "accuracy [95% CI]", "coverage [95% CI]", "accepted accuracy [95% CI]",
                  "AURC", "E-AURC", "ECE raw -> calibrated", "NLL raw -> calibrated", "Brier raw -> calibrated",
                  "temperature"]


def summary_row(name: str, m: dict) -> list[str]:
    return [name, str(m["test_samples"]), pct(m["test_accuracy"], 1) + interval(m.get("test_accuracy_ci")),
            pct(m["coverage"], 1) + interval(m.get("coverage_ci")) if "coverage" in m else "100% (no reject option)",
            pct(m.get("accepted_accuracy"), 1) + interval(m.get("accepted_accuracy_ci")) if "coverage" in m else "-",
            num(m.get("aurc")), num(m.get("eaurc")), arrow(m, "ece", percent=True), arrow(m, "nll"),
            arrow(m, "brier"), num(m.get("temperature"), 3)]


def acceptance_row(name: str, rule: dict) -> list[str]:
    val, test = rule.get("validation") or {}, rule.get("test") or {}
    bound = f", bound {pct(rule['risk_bound'], 1)}" if rule.get("risk_bound") is not None else ""
    return [name, f"{rule.get('rule')}: {describe_rule(rule)}", num(rule.get("threshold")),
            f"{val.get('samples', 'n/a')} images: coverage {pct(val.get('coverage'), 1)}, "
            f"risk {pct(val.get('risk'), 1)}{bound}", f"coverage {pct(test.get('coverage'), 1)}, "
            f"risk {pct(test.get('risk'), 1)}",
            f"cannot be met, accepts nothing: {rule.get('reason')}" if rule.get("threshold") is None else ""]


def note_blocks(notes) -> list[tuple]:
    """A note's prose as a paragraph, and the TOML lines it ends with (indented) as code."""
    blocks = []
    for note in notes:
        prose, *toml = note.split("\n")
        blocks.append(("p", prose))
        if toml:
            blocks.append(("code", "\n".join(line.strip() for line in toml)))
    return blocks


def write_report(out_dir, title: str | None = None) -> Path:
    """Figures in OUT/plots/ and OUT/report.md + OUT/report.html for the run in out_dir."""
    out = Path(out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    classes = node_classes(metrics)
    names = ["parent"] * bool(metrics["parent"]) + list(metrics["branches"])  # a module parent may have no head
    run = f"recipe {metrics['recipe']}, seed {metrics['seed']}"
    blocks: list[tuple] = [("h1", title or f"Neural Branching run ({run})"),
                           ("p", f"Config {metrics['config'].get('path')}, data {metrics['data']['dir']}; "
                                 f"total time {num(metrics['timings']['total_s'], 1)} s.")]
    if metrics.get("notes"):
        blocks += [("h2", "Needs attention"), *note_blocks(metrics["notes"].values())]
    blocks += [("h2", "Summary on the test split"),
               ("table", SUMMARY_HEADER, [summary_row(n, node_metrics(metrics, n)) for n in names]),
               ("p", NOTE)]
    rules = [(n, node_metrics(metrics, n)["acceptance"]) for n in names if "acceptance" in node_metrics(metrics, n)]
    if rules:
        blocks += [("h2", "Acceptance rules: asked, chosen on validation, delivered on test"),
                   ("table", ["node", "rule (asked)", "threshold", "validation", "test", "note"],
                    [acceptance_row(n, r) for n, r in rules])]
    heads = [(n, m) for n in metrics["branches"] if "parent_head" in (m := node_metrics(metrics, n))]
    if heads:
        blocks += [("h2", "Branches against the parent's own head on the same classes"),
                   ("p", "The parent's head restricted to a branch's classes: argmax over those classes' logits, "
                         "confidence from the softmax over them at the parent's temperature, on the same test "
                         "images."),
                   ("table", ["branch", "accuracy: branch / parent head", "AURC: branch / parent head",
                              "E-AURC: branch / parent head", "risk at the branch's test coverage: branch / parent"],
                    [[n, f"{pct(m['test_accuracy'], 1)} / {pct(m['parent_head']['test_accuracy'], 1)}",
                      f"{num(m['aurc'])} / {num(m['parent_head']['aurc'])}",
                      f"{num(m['eaurc'])} / {num(m['parent_head']['eaurc'])}",
                      f"{pct(m.get('selective_risk'), 1)} / {pct(m['parent_head']['risk_at_branch_coverage'], 1)}"]
                     for n, m in heads])]
    blocks += scores_section(metrics, names)
    if metrics.get("tree"):
        blocks += tree_section(metrics["tree"])
    if metrics.get("cascade"):
        blocks += cascade_section(out, metrics["cascade"], run)
    for name in names:
        blocks += node_section(out, metrics, name, classes, run)
    return write_documents(out, blocks, title or f"Neural Branching run ({run})", metrics["config"]["parent"].get("kind"))


def tree_section(tree: dict) -> list[tuple]:
    """The routed tree end to end (OUT/tree.csv): against the parent's flat accuracy, and where images
    went and were rejected."""
    rules = ", ".join(f"{name} T={num(r['temperature'], 3)} threshold {num(r['threshold'])} ({r['from']})"
                      for name, r in tree["rules"].items())
    return [("h2", "The routed tree, end to end"),
            ("p", "Each image goes down the tree to the child with the most probability mass and is rejected at "
                  "the first node where that mass, or the final class probability, is below the node's threshold: "
                  "a branch's acceptance rule, and for the parent its [parent.accept] rule or its recipe's "
                  f"threshold. Rules: {rules}."),
            ("table", ["figure", "value"],
             [["accuracy at full coverage", pct(tree["test_accuracy"]) + interval(tree.get("test_accuracy_ci"))],
              ["parent's flat accuracy, same images", pct(tree["parent_accuracy"]) +
               interval(tree.get("parent_accuracy_ci"))],
              ["only the tree right / only the parent right", f"{tree['tree_only_correct']} / "
                                                                f"{tree['parent_only_correct']}"],
              ["exact McNemar p", num(tree["mcnemar_p"], 3)],
              ["coverage", pct(tree.get("coverage")) + interval(tree.get("coverage_ci"))],
              ["accuracy on accepted", pct(tree.get("accepted_accuracy")) + interval(tree.get("accepted_accuracy_ci"))],
              ["reached", ", ".join(f"{k} {v}" for k, v in tree["reached"].items())],
              ["rejected at", ", ".join(f"{k} {v}" for k, v in tree["rejected_at"].items())]])]


def cascade_section(out: Path, m: dict, run: str) -> list[tuple]:
    """The early exits (branching.tree.cascade): the setting chosen, against the full trunk and each exit alone on
    the test split, and the accuracy-cost curve of every setting tried."""
    rows = [[name, pct(p["accuracy"]) + interval(p.get("accuracy_ci")), num(p["mflops"], 1),
             pct(p["mflops"] / m["full_trunk"]["mflops"]), pct(p["coverage"]), pct(p["risk"]),
             ", ".join(pct(s) for s in p["exits"])]
            for name, p in [("cascade" + ("" if m["attained"] else " (not met)"), m["cascade"]),
                            ("full trunk", m["full_trunk"]),
                            *[(f"{n} alone" + ("" if p.get("attained", True) else " (not met)"), p)
                              for n, p in m["single_exit"].items()]]]
    chosen = (f"threshold {num(m['threshold'], 4)}" if m["threshold"] is not None else "no exit answers") + (
        f", risk bound {num(m['bound'], 4)}" if m.get("bound") is not None else "")
    figure = plots.cascade_curve(m["calibration_curve"], m["test_curve"], m["threshold"],
                                 f"exits {', '.join(m['exits'])}: accuracy against cost ({run})",
                                 out / "plots" / "cascade.png")
    return [("h2", "Early exits"),
            ("p", f"An input is answered at the first exit whose calibrated confidence reaches the threshold (and "
                  f"whose branches below accept it, where it has some); the others go on through the trunk to the "
                  f"tree. Asked: {m['rule']}; fitted on "
                  f"{m['calibration_samples']} calibration inputs held out of every node: {chosen}"
                  + ("." if m["attained"] else f"; not met: {m['reason']}.")),
            ("table", ["", "accuracy", "MFLOPs an input", "of the full trunk", "coverage", "error on answered",
                       f"answered at {', '.join(m['exits'])}"], rows),
            ("img", str(figure.relative_to(out)), figure.stem)]


SCORE_LABELS = {"msp_1": "max softmax, T = 1", "msp_t": "max softmax, fitted T", "doctor": "DOCTOR",
                "energy": "energy", "margin": "logit margin", "selfeval": "self-evaluation branch",
                "oracle": "oracle"}


def scores_section(metrics: dict, names: list[str]) -> list[tuple]:
    """Every confidence score of every node on the test split (runs written before it have none)."""
    rows = []
    for name in names:
        m = node_metrics(metrics, name)
        chosen = (m.get("acceptance") or {}).get("score", "msp")
        for key, s in (m.get("confidence_scores") or {}).items():
            used = " (accepts by it)" if key == {"msp": "msp_t"}.get(chosen, chosen) and "acceptance" in m else ""
            rows.append([name, SCORE_LABELS.get(key, key) + used, num(s["aurc"]), num(s["eaurc"]), num(s["auroc"], 3),
                         num(s["fpr95"], 3)])
    if not rows:
        return []
    return [("h2", "Confidence scores: right against wrong answers on the test split"),
            ("p", "The same answers ranked by each score (AURC, E-AURC, FPR at 95% TPR: lower is better; AUROC "
                  "of right against wrong answers: higher is better). One seed: see `branching selfeval` for "
                  "intervals over seeds and test images."),
            ("table", ["node", "score", "AURC", "E-AURC", "AUROC", "FPR at 95% TPR"], rows)]


def node_section(out: Path, metrics: dict, name: str, classes: dict, run: str) -> list[tuple]:
    m = node_metrics(metrics, name)
    data = columns(read_predictions(out / "predictions" / f"{name}.csv"))
    figures = []
    history = Model.load(out / "models" / f"{name}.pt").meta.history
    if history and history.get("loss"):
        figures.append(plots.training_curves(history, f"{name}: training curves ({run})",
                                             out / "plots" / f"training-{name}.png"))
    curves = [{"confidence": data["confidence"], "correct": data["correct"], "colour": plots.BRANCH_COLOUR,
               "label": f"{name} (temperature {num(m.get('temperature', 1), 2)})"
                        + (f", score {m['acceptance']['score']}" if "score" in (m.get("acceptance") or {}) else "")}]
    if "parent_confidence" in data:
        curves.append({"confidence": data["parent_confidence"], "correct": data["parent_correct"],
                       "colour": plots.PARENT_COLOUR, "style": "--",
                       "label": "parent's own head on these classes"})
    rule = m.get("acceptance")
    points = [] if rule is None else [{"coverage": m.get("coverage"), "risk": m.get("selective_risk"),
                                       "label": operating_label(rule)}]
    target = rule["asked"]["risk"] if rule and rule.get("rule") == "risk" else None
    figures.append(plots.risk_coverage(curves, f"{name}: risk-coverage on {m['test_samples']} test images ({run})",
                                       out / "plots" / f"risk-coverage-{name}.png", points, target))
    score = (rule or {}).get("score", "msp")
    if score in PROBABILITY_SCORES:  # energy, margin and DOCTOR are not probabilities: no reliability diagram
        figures.append(plots.reliability(data["raw_confidence"], data["confidence"], data["correct"],
                                         m.get("temperature", 1.0), f"{name}: reliability on the test split",
                                         out / "plots" / f"reliability-{name}.png"))
    figures.append(plots.confusion(m["confusion_matrix"], classes[name], f"{name}: confusion matrix (test)",
                                   out / "plots" / f"confusion-{name}.png"))
    per_class = [[c, num(s["precision"], 3), num(s["recall"], 3), num(s["f1"], 3), str(s["support"])]
                 for c, s in m.get("per_class", {}).items()]
    blocks = [("h2", f"{name}: {', '.join(classes[name])}"),
              ("table", ["class", "precision", "recall", "F1", "test images"], per_class)]
    blocks += [("img", str(f.relative_to(out)), f.stem) for f in figures]
    return blocks


# ---- several seeds -----------------------------------------------------------------------------

SEEDS_TABLE = (("accuracy", "test_accuracy"), ("coverage", "coverage"), ("accepted accuracy", "accepted_accuracy"),
               ("selective risk", "selective_risk"), ("AURC", "aurc"), ("E-AURC", "eaurc"), ("ECE raw", "ece_raw"),
               ("ECE calibrated", "ece"), ("threshold", "acceptance.threshold"), ("temperature", "temperature"),
               ("parent head accuracy", "parent_head.test_accuracy"), ("parent head AURC", "parent_head.aurc"))


def write_seeds_report(out_dir) -> Path:
    """OUT/report.md + .html for a multi-seed run: mean ± std table, the seeds' risk-coverage curves."""
    from branching.reports.seeds import PERCENT, format_figure

    out = Path(out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    seeds, rules = metrics["seeds"], metrics.get("rules", {})
    title = f"Neural Branching, recipe {metrics['recipe']}, seeds {', '.join(map(str, seeds))}"
    nodes = [("parent", metrics["parent"]), *metrics["branches"].items()]
    blocks: list[tuple] = [
        ("h1", title),
        ("p", f"Config {metrics['config'].get('path')}, data {metrics['data']['dir']}. Mean ± sample standard "
              f"deviation over {len(seeds)} seeds, on the test split. Each seed's own report: "
              + ", ".join(f"seed-{s}/report.md" for s in seeds) + "."),
        ("table", ["node", "rule", *(label for label, _ in SEEDS_TABLE)],
         [[name, rules.get(name, "accept all"),
           *(format_figure(node.get(key), key in PERCENT) for _, key in SEEDS_TABLE)]
          for name, node in nodes]),
        ("p", NOTE)]
    tree = metrics.get("tree")
    if tree:
        blocks += [("h2", "The routed tree, end to end"),
                   ("table", ["accuracy", "parent's flat accuracy", "coverage", "accepted accuracy", "McNemar p"],
                    [[format_figure(tree.get("test_accuracy"), True), format_figure(tree.get("parent_accuracy"), True),
                      format_figure(tree.get("coverage"), True), format_figure(tree.get("accepted_accuracy"), True),
                      format_figure(tree.get("mcnemar_p"), False)]])]
    for name in metrics["branches"]:
        curves, points = [], []
        for seed, colour in zip(seeds, plots.SEED_COLOURS * 4):
            run = json.loads((out / f"seed-{seed}" / "metrics.json").read_text())["branches"][name]
            data = columns(read_predictions(out / f"seed-{seed}" / "predictions" / f"{name}.csv"))
            curves.append({"confidence": data["confidence"], "correct": data["correct"], "colour": colour,
                           "label": f"seed {seed}: {name}"})
            if "parent_confidence" in data:
                curves.append({"confidence": data["parent_confidence"], "correct": data["parent_correct"],
                               "colour": colour, "style": "--", "width": 1.0,
                               "label": f"seed {seed}: parent's own head"})
            threshold = num(run["acceptance"]["threshold"], 3)
            points.append({"coverage": run.get("coverage"), "risk": run.get("selective_risk"), "colour": colour,
                           "label": f"seed {seed}: operating point (threshold {threshold})"})
        path = plots.risk_coverage(curves, f"{name}: risk-coverage on the test split, recipe {metrics['recipe']}\n"
                                           f"(solid: branch, dashed: parent's own head on the same classes)",
                                   out / "plots" / f"risk-coverage-{name}.png", points)
        blocks += [("h2", f"{name}: risk-coverage over seeds ({rules.get(name, '')})"),
                   ("img", str(path.relative_to(out)), path.stem)]
    return write_documents(out, blocks, title, metrics["config"]["parent"].get("kind"))
