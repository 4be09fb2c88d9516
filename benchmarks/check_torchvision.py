"""Check a torchvision network as a module parent, where torchvision is installed (it is not a dependency).

    python benchmarks/check_torchvision.py --data ../shared/data/cifar100-6 --input-size 224 --device auto

Builds torchvision.models:resnet18 with random weights (weights=None: nothing is downloaded), saves its
state_dict to a temporary file, and with it as `kind = "module"` parent of the six-class tree:
checks the config (the module built on the meta device, the weights matched), times the taps as
probe-layers reads them (one tap per pass, on --images training images), then runs `branching run` with
--max-epochs and prints the timings. Random weights make the accuracies meaningless: this checks that
it works and how fast. Without torchvision it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

CLASSES = ["beaver", "whale", "wolf", "sunflower", "forest", "oak_tree"]
TAPS = ("layer1", "layer2", "layer3", "layer4", "avgpool")
TREE = """
[parent]
classes = {classes}
kind = "module"
module = "torchvision.models:resnet18"
kwargs = {{ num_classes = 6 }}
weights = "{weights}"
input_size = {size}
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[branches.mammals]
classes = ["beaver", "whale", "wolf"]
layer = "layer3"
pool = "avg"

[branches.plants]
classes = ["sunflower", "forest", "oak_tree"]
layer = "layer4"
pool = "avg"
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="CIFAR-100 folder with the six classes")
    parser.add_argument("--input-size", type=int, default=64, help="images resized to this side (default 64)")
    parser.add_argument("--images", type=int, default=512, help="training images per timed tap (default 512)")
    parser.add_argument("--max-epochs", type=int, default=1, help="epochs of the branches in the run (default 1)")
    parser.add_argument("--device", default="auto", help="where the branches train: auto, cpu, cuda")
    args = parser.parse_args(argv)
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001 - ImportError, or a wheel that does not load with this torch
        print(f"torchvision is not importable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"nothing to check. Run this where torchvision is installed.")
        return 0
    import torch

    from branching.cli import main as cli
    from branching.config.parse import load_config
    from branching.config.recipes import get_recipe
    from branching.data.tree_data import load_tree_data
    from branching.models.forward import extract
    from branching.train.nodes import train_parent

    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}, "
          f"{torch.get_num_threads()} CPU threads")
    with tempfile.TemporaryDirectory(prefix="check-torchvision-") as scratch:
        scratch = Path(scratch)
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(num_classes=6).state_dict(), scratch / "resnet18.pt")
        tree = scratch / "tree.toml"
        tree.write_text(TREE.format(classes=json.dumps(CLASSES), weights=scratch / "resnet18.pt",
                                    size=args.input_size))
        start = time.perf_counter()
        config = load_config(tree)
        print(f"config checked (module built, weights matched, taps found) in {time.perf_counter() - start:.2f} s")

        data = load_tree_data(config, args.data)
        start = time.perf_counter()
        parent, meta, normalizer = train_parent(config, data, get_recipe("default", 1), seed=0, progress=False)
        parent.meta = meta
        print(f"parent built and loaded in {time.perf_counter() - start:.2f} s; {len(parent.feature_info)} taps: "
              f"{', '.join(i['name'] for i in parent.feature_info)}")
        images = data.node_rows("train", config.parent)[0][:args.images]
        X = normalizer.transform(images)
        print(f"\ntaps, one per pass, {len(X)} images at {args.input_size}x{args.input_size} (CPU, as probe-layers):")
        for name in TAPS:
            start = time.perf_counter()
            features = extract({"parent": parent}, [("parent", name, None)], X)[0]
            seconds = time.perf_counter() - start
            print(f"  {name:8s} shape {'x'.join(map(str, parent.tap(name)['shape'])):>10s}  width {features.shape[1]:4d}"
                  f"  {seconds:6.2f} s  {len(X) / seconds:8.0f} images/s")

        out = scratch / "run"
        start = time.perf_counter()
        status = cli.main(["run", "--config", str(tree), "--data", str(args.data), "--out", str(out), "--max-epochs",
                           str(args.max_epochs), "--quiet", "--no-download", "--no-report", "--device", args.device])
        seconds = time.perf_counter() - start
        if status != 0:
            print(f"run failed (exit status {status})")
            return status
        metrics = json.loads((out / "metrics.json").read_text())
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in metrics["timings"].items())
        print(f"\nrun with --max-epochs {args.max_epochs} on {metrics['device']}: {seconds:.1f} s ({timings})")
        for name, m in metrics["branches"].items():
            print(f"  {name}: test accuracy {100 * m['test_accuracy']:.1f}% (random weights: no meaning)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
