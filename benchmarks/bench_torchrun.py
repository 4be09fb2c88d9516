"""A run under torchrun against one process: wall time, where it goes, and the figures, seed by seed.

    python benchmarks/bench_torchrun.py --data ../shared/data/cifar100-6 --config configs/cifar100-6-cnn.toml --seeds 0,1,2
    python benchmarks/bench_torchrun.py --data DATA --config configs/cifar100-6-cnn.toml --device cuda --gpus 8

On a CPU (the default) each seed's `branching run` (no report) is timed three ways, one after the other so that
they see the same machine: one process with one thread, one process with two threads, and torchrun with two
processes of one thread each (gloo). With --device cuda: one process on one GPU against torchrun with one process
per GPU (nccl). Printed per mode: the median wall time (the command, start to end: start-up, data, training,
evaluation), the parent's training, the branches' and the evaluation's seconds as the run records them, the
speed-up and scaling efficiency against one process of one thread (or one GPU), and the accuracy of the parent,
each branch and the routed tree, mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from branching.tables import MARKDOWN, table

REPO = Path(__file__).resolve().parents[1]


def modes(device: str, gpus: int) -> list[tuple[str, int, int]]:
    """(label, processes, threads per process)."""
    if device == "cuda":
        return [("1 process, 1 GPU", 1, 1), (f"torchrun, {gpus} processes, {gpus} GPUs", gpus, 1)]
    return [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2), ("torchrun, 2 processes x 1 thread", 2, 1)]


def timed_run(config, data, out: Path, seed: int, processes: int, threads: int, device: str) -> dict:
    command = ["-m", "branching", "run", "--config", str(config), "--data", str(data), "--out", str(out),
               "--seed", str(seed), "--device", device, "--no-download", "--no-report", "--quiet"]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    timings = metrics["timings"]
    branches = sum(v for k, v in timings.items() if k.startswith("train_") and k != "train_parent_s")
    accuracy = {"parent": metrics["parent"]["test_accuracy"], "tree": metrics["tree"]["test_accuracy"],
                **{name: m["test_accuracy"] for name, m in metrics["branches"].items()}}
    return {"wall_s": seconds, "parent_s": timings["train_parent_s"], "branches_s": branches,
            "evaluate_s": timings["evaluate_s"], "accuracy": accuracy}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--config", default="configs/cifar100-6-cnn.toml")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--gpus", type=int, default=2, help="with --device cuda: processes (one per GPU)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict]] = {label: [] for label, _, _ in modes(args.device, args.gpus)}
    with tempfile.TemporaryDirectory(prefix="bench-torchrun-") as scratch:
        for seed in seeds:
            for label, processes, threads in modes(args.device, args.gpus):
                found = timed_run(args.config, args.data, Path(scratch) / f"{seed}-{processes}-{threads}", seed,
                                  processes, threads, args.device)
                results[label].append(found)
                print(f"seed {seed}, {label}: {found['wall_s']:.1f} s, "
                      + ", ".join(f"{k} {100 * v:.1f}%" for k, v in found["accuracy"].items()), flush=True)
    base_label = next(iter(results))
    base = statistics.median(r["wall_s"] for r in results[base_label])
    names = list(results[base_label][0]["accuracy"])
    rows = []
    for label, runs in results.items():
        wall = statistics.median(r["wall_s"] for r in runs)
        workers = dict((m[0], m[1] * m[2]) for m in modes(args.device, args.gpus))[label]
        rows.append([label, f"{wall:.1f}", *(f"{statistics.median(r[k] for r in runs):.1f}"
                                            for k in ("parent_s", "branches_s", "evaluate_s")),
                     f"{base / wall:.2f}", f"{100 * base / wall / workers:.0f}%",
                     *(f"{100 * statistics.mean(r['accuracy'][n] for r in runs):.1f}" for n in names)])
    print(f"\n{args.config} on {args.data}, seeds {seeds}, device {args.device}; times: median over seeds")
    print(table(["mode", "wall s", "parent s", "branches s", "evaluate s", "speed-up", "efficiency",
                 *(f"{n} %" for n in names)], rows, MARKDOWN))
    return 0


if __name__ == "__main__":
    sys.exit(main())
