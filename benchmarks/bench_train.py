"""Parent training speed against its limit: Model.fit against a bare torch loop that trains the same
network on the same tensors, with the same batches, optimiser, schedule and augmentation.

    python benchmarks/bench_train.py --data ../shared/data/cifar100-6 --kind cnn --epochs 2 --repeats 3

Both train the parent of configs/cifar100-6-<kind>.toml with the default recipe (flips, 4-pixel crops,
AdamW, one-cycle, label smoothing) on the uint8 training images, normalised and augmented batch by batch on
the device (branching.models.batches), without validation, so that the two do the same work; they alternate, `--repeats` times each, and the figure is the median of the
paired ratios (fit's images/s over the bare loop's), measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from branching.config.parse import load_config
from branching.config.recipes import get_recipe
from branching.data.normalization import Normalizer
from branching.data.tree_data import load_tree_data
from branching.models.batches import DeviceInputs
from branching.models.device import autocast, resolve_device
from branching.models.forward import augment_transform
from branching.models.model import Model
from branching.models.training import make_optimizer, make_scheduler

CONFIGS = {"mlp": "configs/cifar100-6.toml", "cnn": "configs/cifar100-6-cnn.toml", "vit": "configs/cifar100-6-vit.toml"}


def build(config, X, seed) -> Model:
    spec = config.parent
    if spec.kind == "mlp":
        return Model([X.shape[1], *spec.hidden, len(spec.classes)], activation=spec.activation, seed=seed)
    return Model([X.shape[1], len(spec.classes)], seed=seed, kind=spec.kind, shape=spec.shape_dict)


def with_fit(config, X, y, r, transform, epochs, device) -> float:
    model = build(config, X, 0)
    start = time.perf_counter()
    model.fit(X, y, epochs=epochs, batch_size=r.batch_size, lr=r.lr, weight_decay=r.weight_decay,
              optimizer=r.optimizer, label_smoothing=r.label_smoothing, lr_schedule=r.lr_schedule,
              train_transform=transform, seed=0, progress=False, device=device)
    return len(X) * epochs / (time.perf_counter() - start)


def bare_loop(config, X, y, r, transform, epochs, device) -> float:
    """The limit: the same network, batches, optimiser, schedule and augmentation, nothing else."""
    net = build(config, X, 0).net.to(device).train()
    opt = make_optimizer(r.optimizer, list(net.parameters()), r.lr, r.weight_decay)
    scheduler = make_scheduler(r.lr_schedule, opt, r.lr, epochs * math.ceil(len(X) / r.batch_size))
    inputs = DeviceInputs(X, device)
    yt = torch.from_numpy(y).to(device)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(X), generator=generator).to(inputs.index_device).split(r.batch_size):
            xb = transform.batch(inputs, idx, generator) if transform is not None else inputs.rows(idx)
            with autocast(device):
                loss = F.cross_entropy(net(xb).float(), yt[idx.to(device)], label_smoothing=r.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(X) * epochs / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="CIFAR-100 folder (e.g. ../shared/data/cifar100-6)")
    p.add_argument("--kind", default="cnn", choices=sorted(CONFIGS), help="the parent's kind (default cnn)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per measurement (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="pairs of measurements (default 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = load_config(CONFIGS[args.kind])
    r = get_recipe("default").parent_for(config.parent.kind).on(device)
    images, labels, _ = load_tree_data(config, args.data).node_rows("train", config.parent)
    normalizer = Normalizer.fit(images, per_channel=config.parent.kind != "mlp")
    X, y = normalizer.lazy(np.ascontiguousarray(images)), labels.astype(np.int64)
    transform = augment_transform(normalizer, r.flip, r.crop) if r.flip or r.crop else None
    ratios, fits, bares = [], [], []
    for i in range(args.repeats):
        pair = [("fit", with_fit), ("bare", bare_loop)][:: 1 if i % 2 == 0 else -1]  # alternate the order
        rates = {name: fn(config, X, y, r, transform, args.epochs, device) for name, fn in pair}
        fits.append(rates["fit"])
        bares.append(rates["bare"])
        ratios.append(rates["fit"] / rates["bare"])
        print(f"repeat {i}: Model.fit {rates['fit']:,.0f} images/s, bare loop {rates['bare']:,.0f} images/s, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"\n{args.kind} parent, {len(X)} training images, batch {r.batch_size}, {args.epochs} epochs, on {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"Model.fit: median {statistics.median(fits):,.0f} images/s; bare loop: median {statistics.median(bares):,.0f}"
          f" images/s; median paired ratio {statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
