"""Summaries of `compare` over seeds, and its files: compare.json, compare.md and compare.png."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from branching.acceptance.stats import BOOTSTRAP, bootstrap_interval, sample_summary, t_interval, wilson_interval
from branching.fileio import study_files, write_files
from branching.reports.kshot import kshot_markdown, render_kshot_plot
from branching.models.kinds import reads_of
from branching.tables import MARKDOWN, in_texts, interval, mean_std, num, pct, table

SEED_FIGURES = ("test_accuracy", "coverage", "accepted_accuracy", "aurc", "train_s", "total_train_s")


def paired_delta(correct: list[np.ndarray], baseline: list[np.ndarray], n_boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Accuracy of a method minus a baseline's on the same test images, averaged over seeds, with a 95%
    percentile bootstrap interval over the images (the images are the main source of uncertainty)."""
    d = np.mean(np.asarray(correct, dtype=np.float64), axis=0) - np.mean(np.asarray(baseline, dtype=np.float64), axis=0)
    return {"mean": float(d.mean()), "ci95": bootstrap_interval(d, 0.95, n_boot, seed)}


def baseline_method(methods) -> str:
    """What a branch's methods are measured against: the parent's restricted head, or where the parent has
    no head for the branch's classes (new classes), the linear probe on the branch's tap."""
    return "parent_head" if "parent_head" in methods else "linear_probe"


def summarise(seed_results: list[dict]) -> dict:
    """Per branch and method: mean, std and intervals of every figure over the seeds."""
    first = seed_results[0]
    out = {"parent": {k: sample_summary([r["parent"][k] for r in seed_results]) for k in first["parent"]},
           "branches": {}}
    for name, methods in first["branches"].items():
        base = baseline_method(methods)
        baseline = [r["branches"][name][base]["correct"] for r in seed_results]
        rows = out["branches"][name] = {}
        for key in methods:
            runs = [r["branches"][name][key] for r in seed_results]
            row = {"label": runs[0]["label"], "trainable_parameters": runs[0]["trainable_parameters"],
                   "inference_flops": runs[0]["inference_flops"], "test_samples": runs[0]["test_samples"]}
            for figure in SEED_FIGURES:
                row[figure] = sample_summary([run[figure] for run in runs])
            accuracy = row["test_accuracy"]
            accuracy["ci95_seeds"] = t_interval(accuracy["values"])
            n = row["test_samples"]
            accuracy["ci95_test"] = wilson_interval(int(round(accuracy["mean"] * n)), n)
            row[f"delta_vs_{base}"] = paired_delta([run["correct"] for run in runs], baseline)
            row["per_seed"] = [{k: v for k, v in run.items() if k not in ("correct", "label")} for run in runs]
            rows[key] = row
    return out


# ---- compare.md -------------------------------------------------------------------------------

def _seconds(s: dict) -> str:
    return num(s["mean"], 1 if s["mean"] is not None and s["mean"] >= 1 else 2)


HEADER = ("method", "test accuracy % (mean ± std)", "95% interval % (test images)", "Δ vs baseline, points [95%]",
          "accepted accuracy %", "coverage %", "AURC", "trainable parameters", "training s (own)",
          "training s (with parent)", "inference MFLOPs/image")


def branch_table(rows: dict) -> list[str]:
    cells = []
    base = baseline_method(rows)
    for key, row in rows.items():
        delta = row[f"delta_vs_{base}"]
        cells.append([
            row["label"], mean_std(row["test_accuracy"], scale=100, digits=1),
            interval(row["test_accuracy"]["ci95_test"], unit="").strip() or "n/a",
            "(baseline)" if key == base else pct(delta["mean"], 1, unit="", sign=True)
            + interval(delta["ci95"], unit="", sign=True),
            mean_std(row["accepted_accuracy"], scale=100, digits=1), mean_std(row["coverage"], scale=100, digits=1),
            mean_std(row["aurc"], digits=3), f"{row['trainable_parameters']:,}",
            _seconds(row["train_s"]), _seconds(row["total_train_s"]), num(row["inference_flops"] / 1e6, 3)])
    return table(HEADER, cells, MARKDOWN).splitlines()


def _timing(t: dict) -> str:
    text = f"{num(t['total_s'] / 60, 1)} min wall-clock"
    if "cpu_s" in t:
        text += (f" ({num(t['cpu_s'] / 60, 1)} min of CPU; load average {num(t['load_average_start'], 1)} at the "
                 f"start, {num(t['load_average_end'], 1)} at the end)")
    return text


