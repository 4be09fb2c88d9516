"""`compare` on a tree with early exits: for each seed the tree is trained as `run` trains it (its exits' cascade
fitted on the parent's calibration rows, branching.train.exits) and measured on the test split beside the full trunk
(no exit answers) and each exit alone (fitted by the same rule); the figures are summarised over the seeds, with the
cascade's difference from the full trunk paired by seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from branching.acceptance.stats import sample_summary, t_interval
from branching.config.tree import TreeConfig
from branching.console import log

FIGURES = ("accuracy", "mflops", "share", "coverage", "risk")


def exits_seed(config: TreeConfig, data_dir, work, seed: int, recipe, download: bool, progress: bool, device) -> dict:
    """Train the tree with its exits for one seed (into `work`, a scratch folder) and return its cascade's test
    figures: {"rule", "rows": {key: {label, attained, accuracy, mflops, share, coverage, risk, exits}}}."""
    from branching.train.run import run
    echo = log if progress else (lambda *_: None)
    metrics = run(config, data_dir, Path(work) / f"seed-{seed}", recipe, seed, download=download, progress=progress,
                  echo=echo, report=False, device=device, cache_dir=Path(work) / "exit-features")
    m = metrics["cascade"]
    full = m["full_trunk"]["mflops"]

    def row(label: str, point: dict, attained: bool) -> dict:
        return {"label": label, "attained": attained, "share": point["mflops"] / full if full else None,
                "exits": point["exits"], "threshold": point["threshold"],
                **{k: point[k] for k in FIGURES if k != "share"}}

    rows = {"cascade": row(f"cascade ({', '.join(m['exits'])})", m["cascade"], m["attained"]),
            "full_trunk": row("full trunk (no exit answers)", m["full_trunk"], True)}
    for name, alone in m["single_exit"].items():
        rows[name] = row(f"{name} alone", alone, alone["attained"])
    return {"rule": m["rule"], "exits": m["exits"], "test_samples": metrics["tree"]["test_samples"], "rows": rows}


def summarise_exits(seeds: list[dict]) -> dict:
    """Per row (the cascade, the full trunk, each exit alone): mean, std and values of every figure over the seeds,
    how many seeds met the rule, and each row's accuracy and cost minus the full trunk's, paired by seed (mean and a
    95% Student-t interval over the seeds)."""
    first = seeds[0]
    full = [s["rows"]["full_trunk"] for s in seeds]
    rows = {}
    for key, head in first["rows"].items():
        runs = [s["rows"][key] for s in seeds]
        row = {"label": head["label"], "attained": sum(r["attained"] for r in runs), "seeds": len(runs),
               **{f: sample_summary([r[f] for r in runs]) for f in FIGURES},
               "exits": [float(np.mean([r["exits"][j] for r in runs])) for j in range(len(head["exits"]))]}
        for figure in ("accuracy", "mflops"):
            d = [r[figure] - f[figure] for r, f in zip(runs, full)]
            row[f"{figure}_vs_full"] = {"mean": float(np.mean(d)), "ci95": t_interval(d), "values": d}
        rows[key] = row
    return {"rule": first["rule"], "exits": first["exits"], "test_samples": first["test_samples"], "rows": rows}
