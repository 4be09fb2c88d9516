"""The files of `branching selfeval`: selfeval.json, selfeval.md (tables and verdicts) and selfeval.png
(risk-coverage curves of every score, one panel per node)."""

from __future__ import annotations

from pathlib import Path

from branching.fileio import study_files, write_files
from branching.models.kinds import reads_of
from branching.tables import MARKDOWN, in_texts, mean_std, num, table

BASELINE = "msp_t"
HEADER = ("score", "AURC", "Δ AURC [95% seeds] [95% images]", "E-AURC", "AUROC", "Δ AUROC [95% seeds] [95% images]",
          "FPR at 95% TPR", "Δ FPR95 [95% seeds]")


def _delta(d: dict | None, digits: int = 4) -> str:
    if d is None:
        return "(baseline)"
    if d["mean"] is None:
        return "n/a"
    text = f"{d['mean']:+.{digits}f}"
    for key in ("ci95_seeds", "ci95_images"):
        ci = d.get(key)
        if ci is not None:
            text += f" [{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]"
    return text


def verdict(rows: dict, key: str) -> str:
    """Whether score `key` ranks better (lower AURC) than max softmax at the fitted temperature: only when
    the paired interval over the test images excludes 0."""
    d = rows[key].get("delta_aurc")
    ci = (d or {}).get("ci95_images") or (d or {}).get("ci95_seeds")
    if d is None or d["mean"] is None or ci is None:
        return "not measured"
    if ci[1] < 0:
        return "beats max softmax"
    if ci[0] > 0:
        return "loses to max softmax"
    return "no difference shown"


def every_tap(rows: dict) -> str:
    """The judge reading every tap (the one tap where the source has one): named before any result is seen,
    as is the logits-only judge, so that no verdict picks the variant that did best on the test images."""
    return "selfeval_all" if "selfeval_all" in rows else "selfeval_0"


def node_table(rows: dict) -> list[str]:
    cells = []
    for key, row in rows.items():
        if key.startswith("_"):
            continue
        baseline = key in (BASELINE, "oracle")
        cells.append([row["label"], mean_std(row["aurc"], digits=4), "(baseline)" if key == BASELINE else
                      "-" if baseline else _delta(row["delta_aurc"]), mean_std(row["eaurc"], digits=4),
                      mean_std(row["auroc"], digits=3), "(baseline)" if key == BASELINE else
                      "-" if baseline else _delta(row["delta_auroc"], 3), mean_std(row["fpr95"], digits=3),
                      "(baseline)" if key == BASELINE else "-" if baseline else _delta(row["delta_fpr95"], 3)])
    return table(HEADER, cells, MARKDOWN).splitlines()


def render_markdown(result: dict) -> str:
    setup, summary = result["setup"], result["summary"]
    lines = [f"# Which score tells right answers from wrong ones? `selfeval` on {setup['data']}", "",
             f"Command: `{setup['command']}`  ", f"Config: `{setup['config']}` ({setup['parent_kind']} parent); "
             f"seeds {setup['seeds']}; recipe {setup['recipe']}"
             + (f", at most {setup['max_epochs']} epochs" if setup["max_epochs"] else "")
             + f"; {num(result['timings']['total_s'] / 60, 1)} min on {setup['machine']}.", "",
             "## Verdicts against max softmax at the fitted temperature", "",
             "| node | accuracy % | self-evaluation on the logits only | self-evaluation on every tap | "
             "energy | DOCTOR | margin |", "|---|---|---|---|---|---|---|"]
    for name, rows in summary.items():
        node = rows["_node"]
        lines.append(f"| {name} | {mean_std(node['accuracy'], scale=100, digits=1)} | "
                     + " | ".join(verdict(rows, key) for key in ("selfeval_logits", every_tap(rows), "energy", "doctor",
                                                                  "margin")) + " |")
    lines += ["", "Each verdict is one fixed score against max softmax: no variant is picked on these test images "
              "(the tables below show every judge).", ""]
    for name, rows in summary.items():
        lines += [f"## {name}", "", f"{rows['_node']['test_samples']} test images; accuracy "
                  f"{mean_std(rows['_node']['accuracy'], scale=100, digits=1, unit='%')}.", ""]
        lines += node_table(rows) + [""]
    lines += ["## How to read this", ""] + [f"- {d}" for d in DEFINITIONS]
    return "\n".join(lines) + "\n"


DEFINITIONS = (
    "Every score ranks the same answers of the same node on the same test images; only the ranking differs. "
    "AURC: area under the risk-coverage curve (lower is better); E-AURC: minus that of a perfect ranking; "
    "AUROC: of right (positive) against wrong answers (higher is better); FPR at 95% TPR: the share of wrong "
    "answers accepted when 95% of the right ones are (lower is better).",
    "Δ: the score minus max softmax at the node's fitted temperature, mean over seeds, with a 95% t interval "
    "over the seeds' differences and, for AURC and AUROC, a 95% paired bootstrap interval over the test "
    "images (the same resampled images for both scores and every seed). A verdict is 'beats' or 'loses' "
    "only when the images' interval of Δ AURC excludes 0.",
    "Self-evaluation: a small MLP on the named taps of what the node reads plus the node's logits, trained on "
    "cross-fitted correctness labels of the node's training images (docs/selfeval.md); 'logits only' reads "
    "no tap. The oracle is the correctness itself: the floor of AURC (E-AURC 0).",
)


# ---- selfeval.png -------------------------------------------------------------------------------

def render_plot(result: dict) -> bytes:
    """Selective risk against coverage, mean over seeds, every score, one panel per node."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from branching.reports.plots import png_bytes

    summary = result["summary"]
    fig, axes = plt.subplots(1, len(summary), figsize=(5.6 * len(summary), 4.8), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (name, rows) in zip(axes[0], summary.items()):
        for i, (key, row) in enumerate((k, r) for k, r in rows.items() if not k.startswith("_")):
            style = {"color": "black", "linestyle": ":"} if key == "oracle" else {
                "color": colors(i % 10), "linestyle": "-" if key.startswith("selfeval") else "--",
                "linewidth": 2.2 if key == BASELINE else 1.3}
            risk = [100 * r if r is not None else float("nan") for r in row["risk_at_coverage"]]
            ax.plot([100 * c for c in result["setup"]["coverage_grid"]], risk, label=row["label"], **style)
        ax.set_xlabel("coverage (%)")
        ax.set_ylabel("selective risk (%)")
        ax.set_title(f"{name} (mean over seeds {result['setup']['seeds']})", fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.03 * ((len(labels) - 1) // 4), 1, 1))
    return png_bytes(fig)


def write_outputs(out_dir, result: dict) -> list[Path]:
    """Render everything first, then write selfeval.json, selfeval.md and selfeval.png atomically."""
    markdown = in_texts(render_markdown(result), reads_of(result["setup"].get("parent_kind")))
    return write_files(out_dir, study_files("selfeval", result, markdown, render_plot(result)))
