"""The pretrained image parent (kind = "pretrained", EfficientNet-Lite0): extraction speed, the input size, and the
accuracy-cost frontier of its blocks (docs/pretrained.md).

    python benchmarks/bench_pretrained.py speed --data ../shared/data/cifar100-6 --threads 1
    python benchmarks/bench_pretrained.py sizes --data ../shared/data/cifar100-6 --sizes 64,96,128,224 --seeds 0,1,2 --out runs/pretrained-sizes
    python benchmarks/bench_pretrained.py weights --data ../shared/data/cifar100-6
    python benchmarks/bench_pretrained.py recipe --seeds 0,1,2
    python benchmarks/bench_pretrained.py frontier --compare runs/pretrained-compare/compare.json --out runs/pretrained-frontier.png

speed: on the test images, resized from 32 px to the network's size, the toolkit's extraction (uint8 pixels in,
resized, normalised, the trunk run to the deepest tap, every tap pooled two ways, vectors out) against the
network's own forward pass (`extract_features`) on the same batches already resized and normalised, the limit;
then the time saved by stopping at block10 rather than running to the head, one image at a time and in batches.
Each comparison runs its two sides batch by batch in turn, --repeats rounds after a warm-up, so that both meet
the same load on a shared machine.

sizes: for each input size, the tree of configs/cifar100-6-pretrained.toml at that [data] image_size run with each
seed (`branching run`, into OUT/size-N/seed-S), and per size the validation accuracy of the parent's head and of
each branch at their best epoch (the images no node trains on: the choice is made on them), the test accuracy
(reported, not used to choose), the MFLOPs of the trunk to the head and to each branch's tap, and the seconds
the encoding took.

weights: the packaged weights on real images: top-1 and top-5 of the network's own ImageNet classifier on the
test images of the classes ImageNet has too (beaver, whale, wolf), with TF-Lite's normalisation (the trunk's) and
with ImageNet's mean and std.

recipe: validation accuracy of the parent's head and of each branch with and without mirror images (the tree
with mirrors = true), pooled over seeds.

frontier: from a `compare` run's compare.json, the test accuracy of each branch reading each tap (mean and 95%
interval over seeds) against the MFLOPs of the trunk to that tap (and the branch), as a plot.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from branching.models import trunks  # noqa: E402


def speed(args) -> dict:
    """Images/s of the toolkit's extraction against the network's own forward pass, and of stopping at block10
    against running to the head; each pair alternates batch by batch (the same machine load for both)."""
    from branching.data.cifar import load_split
    from branching.models.kinds import get_kind
    torch.set_num_threads(args.threads)
    shape = get_kind("pretrained").check_shape({"model": args.model, "input_size": args.size})
    trunk = trunks.load_trunk(shape, torch.device("cpu"))
    images = load_split(args.data, "test").images[:args.images]
    batch = trunks.batch_rows(args.size, torch.device("cpu"))
    starts = range(0, len(images), batch)
    with torch.inference_mode():
        prepared = [trunk.prepare(torch.from_numpy(images[s:s + batch])) for s in starts]
    columns = sum(w for _, w in trunks.tap_widths(args.model, args.size)) * len(trunks.IMAGE_POOLS)
    out = np.zeros((len(images), columns), np.float32)

    def ours(s):  # as encode_images does it: uint8 rows in, vectors written into the output
        out[s:s + batch] = trunk.encode(torch.from_numpy(np.ascontiguousarray(images[s:s + batch])), 18).numpy()

    bare_s, ours_s = alternate([lambda x=x: trunk.net.extract_features(x) for x in prepared],
                               [lambda s=s: ours(s) for s in starts], args.repeats)
    result = {"model": args.model, "size": args.size, "threads": args.threads, "images": len(images),
              "batch": batch, "repeats": args.repeats, "bare_images_s": args.repeats * len(images) / bare_s,
              "toolkit_images_s": args.repeats * len(images) / ours_s, "ratio": bare_s / ours_s}
    stops = {}
    for rows in (1, batch, 32, 128):
        part = images[:min(len(images), args.single)] if rows == 1 else images
        chunks = [torch.from_numpy(part[s:s + rows]) for s in range(0, len(part), rows)]
        head, block10 = alternate([lambda c=c: trunk.encode(c, 18) for c in chunks],
                                  [lambda c=c: trunk.encode(c, 12) for c in chunks], args.repeats)
        n = args.repeats * len(part)
        stops[rows] = {"images": len(part), "head_ms": 1000 * head / n, "block10_ms": 1000 * block10 / n,
                       "saved": 1 - block10 / head}
    result["stop_at_block10"] = stops
    flops = trunks.tap_flops(args.model, args.size)
    result["mflops"] = {"block10": flops[11] / 1e6, "head": flops[17] / 1e6}
    return result


def alternate(first: list, second: list, repeats: int) -> tuple[float, float]:
    """Seconds of every call of `first` and of `second`, called in turn (first[i], second[i], ...) `repeats`
    times, after one warm-up round."""
    totals = [0.0, 0.0]
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for calls in zip(first, second):
                for k, call in enumerate(calls):
                    start = time.perf_counter()
                    call()
                    if round_:
                        totals[k] += time.perf_counter() - start
    return totals[0], totals[1]


def print_speed(r: dict) -> None:
    print(f"{r['model']} at {r['size']} px, {r['threads']} thread(s), {r['images']} images in batches of {r['batch']}:")
    print(f"  the network's forward pass (extract_features, images already prepared): {r['bare_images_s']:.1f} images/s")
    print(f"  the toolkit's extraction (resize, normalise, trunk, every tap pooled):  {r['toolkit_images_s']:.1f} "
          f"images/s = {r['ratio']:.3f} of the forward pass ({r['repeats']} rounds, batch by batch in turn)")
    print(f"  MFLOPs to block10 {r['mflops']['block10']:.0f}, to the head {r['mflops']['head']:.0f} "
          f"({100 * (1 - r['mflops']['block10'] / r['mflops']['head']):.0f}% fewer)")
    for rows, s in r["stop_at_block10"].items():
        print(f"  batch {rows:>3} ({s['images']} images): to the head {s['head_ms']:.2f} ms/image, to block10 "
              f"{s['block10_ms']:.2f} ms/image: {100 * s['saved']:.0f}% saved")


def sizes(args) -> dict:
    """The tree at each input size, per seed, through the command line (each run a process of its own)."""
    config = (REPO / "configs" / "cifar100-6-pretrained.toml").read_text()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        path = out / f"tree-{size}.toml"
        path.write_text(_with_size(config, size))
        seeds = {}
        for seed in [int(s) for s in args.seeds.split(",")]:
            run = out / f"size-{size}" / f"seed-{seed}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "branching", "run", "--config", str(path), "--data", args.data,
                            "--out", str(run), "--seed", str(seed), "--no-download", "--quiet", "--no-report",
                            "--device", args.device], check=True, cwd=REPO)
            seeds[seed] = _figures(run, time.perf_counter() - start)
        rows[size] = seeds
        print(f"size {size}: " + "; ".join(f"seed {s}: {json.dumps(f['val'])}" for s, f in seeds.items()), flush=True)
    (out / "sizes.json").write_text(json.dumps(rows, indent=1))
    return rows


def _with_size(text: str, size: int) -> str:
    lines = [line for line in text.splitlines() if not line.startswith("image_size")]
    body = "\n".join(lines).replace("[data]\n", "")
    return f"[data]\nimage_size = {size}\n\n{body}\n"


def _figures(run: Path, seconds: float) -> dict:
    """Validation accuracy at the best epoch (parent head, branches), test accuracy, MFLOPs, encoding seconds."""
    from branching.tree.checkpoint import load_folder
    metrics = json.loads((run / "metrics.json").read_text())
    _, models = load_folder(run)
    val = {}
    for name, model in models.items():
        history = model.meta.history
        best = history.get("best_epoch") or 0
        val[name] = history["val_accuracy"][best - 1] if best and history.get("val_accuracy") else None
    test = {"parent": metrics["parent"]["test_accuracy"], "tree": metrics["tree"]["test_accuracy"],
            **{n: b["test_accuracy"] for n, b in metrics["branches"].items()}}
    return {"val": val, "val_samples": {n: len(m.meta.val_rows) for n, m in models.items()}, "test": test,
            "tree_mflops": metrics["tree"]["flops_per_image"] / 1e6, "encodings": metrics["data"].get("encodings"),
            "seconds": seconds}


def print_sizes(rows: dict) -> None:
    names = list(next(iter(next(iter(rows.values())).values()))["val"])
    print("size | " + " | ".join(f"val {n}" for n in names) + " | test tree | tree MFLOPs/image | encoding s")
    for size, seeds in rows.items():
        pooled = []
        for n in names:
            correct = sum(f["val"][n] * f["val_samples"][n] for f in seeds.values())
            total = sum(f["val_samples"][n] for f in seeds.values())
            pooled.append(f"{100 * correct / total:.2f}% ({total})")
        test = statistics.mean(f["test"]["tree"] for f in seeds.values())
        flops = statistics.mean(f["tree_mflops"] for f in seeds.values())
        seconds = [f["encodings"]["seconds"] for f in seeds.values() if f["encodings"] and f["encodings"]["seconds"]]
        print(f"{size} | " + " | ".join(pooled) + f" | {100 * test:.2f}% | {flops:.0f} | "
              f"{seconds[0] if seconds else float('nan'):.0f}")


def recipe(args) -> dict:
    """Validation accuracy of the parent's head and of each branch with and without mirror images (the recipe's
    `flip`), pooled over seeds: the choice is made on the images no node trains on."""
    from dataclasses import replace

    from branching.config.parse import parse_config
    from branching.config.recipes import get_recipe
    from branching.data.tree_data import load_tree_data
    from branching.train.nodes import train_branch, train_parent
    text = Path(args.config).read_text().replace("[parent]\n", "[parent]\nmirrors = true\n", 1)
    config = parse_config(text, args.config)  # the mirror images encoded, so that flip can use them
    data = load_tree_data(config, args.data, progress=False)
    base = get_recipe("default")
    rows = {}
    for flip in (True, False):
        node = replace(base.parent_for("pretrained"), flip=flip)
        recipe = replace(base, branch=replace(base.branch, flip=flip),
                         kinds=tuple((k, node if k == "pretrained" else r) for k, r in base.kinds))
        right: dict[str, list] = {}
        for seed in [int(s) for s in args.seeds.split(",")]:
            parent, meta, _ = train_parent(config, data, recipe, seed, progress=False)
            parent.meta = meta
            models = {"parent": parent}
            for spec in config.nodes()[1:]:
                model, branch_meta = train_branch(config, spec.name, models, data, recipe, seed, progress=False)
                model.meta, models[spec.name] = branch_meta, model
            for spec in config.nodes():
                right.setdefault(spec.name, []).append(_validation(config, spec.name, models, models[spec.name], data))
        rows[flip] = {name: (sum(r for r, _ in v), sum(n for _, n in v)) for name, v in right.items()}
        print(f"flip={flip}: " + ", ".join(f"{k} {100 * r / n:.2f}% ({n})" for k, (r, n) in rows[flip].items()),
              flush=True)
    return rows


def _validation(config, name, models, model, data) -> tuple[int, int]:
    """(right, total) of a node on the parent's validation rows of its classes."""
    from branching.models.forward import node_inputs
    from branching.train.nodes import held_out_rows, parent_normalizer
    spec = config.node(name)
    labels, rows = data.node_labels("train", spec)
    keep = np.isin(rows, held_out_rows(models["parent"]))
    X = parent_normalizer(models["parent"]).lazy(data.train.images)[rows[keep]]
    inputs = X if name == "parent" else node_inputs(models, name, X)
    return int((model.predict(inputs) == labels[keep]).sum()), int(keep.sum())


