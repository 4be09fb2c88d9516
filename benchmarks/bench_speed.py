"""Training at the hardware's speed: images/s, achieved FLOP/s and its share of the device's peak, per kind.

    python benchmarks/bench_speed.py --data ../shared/data/cifar100-6 --kinds mlp,cnn,vit --device cpu
    python benchmarks/bench_speed.py --images 50000 --kinds mlp,cnn,vit --device cuda --compile --run-data DATA

For each parent kind (configs/cifar100-6-<kind>.toml, the default recipe: its batch size, flips and shifts),
Model.fit trains on the uint8 training images of --data, or on --images random ones, for --epochs after one
warm-up epoch, without validation. Reported:
- training images/s, timed with CUDA events on a GPU (perf_counter on a CPU);
- FLOPs per trained image, counted by torch (torch.utils.flop_counter) on one training step: forward and
  backward, 2 per multiply-add;
- achieved FLOP/s = images/s x FLOPs per image, and its share of the device's peak, which is a dense matmul
  of the training dtype (bfloat16 under autocast on a GPU that has it, float32 elsewhere) measured here;
- with --compile, the same with the network through torch.compile (its compile time left out);
- with --run-data, the wall time of a whole `branching run` of configs/cifar100-6-cnn.toml (parent, branches,
  evaluation, no report), after the device is started.
Figures are the best of --repeats; the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from branching.config.parse import load_config
from branching.config.recipes import get_recipe
from branching.data.normalization import Normalizer
from branching.data.tree_data import load_tree_data
from branching.models.device import autocast, resolve_device
from branching.models.forward import augment_transform
from branching.models.model import Model
from branching.tables import MARKDOWN, table

CONFIGS = {"mlp": "configs/cifar100-6.toml", "cnn": "configs/cifar100-6-cnn.toml", "vit": "configs/cifar100-6-vit.toml"}


def parent_model(config, seed=0) -> Model:
    spec, width = config.parent, config.input_width
    if spec.kind == "mlp":
        return Model([width, *spec.hidden, len(spec.classes)], activation=spec.activation, seed=seed)
    return Model([width, len(spec.classes)], seed=seed, kind=spec.kind, shape=spec.shape_dict)


def training_images(config, data, images: int, seed: int = 0):
    """(uint8 images, labels): the parent's training images of `data`, or `images` random ones."""
    if data:
        pixels, labels, _ = load_tree_data(config, data).node_rows("train", config.parent)
        return np.ascontiguousarray(pixels), labels.astype(np.int64)
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (images, config.input_width), dtype=np.uint8),
            rng.integers(0, len(config.parent.classes), images).astype(np.int64))


def flops_per_trained_image(model: Model, batch: int, device) -> int:
    """FLOPs of one training step (forward and backward) over a batch, per image, as torch counts them."""
    net = model.net.to(device).train()
    x = torch.zeros(batch, model.architecture[0], device=device)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        with autocast(device):
            loss = F.cross_entropy(net(x).float(), y)
        loss.backward()
    net.zero_grad(set_to_none=True)
    net.to("cpu")
    return counter.get_total_flops() // batch


def matmul_peak(device, dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of a dense size x size matmul of `dtype` on `device`: the best of `repeats`."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    calls = 8 if device.type == "cuda" else 2
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        seconds = timed(lambda: [torch.matmul(a, b) for _ in range(calls)], device)
        best = min(best, seconds / calls)
    return 2 * size ** 3 / best


def timed(fn, device) -> float:
    """Seconds fn takes: CUDA events on a GPU (the device's own clock), perf_counter on a CPU."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / 1000


def training_rate(config, pixels, labels, device, epochs, repeats, compile_net) -> float:
    """Training images/s of Model.fit on the images (the best of `repeats` runs of `epochs` epochs)."""
    kind = config.parent.kind
    r = get_recipe("default").parent_for(kind).on(device)  # on a GPU, its GPU batch size and rate
    normalizer = Normalizer.fit(pixels, per_channel=kind != "mlp")
    X = normalizer.lazy(pixels)
    transform = augment_transform(normalizer, r.flip, r.crop) if r.flip or r.crop else None
    model = parent_model(config)
    fit = dict(batch_size=r.batch_size, lr=r.lr, weight_decay=r.weight_decay, optimizer=r.optimizer,
               label_smoothing=r.label_smoothing, lr_schedule=r.lr_schedule, train_transform=transform, seed=0,
               progress=False, device=device, compile=compile_net)
    model.fit(X, labels, epochs=1, **fit)  # warm-up: allocator, kernels, compilation
    best = float("inf")
    for _ in range(repeats):
        best = min(best, timed(lambda: model.fit(X, labels, epochs=epochs, **fit), device))
    return len(pixels) * epochs / best


def whole_run(data, device) -> float:
    """Seconds of `branching run` of the six-class CNN tree (parent, branches, evaluation, no report)."""
    from branching.train.run import run

    with tempfile.TemporaryDirectory(prefix="bench-speed-") as out:
        start = time.perf_counter()
        run(load_config(CONFIGS["cnn"]), data, f"{out}/run", get_recipe("default"), seed=0, progress=False,
            report=False, echo=lambda _: None, device=device)
        return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="CIFAR-100 folder whose training images to use")
    p.add_argument("--images", type=int, default=20000, help="random training images without --data (default 20000)")
    p.add_argument("--kinds", default="mlp,cnn,vit")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--epochs", type=int, default=2, help="epochs per measurement (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="measurements per figure; the best counts (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    p.add_argument("--run-data", default=None, help="also time a whole run of the six-class CNN tree on this folder")
    p.add_argument("--json", default=None, help="write the figures to this file too")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}: dense {str(dtype).replace('torch.', '')} matmul peak "
          f"{peak / 1e12:.3f} TFLOP/s", flush=True)
    rows, figures = [], {"device": name, "dtype": str(dtype), "peak_flops": peak, "kinds": {}}
    for kind in args.kinds.split(","):
        config = load_config(CONFIGS[kind])
        pixels, labels = training_images(config, args.data, args.images)
        batch = get_recipe("default").parent_for(kind).on(device).batch_size
        flops = flops_per_trained_image(parent_model(config), batch, device)
        for compile_net in (False, True) if args.compile else (False,):
            rate = training_rate(config, pixels, labels, device, args.epochs, args.repeats, compile_net)
            label = kind + (" compiled" if compile_net else "")
            figures["kinds"][label] = {"images_per_s": rate, "flops_per_image": flops, "flops_per_s": rate * flops,
                                       "share_of_peak": rate * flops / peak, "images": len(pixels), "batch": batch}
            rows.append([label, f"{len(pixels):,}", batch, f"{rate:,.0f}", f"{flops / 1e6:,.1f}",
                         f"{rate * flops / 1e12:.3f}", f"{100 * rate * flops / peak:.1f}%"])
            print(f"{label}: {rate:,.0f} images/s", flush=True)
    print(table(["parent", "images", "batch", "training images/s", "MFLOP per trained image", "TFLOP/s",
                 "share of matmul peak"], rows, MARKDOWN))
    if args.run_data:
        seconds = whole_run(args.run_data, device)
        figures["cnn_run_seconds"] = seconds
        print(f"whole run of the six-class CNN tree on {device}: {seconds:.1f} s (after start-up)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
