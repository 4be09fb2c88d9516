"""Synthetic CIFAR-100 files in the official format, for the tests: smooth class templates plus noise.

The files are what the official cifar-100-python.tar.gz holds (pickled dicts with bytes keys), so the
project reads them through the same code as the real ones.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from branching.data.cifar import COARSE_LABEL_NAMES, COARSE_OF_FINE, FINE_LABEL_NAMES, N_PIXELS, resolve_classes
from branching.errors import DataError
from branching.fileio import write_bytes


def _pickle_to(path, obj) -> None:
    # Protocol 4: protocol 2 would pickle bytes via _codecs.encode, which safe_load refuses.
    write_bytes(path, pickle.dumps(obj, protocol=4))


def write_split(
    path, images, fine_labels, coarse_labels=None, filenames=None, batch_label="training batch 1 of 1"
) -> None:
    """Write a split in the official format (dict with bytes keys)."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    fine = [int(x) for x in fine_labels]
    if images.ndim != 2 or images.shape[1] != N_PIXELS or len(fine) != len(images):
        raise DataError(f"write_split needs uint8 images (N, 3072) and N labels, got {images.shape} and {len(fine)}")
    coarse = [COARSE_OF_FINE[x] for x in fine] if coarse_labels is None else [int(x) for x in coarse_labels]
    names = filenames if filenames is not None else [f"image_{i:05d}.png" for i in range(len(fine))]
    _pickle_to(path, {
        b"batch_label": batch_label.encode(),
        b"fine_labels": fine,
        b"coarse_labels": coarse,
        b"filenames": [n if isinstance(n, bytes) else str(n).encode() for n in names],
        b"data": images,
    })  # fmt: skip


def write_meta(path) -> None:
    """Write a meta file with the 100 fine and 20 coarse official names."""
    _pickle_to(path, {
        b"fine_label_names": [n.encode() for n in FINE_LABEL_NAMES],
        b"coarse_label_names": [n.encode() for n in COARSE_LABEL_NAMES],
    })  # fmt: skip


def _smooth_field(rng, shape=(3, 4, 4)) -> np.ndarray:
    """Random low-resolution field bilinearly upsampled to (3, 32, 32)."""
    low = rng.normal(size=shape)
    k = shape[-1]
    x = np.linspace(0, k - 1, 32)
    left = np.minimum(np.floor(x).astype(int), k - 2)
    weight = x - left
    up = np.zeros((32, k))
    up[np.arange(32), left] = 1 - weight
    up[np.arange(32), left + 1] = weight
    return up @ low @ up.T


def make_synthetic(data_dir, classes, n_train=50, n_test=20, seed=0, noise=60.0) -> Path:
    """Write train/test/meta for `classes` in the official format: smooth class templates plus noise."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    fine_ids = np.asarray(resolve_classes(classes, FINE_LABEL_NAMES), dtype=np.int64)
    rng = np.random.default_rng(seed)
    common = _smooth_field(rng)
    templates = np.stack([128 + 35 * common + 25 * _smooth_field(rng) for _ in fine_ids])
    splits = (("train", n_train, "training batch 1 of 1"), ("test", n_test, "testing batch 1 of 1"))
    for split, n, batch_label in splits:
        labels = rng.permutation(np.repeat(np.arange(len(fine_ids)), n))
        images = np.empty((len(labels), N_PIXELS), dtype=np.uint8)
        for row, label in enumerate(labels):
            shifted = np.roll(templates[label], tuple(rng.integers(-2, 3, size=2)), axis=(1, 2))
            nuisance = 50 * _smooth_field(rng) + rng.normal(0, 20) + rng.normal(0, noise, shifted.shape)
            image = 128 + rng.uniform(0.7, 1.3) * (shifted - 128) + nuisance
            images[row] = np.clip(np.rint(image), 0, 255).reshape(-1)
        fine = fine_ids[labels]
        counters: dict[int, int] = {}
        names = []
        for f in fine.tolist():
            counters[f] = counters.get(f, 0) + 1
            names.append(f"{FINE_LABEL_NAMES[f]}_synthetic_{counters[f]:05d}.png")
        write_split(data_dir / split, images, fine, filenames=names, batch_label=batch_label)
    write_meta(data_dir / "meta")
    return data_dir
