"""Inference speed of a tree, in one run: the original study's style, batched extraction, the routed tree.

    python benchmarks/bench_inference.py --models runs/deep/models --data ../shared/data/cifar100-6

prints images/s and per-image latency (batch 1) of each mode, peak memory, and the arithmetic limit:
the routed tree's forward FLOPs over the FLOP/s torch.matmul reaches on the same shapes in this run.
Without --models it times untrained models of --config's shapes on random images. The machine may be
shared: every figure is the best of --repeats interleaved rounds, and ratios are taken within the run.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from branching.config.parse import load_config
from branching.data.cifar import load_split
from branching.data.normalization import Normalizer
from branching.tree.checkpoint import load_folder
from branching.tree.routing import TreePredictor
from branching.tree.speed import (batched_extraction, chain_flops, chain_models, matmul_pass, original_style,
                                  peak_memory, random_tree, routed_shapes, seconds_per_call)

TARGET_SPEEDUP, TARGET_LIMIT_SHARE, TARGET_LATENCY_MS = 50.0, 0.5, 1.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="models folder of a run (default: untrained models of --config)")
    p.add_argument("--config", default="configs/cifar100-6-deep.toml")
    p.add_argument("--data", default=None, help="CIFAR-100 folder whose test images to use (default: random pixels)")
    p.add_argument("--branch", default=None, help="the branch the single-branch modes answer (default: the deepest)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--images", type=int, default=8192, help="images per throughput measurement")
    p.add_argument("--single", type=int, default=200, help="images answered one at a time per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    load_start = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.models:
        config, models = load_folder(args.models)
        source = f"trained models in {args.models}"
    else:
        config = load_config(args.config)
        models = random_tree(config)
        source = f"untrained models of {args.config}"
    if args.data:
        test = load_split(args.data, "test").images
        pixels = f"{len(test)} test images of {args.data}"
    else:
        test = np.random.default_rng(0).integers(0, 256, (1000, 3072), dtype=np.uint8)
        pixels = "random pixels"
    leaf = args.branch or max(config.branches, key=config.depth)
    chain = chain_models(models, leaf)
    normalizer = Normalizer.from_dict(models["parent"].meta.normalization)
    predictor = TreePredictor(config, models)
    images = np.resize(test, (args.images, test.shape[1]))
    single = images[:args.single]
    bs = args.batch_size
    torch.set_grad_enabled(False)
    print(f"{source}; {pixels}; branch {' > '.join(config.chain(leaf))}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    # the modes must agree before they are timed
    orig = original_style(chain, normalizer, single)
    batch = batched_extraction(chain, normalizer, single, bs)
    assert np.array_equal(orig[0], batch[0]) and np.allclose(orig[1], batch[1], atol=1e-4), "modes disagree"
    routed = predictor.predict(test, bs)
    assert np.array_equal(predictor.predict(single, 1).predicted, predictor.predict(single, bs).predicted)
    reached = routed.reached()

    timings = {k: float("inf") for k in ("orig", "extract", "extract1", "tree", "tree1", "matmul", "bf16")}
    shapes = routed_shapes(predictor, reached, len(test), bs)
    matmuls, matmuls_bf16 = matmul_pass(shapes), matmul_pass(shapes, torch.bfloat16)
    for _ in range(args.repeats):  # interleaved rounds: every mode sees the same load
        timings["orig"] = min(timings["orig"], seconds_per_call(lambda: original_style(chain, normalizer, single), 1)
                              / len(single))
        timings["extract"] = min(timings["extract"], seconds_per_call(
            lambda: batched_extraction(chain, normalizer, images, bs), 1) / len(images))
        timings["extract1"] = min(timings["extract1"], seconds_per_call(
            lambda: [batched_extraction(chain, normalizer, x[None], 1) for x in single], 1) / len(single))
        timings["tree"] = min(timings["tree"], seconds_per_call(lambda: predictor.predict(images, bs), 1) / len(images))
        timings["tree1"] = min(timings["tree1"], seconds_per_call(
            lambda: [predictor.predict(x[None], 1) for x in single], 1) / len(single))
        timings["matmul"] = min(timings["matmul"], seconds_per_call(matmuls, 3) / bs)
        timings["bf16"] = min(timings["bf16"], seconds_per_call(matmuls_bf16, 3) / bs)

    _, mem_orig, _ = peak_memory(lambda: original_style(chain, normalizer, single))
    _, mem_extract, _ = peak_memory(lambda: batched_extraction(chain, normalizer, images, bs))
    _, mem_tree, _ = peak_memory(lambda: predictor.predict(images, bs))
    many = np.resize(test, (10 * args.images, test.shape[1]))
    _, mem_tree_many, peak_rss = peak_memory(lambda: predictor.predict(many, bs))

    tree_flops = predictor.flops_per_image(reached, len(test))
    matmul_flops = sum(2 * r * a * b for r, a, b in shapes) / bs
    matmul_rate = matmul_flops / timings["matmul"]
    limit = matmul_rate / tree_flops  # images/s if the tree ran at torch.matmul's speed
    mib = lambda v: "n/a" if v is None else f"{v:.1f} MiB"  # noqa: E731
    rows = [("original style (1 image, hooks, whole models)", timings["orig"], chain_flops(chain, True), mem_orig),
            (f"batched extraction (torchly, batch {bs})", timings["extract"], chain_flops(chain, False), mem_extract),
            (f"routed tree (batch {bs})", timings["tree"], tree_flops, mem_tree)]
    print(f"\n{'mode':<48} {'images/s':>10} {'us/image':>9} {'MFLOP/image':>12} {'GFLOP/s':>8} {'peak mem':>10}")
    for name, seconds, flops, mem in rows:
        print(f"{name:<48} {1 / seconds:>10.0f} {1e6 * seconds:>9.1f} {flops / 1e6:>12.2f} "
              f"{flops / seconds / 1e9:>8.2f} {mib(mem):>10}")
    print(f"\nlatency, one image per call: original style {1e3 * timings['orig']:.3f} ms, batched extraction "
          f"{1e3 * timings['extract1']:.3f} ms, routed tree {1e3 * timings['tree1']:.3f} ms "
          f"(target < {TARGET_LATENCY_MS:g} ms)")
    if models["parent"].kind != "mlp":
        print(f"arithmetic limit: not measured for a {models['parent'].kind} parent (it counts matrix products "
              f"of Linear layers only; the figures below use the branches' alone)")
    print(f"arithmetic limit: torch.matmul reaches {matmul_rate / 1e9:.2f} GFLOP/s on the routed tree's shapes at "
          f"batch {bs}; at {tree_flops / 1e6:.2f} MFLOP/image that is {limit:.0f} images/s")
    print(f"routed tree / original style: {timings['orig'] / timings['tree']:.1f}x (target >= {TARGET_SPEEDUP:g}x); "
          f"routed tree / arithmetic limit: {1 / timings['tree'] / limit:.2f} (target >= {TARGET_LIMIT_SHARE:g}); "
          f"the limit itself is {limit * timings['orig']:.1f}x the original style")
    print(f"memory: routed tree over {args.images} images {mib(mem_tree)} above its start, over {10 * args.images} "
          f"{mib(mem_tree_many)} (inputs excluded; outputs are 37 bytes/image); process peak {peak_rss:.0f} MiB")
    print(f"not used: torch.matmul in bfloat16 on the same shapes reaches {matmul_flops / timings['bf16'] / 1e9:.2f} "
          f"GFLOP/s ({timings['matmul'] / timings['bf16']:.1f}x float32), at the cost of rounding every weight")
    print("routing on the test images: " + ", ".join(f"{k} {v}" for k, v in reached.items()))
    print(f"load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
