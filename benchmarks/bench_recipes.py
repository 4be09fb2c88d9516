"""Original recipe against ours (`default`): accuracy over seeds and training time, in one run.

    python benchmarks/bench_recipes.py --config configs/cifar100-6.toml \
        --data ../shared/data/cifar100-6 --seeds 0,1,2 --out runs/bench-recipes

Seeds alternate between the recipes (original seed 0, default seed 0, original seed 1, ...), so
that both see the same machine load; times are compared as a ratio measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from branching.acceptance.stats import sample_summary
from branching.config.parse import load_config
from branching.config.recipes import get_recipe
from branching.fileio import write_json
from branching.tables import MARKDOWN, mean_std, table
from branching.train.run import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/cifar100-6.toml")
    p.add_argument("--data", default="../shared/data/cifar100-6")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipes", default="original,default")
    p.add_argument("--out", default="runs/bench-recipes")
    p.add_argument("--original-seeds", default=None,
                   help="seeds for the original recipe, if fewer than --seeds (it is about 10x slower)")
    p.add_argument("--max-epochs", type=int, default=None, help="cap every node's epochs (smoke runs only)")
    p.add_argument("--summarize", action="store_true",
                   help="train nothing: summarise the runs already in --out")
    args = p.parse_args(argv)
    config = load_config(args.config)
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = args.recipes.split(",")
    seeds_of = {r: seeds for r in recipes}
    if args.original_seeds is not None:
        seeds_of["original"] = [int(s) for s in args.original_seeds.split(",")]
    results: dict[str, list[dict]] = {r: [] for r in recipes}
    for seed in seeds:
        for name in recipes:
            if seed not in seeds_of[name]:
                continue
            folder = Path(args.out) / f"{name}-seed{seed}"
            if args.summarize:
                if (folder / "metrics.json").is_file():
                    results[name].append(json.loads((folder / "metrics.json").read_text()))
                continue
            print(f"-- recipe {name}, seed {seed}", file=sys.stderr, flush=True)
            metrics = run(config, args.data, folder, get_recipe(name, args.max_epochs), seed=seed, progress=False, report=False,
                          echo=lambda _: None)
            results[name].append(metrics)
            print(f"   parent {metrics['parent']['test_accuracy']:.4f}, "
                  + ", ".join(f"{b} {m['accuracy']:.4f}" for b, m in metrics["branches"].items())
                  + f"; {metrics['timings']['total_s']:.1f} s", file=sys.stderr, flush=True)

    rows = [("parent accuracy", lambda m: m["parent"]["test_accuracy"], True)]
    for b in config.branches:
        rows += [(f"{b} accuracy", lambda m, b=b: m["branches"][b]["accuracy"], True),
                 (f"{b} coverage", lambda m, b=b: m["branches"][b]["coverage"], True),
                 (f"{b} accepted accuracy", lambda m, b=b: m["branches"][b]["accepted_accuracy"], True)]
    rows += [("total time (s)", lambda m: m["timings"]["total_s"], False)]
    used = {r: [m["seed"] for m in results[r]] for r in recipes}
    print(f"\nseeds {used}, data {args.data}, config {args.config}")
    summary = {label: {r: sample_summary([get(m) for m in results[r]]) for r in recipes} for label, get, _ in rows}
    cells = [[label, *(mean_std(summary[label][r], 100 if pct else 1, 2 if pct else 1) for r in recipes)]
             for label, _, pct in rows]
    print(table(["figure (mean ± std over seeds; % or s)", *recipes], cells, MARKDOWN))
    times = summary["total time (s)"]
    if "original" in recipes and "default" in recipes and times["original"]["mean"] and times["default"]["mean"]:
        ratio = times["default"]["mean"] / times["original"]["mean"]
        print(f"\ndefault / original total time: {ratio:.3f}")
        summary["time_ratio_default_over_original"] = ratio
    write_json(Path(args.out) / "summary.json", {"seeds": used, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
