"""The six real CIFAR-100 classes as a user's own photos: JPEGs and PNGs of varied sizes and modes in nested
group folders, then `branching init` and `branching run` with an MLP and a CNN parent at 32 and 64 pixels,
over several seeds, against the same trees on CIFAR-100's own files.

    python benchmarks/real_photos.py --data ../shared/data/cifar100-6 --out runs/real-photos --seeds 0,1,2

The photos: every image of the pickles, upscaled (bicubic) to a random size from 40 to 160 pixels a side
(aspect ratios from 3:4 to 4:3, seeded), saved as JPEG (quality 90) in most cases and otherwise as an RGBA
PNG, a palette PNG, a CMYK JPEG or a JPEG stored rotated with its EXIF orientation tag, under

    train/animals/aquatic/{beaver,whale}  train/animals/wolf
    train/plants/sunflower                train/plants/trees/{forest,oak_tree}     (and the same in test/)

`branching init` writes the tree (a parent over six classes, branches animals > aquatic and plants >
trees); the script sets each kind's parent network and its branches' taps as the configs do
(configs/cifar100-6.toml, -cnn.toml and -pretrained.toml; a branch of a branch reads its source's hidden layer
as in -deep.toml). The pretrained parent at its own size: --kinds pretrained --sizes 224 (its CIFAR-files run
resizes the 32-pixel images to 224 too). Test accuracy, per seed and as mean ± std, goes to OUT/real-photos.json and as a table to
stdout. With 600 test images, a 95% interval is about ±2 to ±3 points per seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

GROUPS = {"beaver": "animals/aquatic", "whale": "animals/aquatic", "wolf": "animals", "sunflower": "plants",
          "forest": "plants/trees", "oak_tree": "plants/trees"}
KINDS = {"mlp": ("hidden = [1024, 512]", "layer = 1\nhidden = [256]"),
         "cnn": ('kind = "cnn"\nwidths = [32, 64, 128]\ndepth = 2', 'layer = -1\npool = "avg"\nhidden = [256]'),
         "pretrained": ('kind = "pretrained"\nmodel = "efficientnet-lite0"', 'layer = "block10"\npool = "avg"\nhidden = [256]')}


def write_photos(data: Path, root: Path, seed: int = 0) -> Path:
    """The pickles' images as photo folders (see the module's docstring); skipped if already written."""
    from PIL import Image

    from branching.data.cifar import load_label_names, load_split

    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(seed)
    names = load_label_names(data)
    for split in ("train", "test"):
        part = load_split(data, split)
        for i, (pixels, label) in enumerate(zip(part.images, part.fine_labels)):
            name = names[label]
            folder = root / split / GROUPS[name] / name
            folder.mkdir(parents=True, exist_ok=True)
            side = int(rng.integers(40, 161))
            aspect = rng.uniform(0.75, 4 / 3)
            size = (side, max(8, int(round(side * aspect))))
            image = Image.fromarray(pixels.reshape(3, 32, 32).transpose(1, 2, 0)).resize(size, Image.Resampling.BICUBIC)
            form = rng.choice(["jpeg", "rgba", "palette", "cmyk", "exif"], p=[0.6, 0.1, 0.1, 0.1, 0.1])
            stem = folder / f"{i:05d}"
            if form == "jpeg":
                image.save(stem.with_suffix(".jpg"), quality=90)
            elif form == "rgba":
                image.convert("RGBA").save(stem.with_suffix(".png"))
            elif form == "palette":
                image.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(stem.with_suffix(".png"))
            elif form == "cmyk":
                image.convert("CMYK").save(stem.with_suffix(".jpg"), quality=90)
            else:  # stored turned a quarter, with the tag that turns it back
                exif = Image.Exif()
                exif[0x0112] = 6
                image.rotate(90, expand=True).save(stem.with_suffix(".jpg"), quality=90, exif=exif)
    (root / "done").write_text("")
    return root


def tree_for(kind: str, init_text: str) -> str:
    """The tree init wrote, with the parent's network and the branches' taps of configs/cifar100-6*.toml."""
    parent, branch = KINDS[kind]
    text = init_text.replace("[parent]\n", f"[parent]\n{parent}\n", 1)
    out = []
    for block in text.split("\n\n"):
        if block.lstrip().startswith("[branches."):  # a branch of a branch reads its source's hidden layer
            block += "\nlayer = 0\nhidden = [64]" if "\nfrom = " in block else f"\n{branch}"
        out.append(block)
    return "\n\n".join(out)


def cifar_tree(kind: str, init_text: str) -> str:
    """The same tree for CIFAR-100's files: no [data] table (32 pixels)."""
    lines = tree_for(kind, init_text).splitlines()
    return "\n".join(line for line in lines if not line.startswith(("[data]", "image_size")))


def branching(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "branching", *args], check=True, stdout=subprocess.DEVNULL)


def figures(metrics: dict) -> dict:
    row = {"parent": metrics["parent"]["test_accuracy"], "tree": metrics["tree"]["test_accuracy"],
           "tree_coverage": metrics["tree"]["coverage"]}
    row.update({name: b["test_accuracy"] for name, b in metrics["branches"].items()})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="../shared/data/cifar100-6", help="CIFAR-100 files of the six classes")
    parser.add_argument("--out", default="runs/real-photos", help="photos, trees and runs (default runs/real-photos)")
    parser.add_argument("--seeds", default="0,1,2", help="seeds (default 0,1,2)")
    parser.add_argument("--kinds", default="mlp,cnn", help="parent kinds (default mlp,cnn)")
    parser.add_argument("--sizes", default="32,64", help="image sizes (default 32,64)")
    args = parser.parse_args()
    out = Path(args.out)
    photos = write_photos(Path(args.data), out / "photos")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, dict] = {}
    for kind in args.kinds.split(","):
        for size in [*map(int, args.sizes.split(",")), "cifar"]:
            name = f"{kind}-{size}"
            init = out / f"init-{size}.toml"
            branching("init", "--data", str(photos), "--out", str(init), "--force", "--image-size",
                      str(32 if size == "cifar" else size))
            tree = out / f"{name}.toml"
            text = init.read_text()
            tree.write_text(cifar_tree(kind, text) if size == "cifar" else tree_for(kind, text))
            data = args.data if size == "cifar" else str(photos)
            per_seed = []
            for seed in seeds:
                run = out / name / f"seed-{seed}"
                branching("run", "--config", str(tree), "--data", data, "--out", str(run), "--seed", str(seed),
                          "--quiet", "--no-report", "--no-download")
                per_seed.append(figures(json.loads((run / "metrics.json").read_text())))
                print(f"{name} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_seed[-1].items()), flush=True)
            results[name] = {"seeds": per_seed, "mean": {k: statistics.mean(r[k] for r in per_seed) for k in per_seed[0]},
                             "std": {k: statistics.stdev(r[k] for r in per_seed) if len(per_seed) > 1 else 0.0
                                     for k in per_seed[0]}}
            (out / "real-photos.json").write_text(json.dumps(results, indent=1))
    columns = list(next(iter(results.values()))["mean"])
    print("\n| parent, images | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, r in results.items():
        label = name.replace("-cifar", ", CIFAR files (32 px)").replace("-", ", photos at ") + ("" if "cifar" in name else " px")
        print(f"| {label} | " + " | ".join(f"{100 * r['mean'][c]:.1f} ± {100 * r['std'][c]:.1f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