def render_markdown(result: dict) -> str:
    s, setup = result["summary"], result["setup"]
    parent = s["parent"]
    lines = [f"# Does branching pay? `compare` on {setup['data']}", "",
             f"Command: `{setup['command']}`  ", f"Config: `{setup['config']}`; seeds {setup['seeds']}; "
             f"total time {_timing(result['timings'])} on {setup['machine']}.", ""]
    if parent is not None:
        lines += [f"Parent (default recipe, trained once per seed and shared by every method that needs it): "
                  f"{mean_std(parent['test_accuracy'], scale=100, digits=1, unit='%')} test accuracy on its "
                  f"{len(setup['parent_classes'])} classes, {_seconds(parent['train_s'])} s to train.", ""]
    if result["notes"]:
        lines += ["## What differs from the original study", ""] + [f"- {note}" for note in result["notes"]] + [""]
    for name, rows in s["branches"].items():
        info = setup["branches"][name]
        new = [c for c in info["classes"] if c not in setup["parent_classes"]]
        lines += [f"## {name}", "", f"Classes {', '.join(info['classes'])}; the branch reads {info['source']} "
                  f"{info.get('tap') or 'layer ' + str(info['layer'])} ({info['where'] or info.get('pool') or 'default pooling'}); "
                  f"{info['test_samples']} test images. Baseline: "
                  + ("the parent's head on the branch's classes." if not new else
                     f"the linear probe ({', '.join(new)} never seen by the parent, whose head cannot answer them)."), ""]
        lines += branch_table(rows) + [""]
    if "kshot" in result:
        lines += kshot_markdown(result["kshot"])
    if "exits" in result:
        lines += exits_markdown(result["exits"], bool(s["branches"]))
    text = reads_of(result.get("setup", {}).get("parent_kind")) == "texts"
    definitions = [TEXT_DEFINITIONS.get(i, d) if text else d for i, d in enumerate(DEFINITIONS)]
    if s["branches"]:
        lines += ["## How to read this", ""] + [f"- {d}" for d in definitions]
    return "\n".join(lines) + "\n"


# the definitions that read otherwise for a text parent, by position in DEFINITIONS
TEXT_DEFINITIONS = {
    4: "Inference MFLOPs/text: 2 per multiply-add of the branch or probe on the encoded text; the transformer's "
       "own forward pass, the same for every method and depending on the text's length, is not counted "
       "(benchmarks/bench_text.py measures it in texts per second).",
    5: "The parent's head on all classes: the parent's own prediction over every class of the tree, wrong "
       "whenever it names a class outside the branch's; it needs no router. Every other row, the branch "
       "included, is told which group the text belongs to.",
}

DEFINITIONS = (
    "Test accuracy: mean ± sample standard deviation over the seeds (training randomness only). The 95% "
    "interval is the Wilson interval of that accuracy over the test images, the larger uncertainty: with "
    "100 test images per class it is about ±5 points.",
    "Δ vs baseline: accuracy minus that of the parent's own head restricted to the branch's classes (for a "
    "branch of new classes, the linear probe's), on the same test images, averaged over seeds, with a 95% bootstrap interval over the images (paired, so "
    "much narrower than the difference of two unpaired intervals). An interval that contains 0 is no "
    "evidence either way.",
    "Accepted accuracy and coverage: under the branch's acceptance rule (max softmax probability after "
    "temperature scaling at least the threshold). Each method's temperature (and any threshold a rule "
    "chooses) is fit on its own validation images, never on the test split; n/a where a method has no "
    "reject option or accepts nothing. AURC: area under the risk-coverage curve (lower is better).",
    "Trainable parameters: what the method itself trains (0 for the parent's head; the parent's are not "
    "counted for methods that reuse it). Training s (own): wall-clock seconds of the method's own "
    "training (fine-tuning includes the branch it starts from); (with parent): plus the parent it needs. "
    "The machine was shared, so times are indicative to about ±30%.",
    "Inference MFLOPs/image: 2 per multiply-add (2 x fan-in x fan-out per Linear layer; convolutions and "
    "attention alike) on the path from the pixels to the prediction (the trunk of the parent included for "
    "branches and probes), as torch counts them; biases, activations and normalisation left out.",
    "The parent's head on all classes: the parent's own prediction over every class of the tree, "
    "wrong whenever it names a class outside the branch's; it needs no router. Every other row, the branch "
    "included, is told which group the image belongs to.",
)


EXIT_HEADER = ("", "accuracy % (mean ± std)", "Δ accuracy vs full trunk, points [95%, seeds]", "MFLOPs an input",
               "share of the full trunk %", "coverage %", "error on what it answers %", "rule met (seeds)",
               "answered at the exits %")