IMAGENET = {"beaver": {337}, "whale": {147, 148}, "wolf": {269, 270, 271, 272}}  # ImageNet's own class ids


def weights(args) -> dict:
    """The packaged weights checked on real images: top-1 and top-5 of the network's own ImageNet classifier on the
    test images of the classes ImageNet has (beaver; grey and killer whale; timber, white and red wolf and coyote),
    with the TF-Lite normalisation the trunk uses and with ImageNet's mean and std."""
    from branching.data.cifar import load_label_names, load_split
    from branching.models.kinds import get_kind
    torch.set_num_threads(args.threads)
    shape = get_kind("pretrained").check_shape({"model": args.model, "input_size": args.size})
    trunk = trunks.load_trunk(shape, torch.device("cpu"))
    test, names = load_split(args.data, "test"), load_label_names(args.data)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    found = {}
    for norm in ("tf-lite", "imagenet"):
        top1 = top5 = total = 0
        for name, ids in IMAGENET.items():
            images = torch.from_numpy(test.images[test.fine_labels == names.index(name)])
            for s in range(0, len(images), 8):
                with torch.inference_mode():
                    x = trunk.prepare(images[s:s + 8])
                    if norm == "imagenet":  # undo TF-Lite's, apply ImageNet's
                        x = ((x * trunk.info.std + trunk.info.mean) - mean) / std
                    logits = trunk.net(x.contiguous(memory_format=torch.channels_last))
                best = logits.topk(5, dim=1).indices.tolist()
                top1 += sum(row[0] in ids for row in best)
                top5 += sum(bool(set(row) & ids) for row in best)
                total += len(best)
        found[norm] = {"top1": top1 / total, "top5": top5 / total, "images": total}
        print(f"{args.model} at {args.size} px, {norm} normalisation: top-1 {100 * top1 / total:.1f}%, top-5 "
              f"{100 * top5 / total:.1f}% of {total} test images (beaver, whale, wolf)", flush=True)
    return found


