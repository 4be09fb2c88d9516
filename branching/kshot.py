"""k-shot curves for `compare --kshot`: every method of a branch trained on k images per class, the same k
images for every method (drawn per seed, nested: the 5 are among the 10), evaluated on the whole test split.

The parent is trained once per seed on all its training images, as in the rest of `compare`; only what
the methods of a branch train on is limited. Validation (early stopping, temperatures, thresholds) keeps
the same held-out images at every k, so that the curves differ in training images alone.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .config import TreeConfig
from .errors import ConfigError
from .pipeline import held_out_rows, log
from .stats import sample_summary, t_interval, wilson_interval
from .tables import MARKDOWN, mean_std, table

SKIPPED = ("branch_original", "parent_unrestricted")  # the first is slow, the second trains nothing new
ALL = "all"


def parse_kshot(text: str) -> list[int | None]:
    """"5,10,all" -> [5, 10, None] (None: every training image), sorted, distinct."""
    parts = [p.strip() for p in text.split(",")]
    try:
        ks = sorted({int(p) for p in parts if p != ALL})
    except ValueError:
        ks = [0]
    if not parts or any(not p for p in parts) or (ks and ks[0] < 1):
        raise ConfigError(f"--kshot must list images per class (integers >= 1) and/or 'all', separated by commas, "
                          f"e.g. 5,10,25,50,100,all; got {text!r}")
    return ks + ([None] if ALL in parts else [])


def label(k: int | None) -> str:
    return ALL if k is None else str(k)


def kshot_mask(config: TreeConfig, data, held_out: np.ndarray, seed: int, k: int) -> np.ndarray:
    """Which training rows the methods may use: for every class of a branch, k of its images that no node
    validates on (the first k of a permutation drawn with the seed and the class, so smaller k are subsets
    of larger ones); every other row as it is."""
    keep = np.ones(len(data.train.fine_labels), dtype=bool)
    branch_classes = dict.fromkeys(c for spec in config.branches.values() for c in spec.classes)
    for name in branch_classes:
        rows = np.setdiff1d(data.class_rows(name), held_out)
        order = np.random.default_rng([seed, data.label_names.index(name), 1]).permutation(rows)
        keep[order[k:]] = False
    return keep


def training_images_per_class(data, spec, held_out: np.ndarray) -> int:
    """The fewest training images (validation images left out) any of a branch's classes has under data's limit."""
    _, labels, rows = data.node_rows("train", spec)
    training = ~np.isin(rows, held_out)
    return int(np.bincount(labels[training], minlength=len(spec.classes)).min())


def kshot_seed(ctx, ks: list[int | None], full: dict, plan, score) -> dict:
    """{branch: {method: {k: {"accuracy", "train_s", "images_per_class"}}}} for one seed. `full` holds the
    seed's results of compare on every training image, reused for k = all; plan(ctx, spec) gives the
    (key, method) pairs to run and score(outcome, labels) scores one (compare's)."""
    out: dict = {name: {} for name in full}
    held_out = held_out_rows(ctx.models["parent"])
    for k in ks:
        if k is None:
            data, limited = ctx.data, ctx
        else:
            data = ctx.data.limited(kshot_mask(ctx.config, ctx.data, held_out, ctx.seed, k))
            limited = replace(ctx, data=data, models={"parent": ctx.models["parent"]},
                              original_models={"parent": ctx.models["parent"]}, branch_s={})
        for spec in ctx.config.nodes()[1:]:
            _, labels, _ = data.node_rows("test", spec)
            n = training_images_per_class(data, spec, held_out)
            for key, run_method in plan(limited, spec):
                if key in SKIPPED:
                    continue
                r = full[spec.name][key] if k is None and key in full[spec.name] else score(run_method(limited, spec), labels)
                out[spec.name].setdefault(key, {})[label(k)] = {"accuracy": r["test_accuracy"], "train_s": r["train_s"],
                                                                "images_per_class": n}
                log(f"seed {ctx.seed} {spec.name} k={label(k)} {key}: test accuracy {100 * r['test_accuracy']:.1f}%")
    return out


# ---- over seeds ---------------------------------------------------------------------------------

def summarise_kshot(seed_results: list[dict], ks: list[int | None], test_samples: dict, labels: dict) -> dict:
    """Per branch, method and k: accuracy (mean, std, t interval over seeds, Wilson interval over the test
    images) and training seconds, with every seed's figures."""
    out = {"ks": [label(k) for k in ks], "branches": {}}
    for name in seed_results[0]["kshot"]:
        rows = out["branches"][name] = {}
        for key in seed_results[0]["kshot"][name]:
            row = rows[key] = {"label": labels[name][key], "points": {}}
            for k in map(label, ks):
                runs = [r["kshot"][name][key][k] for r in seed_results]
                accuracy = sample_summary([run["accuracy"] for run in runs])
                accuracy["ci95_seeds"] = t_interval(accuracy["values"])
                n = test_samples[name]
                accuracy["ci95_test"] = wilson_interval(int(round(accuracy["mean"] * n)), n)
                row["points"][k] = {"accuracy": accuracy, "train_s": sample_summary([run["train_s"] for run in runs]),
                                    "images_per_class": min(run["images_per_class"] for run in runs),
                                    "per_seed": runs}
    return out


def kshot_markdown(kshot: dict) -> list[str]:
    lines = ["## k-shot curves", "",
             "Test accuracy % (mean ± std over seeds) of each method trained on k images per class of the branch "
             "(the same images for every method); the parent is trained once per seed on all its images. "
             "Validation keeps its held-out images at every k. With 100 test images per class the 95% interval "
             "of each figure is about ±5 points (compare.json has the intervals); the plot is compare-kshot.png.", ""]
    for name, rows in kshot["branches"].items():
        first = next(iter(rows.values()))["points"]
        header = ["method", *(f"k = {k}" if k != ALL else f"all ({first[k]['images_per_class']})" for k in kshot["ks"])]
        cells = [[row["label"], *(mean_std(row["points"][k]["accuracy"], 100, 1) for k in kshot["ks"])]
                 for row in rows.values()]
        lines += [f"### {name}", "", *table(header, cells, MARKDOWN).splitlines(), ""]
    return lines


def render_kshot_plot(result: dict) -> bytes:
    """Accuracy against images per class (log axis), one line per method, one panel per branch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import png_bytes
    from matplotlib.ticker import FuncFormatter, NullFormatter

    kshot = result["kshot"]
    branches = kshot["branches"]
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(branches), figsize=(6.4 * len(branches), 5.0), squeeze=False)
    for ax, (name, rows) in zip(axes[0], branches.items()):
        for i, (key, row) in enumerate(rows.items()):
            points = [row["points"][k] for k in kshot["ks"]]
            dodge = 1.025 ** (i - (len(rows) - 1) / 2)  # side by side, so that the bars stay readable
            x = [p["images_per_class"] * dodge for p in points]
            y = [100 * p["accuracy"]["mean"] for p in points]
            low = [y_ - 100 * p["accuracy"]["ci95_test"][0] for y_, p in zip(y, points)]
            high = [100 * p["accuracy"]["ci95_test"][1] - y_ for y_, p in zip(y, points)]
            ax.errorbar(x, y, yerr=[low, high], marker="osD^vP*XhpH"[i % 11], color=colors(i % 10), capsize=3,
                        linewidth=1.4, markersize=5, label=row["label"], alpha=0.9)
        ax.set_xscale("log")
        ticks = sorted({p["images_per_class"] for row in rows.values() for p in row["points"].values()})
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training images per class (log scale)")
        ax.set_ylabel("test accuracy on the branch's classes (%)")
        ax.set_title(f"{name}: {', '.join(result['setup']['branches'][name]['classes'])}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    columns = min(len(names), 2 * len(branches))
    fig.legend(handles, names, loc="lower center", ncol=columns, fontsize=9, frameon=False)
    fig.suptitle(f"k-shot: mean over seeds {result['setup']['seeds']}, bars: 95% Wilson interval over the test "
                 f"images", fontsize=11)
    fig.tight_layout(rect=(0, 0.05 + 0.04 * ((len(names) - 1) // columns + 1), 1, 0.95))
    data = png_bytes(fig)
    plt.close(fig)
    return data