def exits_markdown(e: dict, branches: bool) -> list[str]:
    """compare.md's section on a tree's early exits: the cascade, the full trunk and each exit alone."""
    n = e["test_samples"]
    half = 100 * 1.96 * (0.25 / n) ** 0.5 if n else None
    cells = []
    for key, row in e["rows"].items():
        delta = row["accuracy_vs_full"]
        cells.append([row["label"], mean_std(row["accuracy"], scale=100, digits=1),
                      "(baseline)" if key == "full_trunk" else pct(delta["mean"], 1, unit="", sign=True)
                      + interval(delta["ci95"], unit="", sign=True),
                      mean_std(row["mflops"], digits=1), mean_std(row["share"], scale=100, digits=1),
                      mean_std(row["coverage"], scale=100, digits=1), mean_std(row["risk"], scale=100, digits=1),
                      f"{row['attained']} of {row['seeds']}",
                      ", ".join(f"{100 * x:.0f}" for x in row["exits"]) or "-"])
    return ["## Early exits", "",
            f"Exits {', '.join(e['exits'])}, answering together by the rule {e['rule']}. For each seed the tree is "
            f"trained as `run` trains it: its parent holds out a calibration fifth of its training inputs, on which "
            f"the cascade's threshold is fitted and which no node trains or validates on"
            + (" (so its parent is not the one the branches above are compared on)" if branches else "")
            + ". Accuracy counts every input's answer; coverage and the error are on what the tree answers (an "
            "exit, or the tree below the parent's head by its nodes' rules). Each exit alone is fitted by the same rule. "
            f"{n} test inputs" + (f": a 95% interval of about ±{half:.0f} points on each accuracy; the Δ column "
                                  f"pairs each seed's figure with the full trunk's of the same seed." if n else "."),
            "", *table(EXIT_HEADER, cells, MARKDOWN).splitlines(), ""]


# ---- compare.png -------------------------------------------------------------------------------

MARKERS = "osD^vP*XhpH<>"


def render_plot(result: dict) -> bytes:
    """Accuracy against training cost (with the parent it needs), one marker per method, one panel per branch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from branching.reports.plots import png_bytes

    branches = result["summary"]["branches"]
    keys = list(dict.fromkeys(k for rows in branches.values() for k in rows))
    colors = plt.get_cmap("tab10")
    panels = len(branches) + ("exits" in result)
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 5.2), squeeze=False)
    if "exits" in result:
        exits_panel(axes[0][-1], result["exits"], colors)
    for ax, (name, rows) in zip(axes[0], branches.items()):
        for i, key in enumerate(keys):
            if key not in rows:
                continue
            row = rows[key]
            x, y = row["total_train_s"], row["test_accuracy"]
            ax.errorbar(x["mean"], 100 * y["mean"], yerr=100 * (y["std"] or 0),
                        marker=MARKERS[i % len(MARKERS)], color=colors(i % 10), markersize=8, capsize=3,
                        linestyle="none", label=row["label"])
        parent_s = result["summary"]["parent"]["train_s"]["mean"]
        ax.axvline(parent_s, color="grey", linestyle=":", linewidth=1)
        ax.text(parent_s, ax.get_ylim()[0], " parent alone", color="grey", fontsize=8, va="bottom")
        times = [row["total_train_s"]["mean"] for row in rows.values() if row["total_train_s"]["mean"]]
        scale = "log" if times and max(times) > 10 * min(times) else "linear"  # log only for wide ranges
        if scale == "log":
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"training time incl. the parent it needs (s{', log scale' if scale == 'log' else ''})")
        ax.set_ylabel("test accuracy on the branch's classes (%)")
        ax.set_title(f"{name}: {', '.join(result['setup']['branches'][name]['classes'])}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False)
    fig.suptitle(("Branch vs baselines: test accuracy against mean training time" if branches else "Early exits")
                 + f", mean ± std over seeds {result['setup']['seeds']} (test-set intervals are wider, see compare.md)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 4), 1, 0.95))
    return png_bytes(fig, tight=True)  # a long legend below one branch's panel is wider than the panel


def exits_panel(ax, e: dict, colors) -> None:
    """The cascade, the full trunk and each exit alone: test accuracy against MFLOPs an input."""
    for i, row in enumerate(e["rows"].values()):
        x, y = row["mflops"], row["accuracy"]
        ax.errorbar(x["mean"], 100 * y["mean"], xerr=x["std"] or 0, yerr=100 * (y["std"] or 0),
                    marker=MARKERS[-1 - i % len(MARKERS)], color=colors((9 - i) % 10), markersize=8, capsize=3,
                    linestyle="none", label=row["label"])
    ax.set_xlabel("MFLOPs an input (mean over the test inputs)")
    ax.set_ylabel("test accuracy, every input answered (%)")
    ax.set_title(f"early exits: {e['rule']}", fontsize=10)
    ax.grid(True, alpha=0.3)


# ---- writing -----------------------------------------------------------------------------------

def write_outputs(out_dir, result: dict) -> list[Path]:
    """Render everything first, then write compare.json, compare.md and compare.png atomically."""
    kshot = {"compare-kshot.png": render_kshot_plot(result)} if "kshot" in result else {}
    markdown = in_texts(render_markdown(result), reads_of(result["setup"].get("parent_kind")))
    return write_files(out_dir, study_files("compare", result, markdown, render_plot(result), kshot))
