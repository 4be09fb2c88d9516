"""Early exits on a frozen trunk (branching.tree.cascade, docs/exits.md): what the fitted cascade saves against the
full trunk, how fast it answers, and whether its risk guarantee holds.

    python benchmarks/bench_exits.py fit --config configs/rt-exits.toml --data runs/rt --seeds 0 1 2 --out /tmp/bench-exits-rt
    python benchmarks/bench_exits.py speed --models runs/rt-exits --data runs/rt
    python benchmarks/bench_exits.py guarantee --models runs/rt-exits --data runs/rt --splits 1000
    python benchmarks/bench_exits.py fit --config configs/cifar100-6-exits.toml --data ../shared/data/cifar100-6 --seeds 0 1 2 --out /tmp/bench-exits-c6
    python benchmarks/bench_exits.py speed --models runs/c6-exits --data ../shared/data/cifar100-6 --n 256
    python benchmarks/bench_exits.py guarantee --models runs/c6-exits --data ../shared/data/cifar100-6

fit: the tree run with each seed (OUT/seed-N, no report); per seed and as mean ± sample std: the full trunk (no
exit) on the test split; the risk-mode cascade the run fitted; "equal accuracy", the cheapest setting of the
calibration curve whose calibration accuracy is at least the calibration full trunk's minus 0.5 points (chosen on
calibration inputs only), with that threshold's test figures; each exit alone. OUT/exits-curve.png: seed 0's test
accuracy against MFLOPs at every threshold tried, the three settings marked.

speed: inputs/s of the cascade (branching.load(RUN)) and of the full trunk (exits=False), and with --onnx of both
exported (branching export, with and without --no-exits) under onnxruntime, on the first --n test inputs at batch
sizes 1 (the first 64 inputs only), 32 and 256, alternating, median of --repeats after a warm-up; the share of
inputs answered at each exit; and whether the cascade's answers at batch size 256 equal its answers one input at a
time (label, path, score within 1e-5).

guarantee: RUN's test split (its models never saw it) halved at random --splits times: the cascade fitted on one
half (Learn-then-Test, the run's risk r and delta) and its realised error on what it answers measured on the other;
how often that error exceeds r (the guarantee: at most delta, up to the other half's own sampling noise), beside the
hand-set rule of SDN/BranchyNet: the cheapest setting whose empirical error on the first half is at most r.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import branching  # noqa: E402
from branching.tree import cascade as cascades  # noqa: E402

SLACK = 0.005  # equal accuracy: at most half a point below the full trunk's, on calibration inputs


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def spread(values, fmt) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) < 2:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def equal_accuracy(m: dict) -> tuple[int, dict, dict]:
    """The cheapest calibration setting within SLACK of the calibration full trunk (curve[0]: no exit), and the
    same setting on the test split."""
    cal = m["calibration_curve"]
    assert cal[0]["threshold"] is None
    ok = [i for i, p in enumerate(cal) if p["accuracy"] >= cal[0]["accuracy"] - SLACK]
    i = min(ok, key=lambda i: (cal[i]["mflops"], -cal[i]["accuracy"]))
    return i, cal[i], m["test_curve"][i]


def seed_figures(m: dict) -> dict:
    full, chosen = m["full_trunk"], m["cascade"]
    i, cal, test = equal_accuracy(m)
    figures = {"full accuracy": full["accuracy"], "full MFLOPs": full["mflops"],
               "risk threshold": m["threshold"], "risk accuracy": chosen["accuracy"],
               "risk coverage": chosen["coverage"], "risk error answered": chosen["risk"],
               "risk MFLOPs": chosen["mflops"], "risk share of full": chosen["mflops"] / full["mflops"]}
    figures.update({f"risk at {name}": s for name, s in zip(m["exits"], chosen["exits"])})
    figures.update({"equal threshold": cal["threshold"], "equal cal accuracy": cal["accuracy"],
                    "equal cal full accuracy": m["calibration_curve"][0]["accuracy"],
                    "equal accuracy": test["accuracy"], "equal MFLOPs": test["mflops"],
                    "equal share of full": test["mflops"] / full["mflops"]})
    for name, s in m["single_exit"].items():
        figures.update({f"{name} alone threshold": s["threshold"], f"{name} alone accuracy": s["accuracy"],
                        f"{name} alone MFLOPs": s["mflops"],
                        f"{name} alone share of full": s["mflops"] / full["mflops"],
                        f"{name} alone error answered": s["risk"], f"{name} alone coverage": s["coverage"]})
    return figures


def cmd_fit(args) -> dict:
    from branching.config.parse import load_config
    from branching.config.recipes import get_recipe
    from branching.train.run import run
    config, out = load_config(args.config), Path(args.out)
    runs, per_seed = {}, {}
    for seed in args.seeds:
        log(f"seed {seed}: running {args.config} into {out / f'seed-{seed}'}")
        start = time.perf_counter()
        m = run(config, args.data, out / f"seed-{seed}", get_recipe("default", args.max_epochs), seed=seed,
                progress=False, report=False, echo=log)["cascade"]
        log(f"seed {seed}: {time.perf_counter() - start:.0f} s")
        runs[seed], per_seed[seed] = m, seed_figures(m)
    first = runs[args.seeds[0]]
    print(f"{args.config}: {first['rule']}, exits {', '.join(first['exits'])}; {first['calibration_samples']} "
          f"calibration inputs (seed {args.seeds[0]}); equal accuracy = cheapest calibration setting within "
          f"{100 * SLACK:g} points of the calibration full trunk")
    names = list(per_seed[args.seeds[0]])
    print(f"{'figure':<34}" + "".join(f"{'seed ' + str(s):>10}" for s in args.seeds) + f"{'mean ± std':>22}")
    for name in names:
        fmt = (lambda x: f"{x:.1f}") if "MFLOPs" in name else (lambda x: f"{x:.4f}") if "threshold" in name else pct
        cells = [per_seed[s][name] for s in args.seeds]
        print(f"{name:<34}" + "".join(f"{'none' if c is None else fmt(c):>10}" for c in cells)
              + f"{spread(cells, fmt):>22}")
    plot(first, out / "exits-curve.png", args.seeds[0], args.config)
    values = {n: [per_seed[s][n] for s in args.seeds if per_seed[s][n] is not None] for n in names}
    summary = {"config": str(args.config), "seeds": args.seeds, "per_seed": per_seed,
               "mean": {n: statistics.mean(v) if v else None for n, v in values.items()},
               "std": {n: statistics.stdev(v) if len(v) > 1 else None for n, v in values.items()}}
    print(f"plot: {out / 'exits-curve.png'}")
    return summary


def plot(m: dict, path: Path, seed: int, config) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curve = m["test_curve"]
    i, _, equal = equal_accuracy(m)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot([p["mflops"] for p in curve], [100 * p["accuracy"] for p in curve], ".-", color="0.6",
            label="every threshold (test)")
    marks = [("full trunk", m["full_trunk"], "k", "s", (-8, -30), "right"),
             ("risk-mode cascade", m["cascade"], "C3", "o", (8, -30), "left"),
             ("equal accuracy", equal, "C0", "D", (8, 10), "left")]
    for label, p, color, marker, offset, ha in marks:
        ax.plot(p["mflops"], 100 * p["accuracy"], marker, color=color, ms=9, label=label, mfc="none", mew=2)
        ax.annotate(f"{label}\n{p['mflops']:.0f} MFLOPs, {100 * p['accuracy']:.1f}%",
                    (p["mflops"], 100 * p["accuracy"]), textcoords="offset points", xytext=offset, ha=ha, fontsize=8,
                    color=color)
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel("mean MFLOPs per input (test)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{Path(str(config)).name}, seed {seed}: {m['rule']}", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def test_inputs(tree, data: str, n: int):
    if tree.reads == "texts":
        from branching.data.texts import read_folder
        return list(read_folder(data).splits["test"].texts[:n])
    from branching.data.cifar import load_split
    return load_split(data, "test").images[:n]


def answer(tree, inputs, size: int) -> list:
    return [a for i in range(0, len(inputs), size) for a in tree(inputs[i:i + size])]


def cmd_speed(args) -> dict:
    import tempfile

    import torch
    trees = {"cascade": branching.load(args.models, "cpu"), "full": branching.load(args.models, "cpu", exits=False)}
    scratch = tempfile.TemporaryDirectory(prefix="bench-exits-")
    if args.onnx:  # the same two trees exported, run by onnxruntime
        from branching.api.export import export
        from branching.errors import ConfigError
        try:
            for name in ("cascade", "full"):
                log(f"exporting the {name} tree")
                export(trees[name], Path(scratch.name) / f"{name}.onnx")
                trees[f"onnx {name}"] = branching.load(Path(scratch.name) / f"{name}.onnx")
        except ConfigError as e:
            print(f"not exported, so not timed under onnxruntime: {e}")
            args.onnx = False
            trees = {k: v for k, v in trees.items() if not k.startswith("onnx")}
    inputs = test_inputs(trees["cascade"], args.data, args.n)
    n = len(inputs)
    print(f"{args.models}: {n} test {trees['cascade'].reads}, inputs/s (median of {args.repeats}, "
          f"{', '.join(trees)} alternating), {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    pairs = [("cascade", "full")] + ([("onnx cascade", "onnx full")] if args.onnx else [])
    print(f"{'batch':>6} {'inputs':>7} " + " ".join(f"{name:>13}" for name in trees) + " "
          + " ".join(f"{a + ' / ' + b.split()[-1]:>20}" for a, b in pairs))
    rates, last = {}, {}
    for size in (1, 32, 256):
        part = inputs[:min(n, 64)] if size == 1 else inputs
        for name, tree in trees.items():
            log(f"batch {size}: warming {name}")
            last[name] = answer(tree, part, size)
        runs = {name: [] for name in trees}
        for r in range(args.repeats):
            for name, tree in trees.items():
                start = time.perf_counter()
                last[name] = answer(tree, part, size)
                runs[name].append(len(part) / (time.perf_counter() - start))
        rates[size] = {name: statistics.median(v) for name, v in runs.items()} | {"inputs": len(part)}
        print(f"{size:>6} {len(part):>7} " + " ".join(f"{rates[size][name]:>13.1f}" for name in trees) + " "
              + " ".join(f"{rates[size][a] / rates[size][b]:>20.2f}" for a, b in pairs))
    print("(batch 1 on the first 64 inputs only, to keep it short)" if n > 64 else "")
    big, exits = last["cascade"], trees["cascade"].predictor.exits
    shares = {e: sum(a.node == e for a in big) / n for e in exits}
    print("answered at each exit (batch 256): " + ", ".join(f"{e} {pct(s)}" for e, s in shares.items())
          + f", by the tree {pct(1 - sum(shares.values()))}")
    log("checking batch 256 against batch 1 on every input")
    one = answer(trees["cascade"], inputs, 1)
    same = sum(a.label == b.label and a.path == b.path and a.node == b.node for a, b in zip(big, one))
    diff = max(abs(a.score - b.score) for a, b in zip(big, one))
    agree = sum(a.guess == b.guess for a, b in zip(big, last["full"]))
    print(f"cascade at batch 256 against batch 1: {same} of {n} alike (label, path, node); largest score difference "
          f"{diff:.1e} ({'within' if diff <= 1e-5 else 'NOT within'} 1e-5)")
    print(f"cascade against full trunk: the same class on {agree} of {n} inputs")
    exported = None
    if args.onnx:
        exported = sum((a.label, a.path) == (b.label, b.path) for a, b in zip(big, last["onnx cascade"]))
        print(f"exported cascade against the cascade (batch 256): {exported} of {n} alike (label, path)")
    return {"models": str(args.models), "n": n, "repeats": args.repeats, "rates": rates, "exits": shares,
            "batch_alike": same, "onnx_alike": exported, "largest_score_difference": diff, "agree_with_full": agree}


def rows_of(v, rows) -> tuple:
    o, c = v.outputs, v.costs
    return (o.rows(rows), v.guess[rows], v.accepted[rows], v.labels[rows],
            cascades.Costs(c.at_exit[rows], c.full[rows], c.heads[rows]))


def cmd_guarantee(args) -> dict:
    from branching.data.tree_data import load_tree_data
    from branching.train.exits import view
    from branching.tree.checkpoint import load_folder
    config, models = load_folder(args.models)
    spec = config.cascade
    assert spec is not None and spec.risk is not None, f"{args.models}: no risk-mode cascade"
    log(f"loading {args.data} and the test split's view")
    v = view(config, models, "test", None, load_tree_data(config, args.data, progress=False))
    n, r = len(v.labels), spec.risk
    full = cascades.outcome(np.full(n, -1), v.outputs, v.guess, v.accepted, v.labels, v.costs, False)
    rng = np.random.default_rng(args.seed)
    found = {"guarantee": [], "empirical": []}
    for s in range(args.splits):
        if s % 100 == 0:
            log(f"split {s} of {args.splits}")
        order = rng.permutation(n)
        fit_half, test_half = rows_of(v, order[:n // 2]), rows_of(v, order[n // 2:])
        fitted = cascades.fit(spec, v.exit_names, *fit_half)
        passed = [p for p in fitted.curve if (p["risk"] or 0) <= r]
        sweep = min(passed, key=lambda p: (p["mflops"], -p["accuracy"])) if passed else None
        test_full = cascades.outcome(np.full(n - n // 2, -1), *test_half, False)["mflops"]
        for rule, threshold in (("guarantee", fitted.threshold if fitted.attained else None),
                                ("empirical", sweep["threshold"] if sweep else None)):
            p = cascades.outcome(cascades.first_exit(test_half[0].gate, threshold), *test_half,
                                 threshold is not None)
            found[rule].append({"threshold": threshold, "risk": p["risk"] or 0.0, "coverage": p["coverage"],
                                "share": p["mflops"] / test_full, "no exit": threshold is None,
                                "not attained": rule == "guarantee" and not fitted.attained})
    print(f"{args.models}: test split of {n} inputs halved {args.splits} times (seed {args.seed}); fitted on "
          f"{n // 2}, measured on {n - n // 2}; asked: error on what it answers <= {pct(r)} with probability "
          f">= {pct(1 - spec.delta)}; the tree alone errs on {pct(full['risk'])} at coverage {pct(full['coverage'])}")
    print(f"{'rule':<30} {'P(err > r)':>10} {'mean err':>9} {'p95 err':>8} {'MFLOPs share':>13} {'coverage':>9} "
          f"{'no exit':>8}")
    summary = {"models": str(args.models), "n": n, "splits": args.splits, "risk": r, "delta": spec.delta}
    for rule, label in (("guarantee", "Learn-then-Test (bound <= r)"), ("empirical", "empirical error <= r (SDN)")):
        rows = found[rule]
        risks = np.array([x["risk"] for x in rows])
        figures = {"violations": float((risks > r).mean()), "mean_risk": float(risks.mean()),
                   "p95_risk": float(np.percentile(risks, 95)),
                   "mflops_share": float(np.mean([x["share"] for x in rows])),
                   "coverage": float(np.mean([x["coverage"] for x in rows])),
                   "no_exit": sum(x["no exit"] for x in rows), "not_attained": sum(x["not attained"] for x in rows),
                   "median_threshold": float(np.median([x["threshold"] for x in rows if x["threshold"] is not None]))
                   if any(x["threshold"] is not None for x in rows) else None}
        summary[rule] = figures
        print(f"{label:<30} {pct(figures['violations']):>10} {pct(figures['mean_risk']):>9} "
              f"{pct(figures['p95_risk']):>8} {pct(figures['mflops_share']):>13} {pct(figures['coverage']):>9} "
              f"{figures['no_exit']:>8}")
    print(f"no exit: splits where no setting passed (the tree alone answers; its error counted as measured); "
          f"Learn-then-Test not attained on {summary['guarantee']['not_attained']} of {args.splits}. Target: "
          f"P(err > r) <= {pct(spec.delta)} (the measuring half's own noise included)")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit")
    p.add_argument("--config", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True, help="a folder: OUT/seed-N, OUT/exits-curve.png, OUT/exits.json")
    p.add_argument("--max-epochs", type=int, default=None, help="cap the default recipe's epochs (tests)")
    for name in ("speed", "guarantee"):
        p = sub.add_parser(name)
        p.add_argument("--models", required=True, help="a run's folder")
        p.add_argument("--out", default=None, help="a JSON file of the figures")
    sub.choices["speed"].add_argument("--n", type=int, default=256)
    sub.choices["speed"].add_argument("--repeats", type=int, default=3)
    sub.choices["speed"].add_argument("--onnx", action="store_true",
                                      help="also the cascade and the full trunk exported, under onnxruntime")
    sub.choices["guarantee"].add_argument("--splits", type=int, default=1000)
    sub.choices["guarantee"].add_argument("--seed", type=int, default=0)
    for p in sub.choices.values():
        p.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "cifar100-6"))
    args = parser.parse_args()
    figures = {"fit": cmd_fit, "speed": cmd_speed, "guarantee": cmd_guarantee}[args.command](args)
    out = Path(args.out) / "exits.json" if args.command == "fit" else args.out and Path(args.out)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=1, default=str) + "\n")
        log(f"figures written to {out}")


if __name__ == "__main__":
    main()
