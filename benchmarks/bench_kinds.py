"""Parent kinds side by side: MLP, CNN and ViT parents with the same two branches, on the same data.

    python benchmarks/bench_kinds.py --data ../shared/data/cifar100-6 --seeds 0,1,2 --out runs/bench-kinds

For each seed, `run` trains and evaluates configs/cifar100-6.toml (MLP), cifar100-6-cnn.toml and
cifar100-6-vit.toml with the default recipe, one after the other so that every kind sees the same
machine load; times are compared as ratios measured in this run. Prints a Markdown table (accuracy of
the parent, of each branch and of the parent's own head on the branch's classes; parameters, FLOPs,
time per seed, training and inference images/s) and writes OUT/summary.json. `--summarize` trains
nothing and summarises the runs already in OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from branching.acceptance.stats import sample_summary, wilson_interval
from branching.config.parse import load_config
from branching.config.recipes import get_recipe
from branching.data.cifar import load_split
from branching.fileio import write_json
from branching.models.device import resolve_device
from branching.tables import MARKDOWN, interval, mean_std, table
from branching.train.run import run
from branching.tree import cost
from branching.tree.checkpoint import load_folder
from branching.tree.routing import TreePredictor

CONFIGS = {"mlp": "configs/cifar100-6.toml", "cnn": "configs/cifar100-6-cnn.toml", "vit": "configs/cifar100-6-vit.toml"}
REPO = Path(__file__).resolve().parents[1]


def measure(folder: Path, data_dir) -> dict:
    """Figures of one finished run: from its metrics.json and its models."""
    metrics = json.loads((folder / "metrics.json").read_text())
    config, models = load_folder(folder)
    parent = models["parent"]
    history = parent.meta.history
    images = load_split(data_dir, "test").images
    predictor = TreePredictor(config, models)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        predictor.predict(images)
        best = min(best, time.perf_counter() - start)
    out = {"seed": metrics["seed"], "device": metrics.get("device", "cpu"),
           "parent_accuracy": metrics["parent"]["test_accuracy"], "parent_samples": metrics["parent"]["test_samples"],
           "parameters": sum(p.numel() for p in parent.net.parameters()),
           "flops": cost.counted(lambda: parent.net(torch.zeros(1, parent.architecture[0]))),
           "seconds": metrics["timings"]["total_s"], "parent_train_s": history["seconds"],
           "train_images_per_s": len(parent.meta.train_rows) * history["epochs_run"] / history["seconds"],
           "tree_images_per_s": len(images) / best, "branches": {}}
    for name, m in metrics["branches"].items():
        out["branches"][name] = {"accuracy": m["test_accuracy"], "head": m["parent_head"]["test_accuracy"],
                                 "samples": m["test_samples"]}
    return out


def pooled(values, samples) -> str:
    """The 95% Wilson interval of the accuracy over every seed's test images together."""
    right = sum(round(v * n) for v, n in zip(values, samples))
    return interval(wilson_interval(right, sum(samples)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar100-6")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--kinds", default="mlp,cnn,vit")
    p.add_argument("--out", default="runs/bench-kinds")
    p.add_argument("--max-epochs", type=int, default=None, help="cap every node's epochs (smoke runs only)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (where models train)")
    p.add_argument("--summarize", action="store_true", help="train nothing: summarise the runs already in --out")
    args = p.parse_args(argv)
    seeds, kinds = [int(s) for s in args.seeds.split(",")], args.kinds.split(",")
    device = resolve_device(args.device)
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for seed in seeds:
        for kind in kinds:
            folder = Path(args.out) / f"{kind}-seed{seed}"
            if not args.summarize:
                print(f"-- {kind}, seed {seed} ({device})", file=sys.stderr, flush=True)
                run(load_config(REPO / CONFIGS[kind]), args.data, folder, get_recipe("default", args.max_epochs),
                    seed=seed, progress=False, report=False, echo=lambda _: None, device=device)
            if (folder / "metrics.json").is_file():
                results[kind].append(measure(folder, args.data))

    branches = sorted({b for rs in results.values() for r in rs for b in r["branches"]})
    header = ["figure (mean ± std over seeds)", *kinds]
    rows = [["parent accuracy %", *(mean_std(sample_summary([r["parent_accuracy"] for r in results[k]]), 100, 1)
                                    + pooled([r["parent_accuracy"] for r in results[k]],
                                             [r["parent_samples"] for r in results[k]]) for k in kinds)]]
    for b in branches:
        for label, key in ((f"{b} branch accuracy %", "accuracy"), (f"{b}: parent's head on its classes %", "head")):
            rows.append([label, *(mean_std(sample_summary([r["branches"][b][key] for r in results[k]]), 100, 1)
                                  + pooled([r["branches"][b][key] for r in results[k]],
                                           [r["branches"][b]["samples"] for r in results[k]]) for k in kinds)])
        rows.append([f"{b}: branch - head, points", *(mean_std(sample_summary(
            [r["branches"][b]["accuracy"] - r["branches"][b]["head"] for r in results[k]]), 100, 1) for k in kinds)])
    figures = (("parent parameters", "parameters", 1, 0), ("parent MFLOPs per image", "flops", 1e-6, 1),
               ("time per seed (run: train, evaluate), s", "seconds", 1, 1),
               ("parent training images/s", "train_images_per_s", 1, 0),
               ("routed tree inference images/s", "tree_images_per_s", 1, 0))
    for label, key, scale, digits in figures:
        rows.append([label, *(mean_std(sample_summary([r[key] * scale for r in results[k]]), 1, digits) for k in kinds)])
    print(f"\nseeds {seeds}, data {args.data}, device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; intervals: 95% Wilson over all seeds' test images together")
    print(table(header, rows, MARKDOWN))
    summary = {k: results[k] for k in kinds}
    if "mlp" in kinds:
        base = np.mean([r["seconds"] for r in results["mlp"]]) if results["mlp"] else None
        for k in kinds:
            if k != "mlp" and base and results[k]:
                ratio = np.mean([r["seconds"] for r in results[k]]) / base
                print(f"{k} / mlp time per seed: {ratio:.2f}")
                summary[f"time_ratio_{k}_over_mlp"] = ratio
    write_json(Path(args.out) / "summary.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
