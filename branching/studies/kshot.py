"""k-shot curves for `compare --kshot`: every method of a branch trained on k images per class, the same k
images for every method (drawn per seed, nested: the 5 are among the 10), evaluated on the whole test split.

The parent is trained once per seed on all its training images, as in the rest of `compare`; only what
the methods of a branch train on is limited. Validation (early stopping, temperatures, thresholds) keeps
the same held-out images at every k, so that the curves differ in training images alone.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from branching.acceptance.stats import sample_summary, t_interval, wilson_interval
from branching.config.tree import TreeConfig
from branching.console import log
from branching.errors import ConfigError
from branching.reports.kshot import ALL, label
from branching.train.nodes import held_out_rows

SKIPPED = ("branch_original", "parent_unrestricted")  # the first is slow, the second trains nothing new


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
