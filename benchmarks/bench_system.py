"""Where the toolkit meets the operating system, measured (docs/reliability.md).

    python benchmarks/bench_system.py memory --models runs/c6
    python benchmarks/bench_system.py disk --data ../shared/data/cifar100-6          # needs root (a tmpfs)
    python benchmarks/bench_system.py threads --data ../shared/data/cifar100-6 --repeats 2

memory: the peak memory (the process's maximum resident set) of `branching predict` on one image, and of decoding
one image into the image cache at 64 px, for a normal photo (4,000 x 3,000 JPEG), the largest square image the
pixel limit allows (a 9,459 x 9,459 JPEG), the longest strip the limits allow (1,365 x 65,535, a PNG) and a longer
one they refuse (1 x 1,000,000); each in a process of its own.

disk: the seconds from the start of a command to its one-line error when the disk is full: a first run whose image
cache does not fit (a 2 MB tmpfs as $BRANCHING_CACHE), and a run whose --out fills up while it writes (a 4 MB
tmpfs, filled but for 20 kB).

threads: the README's first run (configs/cifar100-6.toml, seed 0) with torch's default threads and with
OMP_NUM_THREADS=1, on the machine as it is and with two busy processes beside it (each a Python loop); the four
runs alternate, --repeats times, and the median wall and CPU seconds are printed.
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

REPO = Path(__file__).resolve().parents[1]
DATA = str(REPO / ".." / "shared" / "data" / "cifar100-6")


def peak(args: list[str], env=None) -> tuple[int, float]:
    """(maximum resident set in MB, seconds) of a command, from /usr/bin/time's own report (GNU time -v)."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *args], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    line = next(l for l in done.stderr.splitlines() if "Maximum resident set size" in l)
    return int(line.split()[-1]) // 1024, seconds


def memory(args) -> None:
    from PIL import Image
    from branching.data.images import MAX_PIXELS, MAX_SIDE
    work = Path(tempfile.mkdtemp(prefix="bench-system-"))
    side, thin = int(MAX_PIXELS ** 0.5), MAX_PIXELS // MAX_SIDE
    images = {"photo 4000x3000 (JPEG)": (work / "photo.jpg", (4000, 3000)),
              f"square {side}x{side} (JPEG)": (work / "square.jpg", (side, side)),
              f"strip {thin}x{MAX_SIDE} (PNG)": (work / "strip.png", (thin, MAX_SIDE)),
              "strip 1x1,000,000 (PNG, refused)": (work / "refused.png", (1, 1_000_000))}
    for path, size in images.values():
        Image.new("RGB", size, (90, 120, 150)).save(path)
    decode = ("import sys\nfrom branching.data.image_cache import _decode\nimport numpy as np\n"
              "np.lib.format.open_memmap(sys.argv[2], 'w+', np.uint8, (1, 3 * 64 * 64)).flush()\n"
              "print(_decode((sys.argv[1], 64, sys.argv[2], 0)))")
    print("| image | predict: peak MB | s | cache build (one image at 64 px): peak MB |")
    print("|---|---|---|---|")
    for label, (path, _) in images.items():
        predict_mb, seconds = peak([sys.executable, "-m", "branching", "predict", "--models", args.models, str(path)])
        cache_mb, _ = peak([sys.executable, "-c", decode, str(path), str(work / "cache.npy")])
        print(f"| {label}, {path.stat().st_size / 2**20:.1f} MB file | {predict_mb} | {seconds:.1f} | {cache_mb} |",
              flush=True)


def mount(point: Path, size: str) -> None:
    point.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)


def disk(args) -> None:
    from PIL import Image
    work = Path(tempfile.mkdtemp(prefix="bench-system-"))
    photos = work / "photos"
    for split in ("train", "test"):
        for c in ("beaver", "whale"):
            (photos / split / c).mkdir(parents=True)
            for i in range(60):
                Image.new("RGB", (8, 8), (i, 9, 9)).save(photos / split / c / f"{i}.png")
    (work / "tree.toml").write_text('[data]\nimage_size = 64\n[parent]\nclasses = ["beaver", "whale"]\n')
    small = work / "small.toml"
    small.write_text('[parent]\nclasses = ["beaver", "whale", "wolf", "sunflower"]\nhidden = [64]\n')
    cache, out = work / "cache", work / "out"
    mount(cache, "2M")
    mount(out, "4M")
    try:
        env = {**os.environ, "BRANCHING_CACHE": str(cache)}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "branching", "run", "--config", str(work / "tree.toml"),
                               "--data", str(photos), "--out", str(work / "o1"), "--quiet"], capture_output=True,
                              text=True, env=env)
        print(f"image cache on a full disk: exit {done.returncode} after {time.perf_counter() - start:.1f} s: "
              f"{done.stderr.strip().splitlines()[-1]}")
        run = [sys.executable, "-m", "branching", "run", "--config", str(small), "--data", args.data, "--out",
               str(out / "OUT"), "--no-download", "--quiet", "--no-report", "--max-epochs", "2"]
        subprocess.run(run, capture_output=True, check=True)
        stat = os.statvfs(out)
        (out / "filler").write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 20_000))
        start = time.perf_counter()
        done = subprocess.run(run, capture_output=True, text=True)
        last = done.stderr.strip().splitlines()[-1]
        print(f"--out filling up: exit {done.returncode} after {time.perf_counter() - start:.1f} s (the parent "
              f"trains first): {last}")
    finally:
        for point in (cache, out):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def threads(args) -> None:
    command = [sys.executable, "-m", "branching", "run", "--config", str(REPO / "configs" / "cifar100-6.toml"),
               "--data", args.data, "--no-download", "--quiet", "--no-report", "--seed", "0"]
    results: dict[str, list] = {}
    for _ in range(args.repeats):
        for busy in (0, 2):
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                for threads_ in ("default", "1"):
                    env = dict(os.environ)
                    env.pop("OMP_NUM_THREADS", None)
                    if threads_ == "1":
                        env["OMP_NUM_THREADS"] = "1"
                    out = Path(tempfile.mkdtemp(prefix="bench-threads-")) / "out"
                    start = time.perf_counter()
                    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True, env=env)
                    wall = time.perf_counter() - start
                    metrics = json.loads((out / "metrics.json").read_text())
                    key = f"{'2 busy processes' if busy else 'as it is'}, threads {threads_}"
                    results.setdefault(key, []).append((wall, metrics["timings"].get("cpu_s"),
                                                        "threads" in metrics["notes"]))
                    print(f"{key}: {wall:.1f} s wall, {metrics['timings'].get('cpu_s') or 0:.0f} CPU-s, note "
                          f"{'printed' if 'threads' in metrics['notes'] else 'not printed'}", flush=True)
            finally:
                for hog in hogs:
                    hog.kill()
    print("\n| machine | threads | wall s (median) | CPU s | the threads note |")
    print("|---|---|---|---|---|")
    for key, rows in results.items():
        machine, threads_ = key.split(", threads ")
        print(f"| {machine} | {threads_} | {statistics.median(r[0] for r in rows):.0f} | "
              f"{statistics.median(r[1] for r in rows):.0f} | {sum(r[2] for r in rows)} of {len(rows)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--models", required=True, help="a run folder (e.g. of the README's first run)")
    d = sub.add_parser("disk")
    d.add_argument("--data", default=DATA)
    t = sub.add_parser("threads")
    t.add_argument("--data", default=DATA)
    t.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    {"memory": memory, "disk": disk, "threads": threads}[args.command](args)


if __name__ == "__main__":
    main()
