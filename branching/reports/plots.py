"""PNG figures of a run: training curves, risk-coverage curves, reliability diagrams, confusion matrices.

Uses matplotlib's object-oriented API with the Agg canvas (headless, no global pyplot state).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from branching.acceptance import calibration, selective
from branching.fileio import write_bytes
from branching.tables import num, pct

DPI = 110
BRANCH_COLOUR, PARENT_COLOUR = "#1f77b4", "#d62728"
SEED_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")


def png_bytes(fig, tight: bool = False) -> bytes:
    """A figure as PNG bytes, for fileio's writers (`tight`: grown or cut to what it draws, legends and titles
    past the axes kept whole); the figure is closed."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png", bbox_inches="tight" if tight else None)
    if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot, which keeps it until closed
        import matplotlib.pyplot as plt
        plt.close(fig)
    return buffer.getvalue()


def _save(fig: Figure, path: Path) -> Path:
    write_bytes(path, png_bytes(fig))
    return path


def training_curves(history: dict, title: str, path: Path) -> Path:
    """Loss and accuracy per epoch, training and validation, with the restored (best) epoch marked."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "accuracy"), ("cross-entropy loss", "accuracy (%)")):
        scale = 100 if key == "accuracy" else 1
        ax.plot(epochs, scale * np.asarray(history[key]), color=BRANCH_COLOUR,
                label="training (train mode: with dropout and any augmentation)")
        if history.get(f"val_{key}"):
            ax.plot(epochs, scale * np.asarray(history[f"val_{key}"]), label="validation (eval mode)",
                    color=PARENT_COLOUR)
            best = history.get("best_epoch")
            if best:
                ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"restored weights (epoch {best})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _pct_axes(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 100)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def risk_coverage(curves: list[dict], title: str, path: Path, operating_points: list[dict] = (),
                  target_risk: float | None = None) -> Path:
    """Selective risk against coverage; curves are {"confidence", "correct", "label", "colour", "style"},
    operating points {"coverage", "risk", "label", "colour"}."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    highest = 0.0
    for c in curves:
        coverage, risk, _ = selective.risk_coverage_curve(c["confidence"], c["correct"])
        highest = max(highest, float(risk.max(initial=0)))
        value = selective.aurc(c["confidence"], c["correct"])
        label = c["label"] + ("" if value is None else f" (AURC {num(value)})")
        ax.step(100 * coverage, 100 * risk, where="post", color=c.get("colour"), linestyle=c.get("style", "-"),
                linewidth=c.get("width", 1.6), label=label)
    if target_risk is not None:
        ax.axhline(100 * target_risk, color="black", linestyle=":", linewidth=1,
                   label=f"target risk {100 * target_risk:g}%")
    for point in operating_points:
        if point.get("coverage") is not None:
            ax.plot(100 * point["coverage"], 100 * (point.get("risk") or 0), marker="o", markersize=9,
                    markerfacecolor="none", markeredgewidth=2, color=point.get("colour", "black"),
                    linestyle="none", label=point["label"])
    _pct_axes(ax, "coverage (% of test images accepted)", "selective risk (% errors among accepted)")
    ax.set_ylim(0, 100 * max(highest, target_risk or 0) * (1.25 + 0.06 * len(ax.get_legend_handles_labels()[0])))
    ax.legend(fontsize=8, loc="upper left")  # the headroom above keeps it off the curves
    ax.set_title(title)
    return _save(fig, path)


def reliability(raw_confidence, confidence, correct, temperature: float, title: str, path: Path) -> Path:
    """Reliability diagrams (15 equal-width bins) before and after temperature scaling."""
    fig = Figure(figsize=(10, 4.4), layout="constrained")
    for ax, conf, name in zip(fig.subplots(1, 2, sharey=True), (raw_confidence, confidence),
                              ("before: temperature 1", f"after: temperature {num(temperature, 3)}")):
        bins = calibration.reliability_bins(conf, correct)
        edges = np.asarray(bins["edges"])
        width = edges[1] - edges[0]
        filled = [i for i, n in enumerate(bins["count"]) if n]
        acc = np.array([bins["accuracy"][i] for i in filled])
        mean_conf = np.array([bins["confidence"][i] for i in filled])
        left = edges[filled]
        ax.bar(100 * left, 100 * acc, width=100 * width, align="edge", color=BRANCH_COLOUR, edgecolor="white",
               label="accuracy in bin")
        ax.bar(100 * left, 100 * (mean_conf - acc), bottom=100 * acc, width=100 * width, align="edge",
               color="none", edgecolor=PARENT_COLOUR, hatch="///", linewidth=1,
               label="gap to mean confidence in bin")
        ax.plot([0, 100], [0, 100], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for x, top, n in zip(left, np.maximum(acc, mean_conf), (bins["count"][i] for i in filled)):
            ax.text(100 * (x + width / 2), 100 * top + 1, str(n), ha="center", va="bottom", fontsize=7)
        value = calibration.ece(conf, correct)
        ax.set_title(f"{name} (ECE {pct(value)})" if value is not None else name, fontsize=10)
        _pct_axes(ax, "confidence: max softmax probability (%)", "accuracy (%)")
        ax.set_ylim(0, 108)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{title} (number above each bar: test images in that bin)")
    return _save(fig, path)


def confusion(matrix, classes, title: str, path: Path) -> Path:
    """Confusion matrix with counts; rows are the true class, columns the predicted one."""
    matrix = np.asarray(matrix)
    size = 2.2 + 0.75 * len(classes)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, label="test images", shrink=0.8)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=classes, rotation=35, ha="right")
    ax.set_yticks(ticks, labels=classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    high = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=9,
                    color="white" if matrix[i, j] > high else "black")
    ax.set_title(title)
    return _save(fig, path)


def cascade_curve(calibration: list[dict], test: list[dict], chosen: float | None, title: str, path: Path) -> Path:
    """Accuracy (every input's answer) against mean MFLOPs an input, for every threshold the cascade tried, on the
    calibration inputs (where it was chosen) and on the test split; the full trunk and the chosen setting marked."""
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for points, label, colour in ((calibration, "calibration (where it was chosen)", PARENT_COLOUR),
                                  (test, "test", BRANCH_COLOUR)):
        ax.plot([p["mflops"] for p in points], [100 * p["accuracy"] for p in points], marker=".", color=colour,
                label=label)
        full = next(p for p in points if p["threshold"] is None)
        ax.plot(full["mflops"], 100 * full["accuracy"], marker="s", markersize=9, markerfacecolor="none",
                color=colour, linestyle="none", label=f"full trunk ({label.split(' ')[0]})")
        picked = next((p for p in points if p["threshold"] == chosen), None)
        if picked is not None and chosen is not None:
            ax.plot(picked["mflops"], 100 * picked["accuracy"], marker="o", markersize=11, markerfacecolor="none",
                    markeredgewidth=2, color=colour, linestyle="none",
                    label=f"chosen: threshold {chosen:.4f} ({label.split(' ')[0]})")
    ax.set_xlabel("mean MFLOPs an input")
    ax.set_ylabel("accuracy (% of inputs, every answer counted)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)
