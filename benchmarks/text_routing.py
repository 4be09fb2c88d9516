"""A tree on one frozen transformer against one flat branch: does routing by source help?

    python -m branching.data.movie_reviews runs/movies --source both --labels source --per-class 1000
    python benchmarks/text_routing.py --data runs/movies --seeds 0,1,2 --out runs/text-routing

Two trees over the same texts, the same parent (all-MiniLM-L6-v2, frozen, its 4-class head on the sentence
embedding) and the same tap (layer3, mean): configs/movies-by-source.toml routes each text by the parent's
head to a sentiment branch of its source (IMDB or Rotten Tomatoes); configs/movies-flat.toml has one branch
over all four classes. For each seed both run (`branching run`), and this prints the routed tree's test
accuracy, the flat branch's and the parent head's, with the paired difference of tree and flat branch over
the same test texts (mean over seeds; a 95% bootstrap interval over the texts, seeds pooled).
`--parent-layer layer3` gives both parents' heads (the router) another tap.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def correct(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: int(r["index"]))
    return np.array([r["true_class"] == r["predicted_class"] for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/text-routing")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--parent-layer", default=None,
                        help="the tap the parent's head reads in both trees (default: the configs', the last layer)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = {}
    for name in ("by-source", "flat"):
        text = (ROOT / "configs" / f"movies-{name}.toml").read_text()
        if args.parent_layer:
            text = text.replace("max_length = 128\n", f'max_length = 128\nlayer = "{args.parent_layer}"\n', 1)
        configs[name] = out / f"movies-{name}.toml"
        configs[name].write_text(text)
    tree, flat, head = [], [], []
    for seed in seeds:
        for name in ("by-source", "flat"):
            run_dir = out / f"{name}-seed{seed}"
            command = ["branching", "run", "--config", str(configs[name]), "--data", args.data, "--out", str(run_dir),
                       "--seed", str(seed), "--quiet", "--no-report"]
            if args.max_epochs:
                command += ["--max-epochs", str(args.max_epochs)]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        tree.append(correct(out / f"by-source-seed{seed}" / "tree.csv"))
        flat.append(correct(out / f"flat-seed{seed}" / "predictions" / "flat.csv"))
        head.append(correct(out / f"flat-seed{seed}" / "predictions" / "parent.csv"))
    difference = np.stack(tree).astype(float) - np.stack(flat)
    rng = np.random.default_rng(0)
    n = difference.shape[1]
    boot = [difference[:, rng.integers(0, n, n)].mean() for _ in range(2000)]
    result = {"seeds": seeds, "test_texts": n, "parent_layer": args.parent_layer or "the last layer",
              "routed_tree": [float(c.mean()) for c in tree], "flat_branch": [float(c.mean()) for c in flat],
              "parent_head": [float(c.mean()) for c in head],
              "tree_minus_flat": float(difference.mean()),
              "tree_minus_flat_95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]}
    (out / "text-routing.json").write_text(json.dumps(result, indent=2))
    print(f"{n} test texts, 4 classes, seeds {seeds}, the parent's head on {result['parent_layer']}; test accuracy %, "
          f"mean ± std over seeds:")
    for key in ("routed_tree", "flat_branch", "parent_head"):
        values = 100 * np.array(result[key])
        print(f"  {key.replace('_', ' '):13} {values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0:.1f}")
    low, high = result["tree_minus_flat_95"]
    print(f"  routed tree - flat branch: {100 * result['tree_minus_flat']:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]"
          f" (95% bootstrap over the test texts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
