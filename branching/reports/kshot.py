"""The k-shot curves of compare: a markdown table and a plot (accuracy against images per class)."""

from __future__ import annotations

from branching.tables import MARKDOWN, mean_std, table

ALL = "all"  # k = all: every training image of the class


def label(k: int | None) -> str:
    return ALL if k is None else str(k)


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
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from branching.reports.plots import png_bytes

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
    return png_bytes(fig)