def frontier(args) -> None:
    """The branches' test accuracy per tap against the MFLOPs to it, from compare.json, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    result = json.loads(Path(args.compare).read_text())
    figure, axes = plt.subplots(1, len(result["summary"]["branches"]), figsize=(6 * len(result["summary"]["branches"]), 4.2),
                                squeeze=False)
    for ax, (name, methods) in zip(axes[0], result["summary"]["branches"].items()):
        taps = []
        for key, row in methods.items():
            if key == "branch" or re.fullmatch(r"(stem|block\d+|head)_(avg|max)", key):
                acc = row["test_accuracy"]
                low, high = acc.get("ci95_seeds") or (acc["mean"], acc["mean"])
                taps.append((row["inference_flops"] / 1e6, acc["mean"], low, high, key))
        taps.sort()
        x = [t[0] for t in taps]
        ax.errorbar(x, [100 * t[1] for t in taps], yerr=[[100 * (t[1] - t[2]) for t in taps],
                                                         [100 * (t[3] - t[1]) for t in taps]], fmt="o-", ms=3)
        for t in taps:
            label = "configured" if t[4] == "branch" else t[4].rsplit("_", 1)[0]
            ax.annotate(label, (t[0], 100 * t[1]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        head = methods.get("parent_head")
        if head:
            ax.axhline(100 * head["test_accuracy"]["mean"], color="grey", ls="--", lw=1,
                       label="the parent's head on these classes")
            ax.legend(loc="lower right", fontsize=7)
        ax.set_xlabel("MFLOPs per image to the tap (and the branch)")
        ax.set_ylabel("test accuracy % (mean, 95% t interval over seeds)")
        ax.set_title(f"{name}: a branch on each tap")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "cifar100-6"))
    s.add_argument("--model", default="efficientnet-lite0")
    s.add_argument("--size", type=int, default=224)
    s.add_argument("--images", type=int, default=256)
    s.add_argument("--single", type=int, default=32, help="images timed one at a time")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--repeats", type=int, default=3)
    z = sub.add_parser("sizes")
    z.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "cifar100-6"))
    z.add_argument("--sizes", default="64,96,128,224")
    z.add_argument("--seeds", default="0,1,2")
    z.add_argument("--device", default="cpu")
    z.add_argument("--out", default="runs/pretrained-sizes")
    w = sub.add_parser("weights")
    w.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "cifar100-6"))
    w.add_argument("--model", default="efficientnet-lite0")
    w.add_argument("--size", type=int, default=224)
    w.add_argument("--threads", type=int, default=2)
    c = sub.add_parser("recipe")
    c.add_argument("--config", default=str(REPO / "configs" / "cifar100-6-pretrained.toml"))
    c.add_argument("--data", default=str(REPO / ".." / "shared" / "data" / "cifar100-6"))
    c.add_argument("--seeds", default="0,1,2")
    f = sub.add_parser("frontier")
    f.add_argument("--compare", required=True)
    f.add_argument("--out", default="runs/pretrained-frontier.png")
    args = parser.parse_args()
    if args.command == "speed":
        print_speed(speed(args))
    elif args.command == "sizes":
        print_sizes(sizes(args))
    elif args.command == "recipe":
        recipe(args)
    elif args.command == "weights":
        weights(args)
    else:
        frontier(args)


if __name__ == "__main__":
    main()
