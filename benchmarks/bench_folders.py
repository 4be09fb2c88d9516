"""Image folders at scale: the image cache's build rate against PIL's own, an epoch from the cache against
one from arrays in memory, and the peak memory of a whole run, at growing numbers of images.

    python benchmarks/bench_folders.py --sizes 1000,10000,50000 --side 96 --out runs/bench-folders

For each N it writes N generated photos (JPEG, 128x112 pixels, smooth random scenes of 10 classes in 2
groups; 80% in train/, 20% in test/) under OUT/, once, then prints:

- PIL: images/s of one process doing the cache's work on a sample of the same files (read, decode, make
  upright RGB, resize and centre-crop to --side), the limit per core;
- cache: images/s of building the cache with every core (the decoding workers), and its share of PIL's
  rate per core used (target >= 0.8);
- epoch: seconds of one CNN (and one MLP) training epoch over --epoch-images images read from the
  memory-mapped cache (normalised a batch at a time) against the same epoch from a float32 array in memory
  (target: within 10%); one thread, paired, alternating, median of the --repeats paired ratios;
- run: peak resident memory (ru_maxrss of the child, GiB) and wall time of `branching run` on the folder
  with an MLP parent and the tree `branching init` writes, one epoch (target below 3 GB at 50,000 images
  of 96 px, where the uint8 images are 1.4 GB and a float32 copy would be 5.5 GB).

The figures go to OUT/bench-folders.json as well. The generated folders stay in OUT (git-ignored runs/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = {"animals": ["cat", "dog", "fox", "owl", "bat"], "plants": ["fern", "moss", "oak", "pine", "rose"]}


def generate(root: Path, n: int, seed: int = 0) -> Path:
    """n JPEG photos of 10 classes in 2 groups under root/train and root/test (skipped if already there)."""
    from PIL import Image

    done = root / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("n") == n:
        return root
    rng = np.random.default_rng(seed)
    names = [(group, c) for group, classes in CLASSES.items() for c in classes]
    templates = rng.integers(0, 256, (len(names), 7, 8, 3), dtype=np.uint8)
    for i in range(n):
        k = i % len(names)
        low = np.clip(templates[k].astype(int) + rng.integers(-60, 61, (7, 8, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(low).resize((128, 112), Image.Resampling.BICUBIC)
        split = "test" if (i // len(names)) % 5 == 4 else "train"
        path = root / split / names[k][0] / names[k][1] / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
    done.write_text(json.dumps({"n": n}))
    return root


def pil_rate(root: Path, side: int, sample: int) -> float:
    """Images/s of one process doing what the cache does to each file."""
    from branching.data.images import decode_image

    files = sorted(root.rglob("*.jpg"))[:sample]
    start = time.perf_counter()
    for path in files:
        decode_image(path.read_bytes(), path, side)
    return len(files) / (time.perf_counter() - start)


def cache_rate(root: Path, side: int, cache: Path) -> tuple[float, int]:
    """(images/s of a fresh cache build on every core, workers used)."""
    from branching.data import image_cache
    from branching.data.folders import scan

    os.environ["BRANCHING_CACHE"] = str(cache)
    folders = scan(root)
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for old in cache.glob("images-*"):
        import shutil
        shutil.rmtree(old)
    start = time.perf_counter()
    image_cache.load_cached(folders, side, progress=False, workers=workers)
    n = sum(len(files) for files in folders.splits.values())
    return n / (time.perf_counter() - start), workers


def build(kind: str, width: int):
    """The network an epoch is timed on: the CNN of configs/cifar100-6-cnn.toml, or an MLP [256, 128]."""
    from branching.models.model import Model

    if kind == "cnn":
        return Model([width, 10], kind="cnn", shape={"widths": [32, 64, 128], "depth": 2}, seed=0)
    return Model([width, 256, 128, 10], seed=0)


def epoch_ratio(root: Path, side: int, cache: Path, n_images: int, repeats: int, kind: str) -> tuple[float, float, float]:
    """(median seconds from the cache, median seconds in memory, median paired ratio cache / memory) of one
    epoch of a CNN (or an MLP [256, 128]) over the first n_images training images."""
    import torch

    from branching.data import image_cache
    from branching.data.folders import scan
    from branching.data.normalization import Normalizer

    os.environ["BRANCHING_CACHE"] = str(cache)
    part = image_cache.load_cached(scan(root), side, progress=False).splits["train"]
    images, labels = part.images[:n_images], part.labels[:n_images] % 10
    normalizer = Normalizer.fit(images, per_channel=True)
    in_memory = normalizer.transform(images)
    lazy = normalizer.lazy(images)
    timings = {"cache": [], "memory": []}
    torch.set_num_threads(1)
    for warm_up in (in_memory, lazy):  # first calls allocate and pick kernels: not timed
        build(kind, images.shape[1]).fit(warm_up[:256], labels[:256], epochs=1, batch_size=128, seed=0,
                                         progress=False)
    for i in range(repeats):
        for name in (("cache", "memory") if i % 2 == 0 else ("memory", "cache")):
            model = build(kind, images.shape[1])
            start = time.perf_counter()
            model.fit(lazy if name == "cache" else in_memory, labels, epochs=1, batch_size=128, seed=0,
                      progress=False)
            timings[name].append(time.perf_counter() - start)
    ratios = [c / m for c, m in zip(timings["cache"], timings["memory"])]
    return statistics.median(timings["cache"]), statistics.median(timings["memory"]), statistics.median(ratios)


def run_memory(root: Path, side: int, cache: Path, out: Path) -> tuple[float, float]:
    """(peak resident GB, wall seconds) of `branching run` on the folder: MLP parent, the tree init writes,
    one epoch; the cache already built."""
    tree = out / f"tree-{root.name}.toml"
    env = {**os.environ, "BRANCHING_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "-m", "branching", "init", "--data", str(root), "--out", str(tree), "--force",
                    "--image-size", str(side)], check=True, env=env, stdout=subprocess.DEVNULL)
    lines, section = [], None
    for line in tree.read_text().splitlines():  # the parent [256, 128] wide, each branch [64]
        section = line.split("]")[0] + "]" if line.startswith("[") else section
        lines.append(line)
        if line.startswith("classes = "):
            lines.append("hidden = [256, 128]" if section == "[parent]" else "hidden = [64]")
    tree.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    # through a small launcher: a child forked from this (large) process would report this process's
    # resident memory at the fork as its own peak
    measured = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "branching", "run", "--config",
                               str(tree), "--data", str(root), "--out", str(out / f"run-{root.name}"), "--max-epochs",
                               "1", "--quiet", "--no-report"], env=env, stdout=subprocess.PIPE, text=True)
    if measured.returncode:
        raise SystemExit(f"branching run on {root} failed (exit {measured.returncode})")
    return int(measured.stdout.split()[-1]) / 2**20, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="numbers of images (default 1000,10000,50000)")
    parser.add_argument("--side", type=int, default=96, help="image size in pixels (default 96)")
    parser.add_argument("--out", default="runs/bench-folders", help="where folders, caches and runs go")
    parser.add_argument("--pil-sample", type=int, default=2000, help="files PIL decodes for its rate (default 2000)")
    parser.add_argument("--epoch-images", type=int, default=1000, help="images in the epoch comparison (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="paired epoch repeats (default 3)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in sorted(int(s) for s in args.sizes.split(",")):
        root = generate(out / f"photos-{n}", n)
        cache = out / f"cache-{n}"
        pil = pil_rate(root, args.side, args.pil_sample)
        rate, workers = cache_rate(root, args.side, cache)
        row = {"images": n, "side": args.side, "pil_images_s": pil, "cache_images_s": rate, "workers": workers,
               "cache_per_core_vs_pil": rate / workers / pil}
        if n >= args.epoch_images:
            for kind in ("cnn", "mlp"):
                row[f"{kind}_epoch_cache_s"], row[f"{kind}_epoch_memory_s"], row[f"{kind}_epoch_ratio"] = epoch_ratio(
                    root, args.side, cache, args.epoch_images, args.repeats, kind)
        row["run_peak_gb"], row["run_s"] = run_memory(root, args.side, cache, out)
        row["uint8_gb"] = n * 3 * args.side ** 2 / 2**30
        results.append(row)
        print(json.dumps(row), flush=True)
    (out / "bench-folders.json").write_text(json.dumps(results, indent=1))
    print()
    print("| images | PIL img/s (1 core) | cache img/s | cores | per core / PIL | CNN epoch cache / memory | "
          "MLP epoch cache / memory | run peak GiB | uint8 GiB | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def epoch(r, kind):
        if f"{kind}_epoch_ratio" not in r:
            return "-"
        return f"{r[kind + '_epoch_ratio']:.2f} ({r[kind + '_epoch_cache_s']:.1f} s / {r[kind + '_epoch_memory_s']:.1f} s)"
    for r in results:
        print(f"| {r['images']:,} | {r['pil_images_s']:.0f} | {r['cache_images_s']:.0f} | {r['workers']} | "
              f"{r['cache_per_core_vs_pil']:.2f} | {epoch(r, 'cnn')} | {epoch(r, 'mlp')} | {r['run_peak_gb']:.2f} | "
              f"{r['uint8_gb']:.2f} | {r['run_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
