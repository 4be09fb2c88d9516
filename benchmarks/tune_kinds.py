"""Choose a parent kind's default recipe on validation data: the test split is never read.

    python benchmarks/tune_kinds.py --kind cnn --data ../shared/data/cifar100-6 --seeds 0,1,2 \
        --grid "epochs=15,20,30 lr=3e-3" --out runs/tune-cnn

Trains the parent of configs/cifar100-6-<kind>.toml once per candidate and seed, each candidate being
the kind's default recipe (branching/config/recipes.py) with the --grid values replaced, and scores it on the
parent's validation hold-out (15% of its training images, drawn per seed; the parent never trains on
them). The rule, fixed before any run: the candidate with the fewest training epochs (then the least
measured time) among those whose validation accuracy (pooled over seeds) is at most one binomial
standard error below the best candidate's. Epochs, not measured seconds, stand for the cost: on a shared
machine the seconds follow the load more than the recipe. Prints a Markdown table and writes
OUT/tune.json.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from branching.config.parse import load_config
from branching.config.recipes import get_recipe
from branching.data.normalization import Normalizer
from branching.data.tree_data import load_tree_data
from branching.fileio import write_json
from branching.tables import MARKDOWN, table
from branching.train.nodes import train_parent

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"epochs": int, "batch_size": int, "crop": int, "lr": float, "weight_decay": float, "dropout": float,
          "label_smoothing": float}


def parse_grid(text: str) -> list[dict]:
    """ "epochs=15,20 lr=3e-3" -> every combination as a dict of recipe fields."""
    axes = {}
    for item in text.split():
        name, _, values = item.partition("=")
        if name not in FIELDS or not values:
            raise SystemExit(f"--grid: {item!r} is not FIELD=V1,V2 with FIELD one of {', '.join(FIELDS)}")
        axes[name] = [FIELDS[name](float(v)) for v in values.split(",")]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def validation_score(model, meta, data, config) -> tuple[int, int]:
    """(right, total) of the parent on its own validation rows."""
    rows = meta.val_rows
    images, labels, all_rows = data.node_rows("train", config.parent)
    position = {int(r): i for i, r in enumerate(all_rows)}
    idx = np.array([position[int(r)] for r in rows])
    X = Normalizer.from_dict(meta.normalization).transform(images[idx])
    return int((model.predict(X) == labels[idx]).sum()), len(idx)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", required=True, choices=["cnn", "vit"])
    p.add_argument("--data", default="../shared/data/cifar100-6")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--grid", required=True, help='e.g. "epochs=15,20,30 lr=3e-3,5e-3"')
    p.add_argument("--out", default=None, help="folder for tune.json (default runs/tune-<kind>)")
    args = p.parse_args(argv)
    candidates, seeds = parse_grid(args.grid), [int(s) for s in args.seeds.split(",")]
    config = load_config(REPO / f"configs/cifar100-6-{args.kind}.toml")
    data = load_tree_data(config, args.data)
    base = get_recipe("default")
    results = []
    for changes in candidates:
        node = replace(base.parent_for(args.kind), **changes)
        recipe = replace(base, kinds=tuple((k, node if k == args.kind else r) for k, r in base.kinds))
        right = total = 0
        seconds = []
        for seed in seeds:
            model, meta, _ = train_parent(config, data, recipe, seed, progress=False)
            r, n = validation_score(model, meta, data, config)
            right, total = right + r, total + n
            seconds.append(meta.history["seconds"])
            print(f"  {changes} seed {seed}: validation {r / n:.2%}, {seconds[-1]:.0f} s", file=sys.stderr, flush=True)
        results.append({"changes": changes, "epochs": node.epochs, "right": right, "total": total,
                        "accuracy": right / total, "seconds": float(np.mean(seconds))})
    best = max(results, key=lambda r: r["accuracy"])
    floor = best["accuracy"] - math.sqrt(best["accuracy"] * (1 - best["accuracy"]) / best["total"])
    chosen = min((r for r in results if r["accuracy"] >= floor), key=lambda r: (r["epochs"], r["seconds"]))
    rows = [[" ".join(f"{k}={v}" for k, v in r["changes"].items()), f"{100 * r['accuracy']:.2f}",
             f"{r['seconds']:.0f}", "chosen" if r is chosen else ""] for r in results]
    print(f"\n{args.kind}, seeds {seeds}, data {args.data}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"validation images pooled over seeds: {best['total']}; floor {100 * floor:.2f}%")
    print(table(["candidate", "validation accuracy %", "parent training s", ""], rows, MARKDOWN))
    write_json(Path(args.out or f"runs/tune-{args.kind}") / "tune.json",
               {"kind": args.kind, "seeds": seeds, "grid": args.grid, "results": results, "floor": floor,
                "chosen": chosen["changes"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
