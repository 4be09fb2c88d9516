"""How far a pretrained tree's answers to CIFAR's 32-pixel images move with the way they are enlarged: `run` enlarges
them inside the trunk (torch, antialiased bilinear, on the normalised floats), `branching.load(RUN)` given the same
pixels (or their PNG files) enlarges them with Pillow to whole 8-bit pixels first, as it prepares every image file.

    python benchmarks/check_resize.py --models runs/bench-exits-c6/seed-0 --data ../shared/data/cifar100-6 --n 200

Prints, for the tree by its full trunk and (if it has exits) by its cascade: the largest difference of a
probability, and how many inputs got another label, path or acceptance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import branching  # noqa: E402
from branching.data.cifar import load_split  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", required=True, help="a run of a pretrained image tree on CIFAR's files")
    p.add_argument("--data", required=True, help="the CIFAR folder it was trained on")
    p.add_argument("--n", type=int, default=200, help="test images (default 200)")
    args = p.parse_args(argv)
    rows = load_split(args.data, "test").images[:args.n]  # (N, 3 * 32 * 32) uint8
    for exits in (False, True):
        tree = branching.load(args.models, "cpu", exits=exits)
        if exits and tree.cascade is None:
            continue
        # run's way: the 32-pixel rows through the trunk, which enlarges them (the cascade: run tap by tap on them)
        ours = tree.predictor.predict(rows) if exits else tree.forward(tree.encode(rows))
        theirs = tree.forward(tree.preprocess(rows))  # the API's way: Pillow to the tree's side first
        paths = [(ours.chains[a], ours.accepted[i], ours.predicted[i]) != (theirs.chains[b], theirs.accepted[i],
                                                                              theirs.predicted[i])
                 for i, (a, b) in enumerate(zip(ours.final_node, theirs.final_node))]
        print(f"{'cascade' if exits else 'full trunk'}: {len(rows)} test images; largest probability difference "
              f"{np.abs(ours.probabilities - theirs.probabilities).max():.3f}; another label, path or acceptance on "
              f"{sum(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
