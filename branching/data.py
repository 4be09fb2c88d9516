"""CIFAR-100 official python files: safe loading, splits, class names and selection, synthetic data.

Downloading lives in branching/download.py, normalisation in branching/normalization.py.
"""

from __future__ import annotations

import difflib
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from branching.download import how_to_get
from branching.errors import DataError

N_PIXELS = 3072

FINE_LABEL_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

# Official superclasses (coarse id = position) and their five fine classes each.
_SUPERCLASSES = (
    ("aquatic_mammals", "beaver dolphin otter seal whale"),
    ("fish", "aquarium_fish flatfish ray shark trout"),
    ("flowers", "orchid poppy rose sunflower tulip"),
    ("food_containers", "bottle bowl can cup plate"),
    ("fruit_and_vegetables", "apple mushroom orange pear sweet_pepper"),
    ("household_electrical_devices", "clock keyboard lamp telephone television"),
    ("household_furniture", "bed chair couch table wardrobe"),
    ("insects", "bee beetle butterfly caterpillar cockroach"),
    ("large_carnivores", "bear leopard lion tiger wolf"),
    ("large_man-made_outdoor_things", "bridge castle house road skyscraper"),
    ("large_natural_outdoor_scenes", "cloud forest mountain plain sea"),
    ("large_omnivores_and_herbivores", "camel cattle chimpanzee elephant kangaroo"),
    ("medium_mammals", "fox porcupine possum raccoon skunk"),
    ("non-insect_invertebrates", "crab lobster snail spider worm"),
    ("people", "baby boy girl man woman"),
    ("reptiles", "crocodile dinosaur lizard snake turtle"),
    ("small_mammals", "hamster mouse rabbit shrew squirrel"),
    ("trees", "maple_tree oak_tree palm_tree pine_tree willow_tree"),
    ("vehicles_1", "bicycle bus motorcycle pickup_truck train"),
    ("vehicles_2", "lawn_mower rocket streetcar tank tractor"),
)
COARSE_LABEL_NAMES = tuple(coarse for coarse, _ in _SUPERCLASSES)
_COARSE_BY_FINE_NAME = {fine: c for c, (_, fines) in enumerate(_SUPERCLASSES) for fine in fines.split()}
COARSE_OF_FINE = tuple(_COARSE_BY_FINE_NAME[name] for name in FINE_LABEL_NAMES)


# ---------------------------------------------------------------- safe loading
def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals the official CIFAR-100 files reference."""

    def __init__(self, file, path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load {self.path}: it asks for {module}.{name}, "
                "which no CIFAR-100 file contains; it may be malicious"
            ) from None


def safe_load(path):
    """Unpickle an official CIFAR-100 file, refusing anything but plain data and numpy arrays."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, path).load()
    except FileNotFoundError:
        raise DataError(f"missing CIFAR-100 file {path}; {how_to_get(path.parent)}") from None
    except DataError:
        raise
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}); check that it is a readable file") from None
    except Exception as e:  # EOFError, UnpicklingError, ValueError, ...: bad bytes
        raise DataError(
            f"{path} is truncated or corrupt ({type(e).__name__}); delete it and download it again"
        ) from None


# ---------------------------------------------------------------- splits and classes
@dataclass
class Split:
    """One split: uint8 images (N, 3072), official fine labels int64 (N,), file names."""

    images: np.ndarray
    fine_labels: np.ndarray
    filenames: list[str]


def _decode(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def load_split(data_dir, split) -> Split:
    """Load and validate the official `train` or `test` file in data_dir."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    path = Path(data_dir) / split
    raw = safe_load(path)
    if not isinstance(raw, dict) or b"data" not in raw or b"fine_labels" not in raw:
        raise DataError(f"{path} is not a CIFAR-100 split (no b'data' and b'fine_labels'); {how_to_get(data_dir)}")
    images = raw[b"data"]
    is_array = isinstance(images, np.ndarray)
    if not is_array or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != N_PIXELS:
        got = f"{images.dtype} {images.shape}" if is_array else type(images).__name__
        raise DataError(
            f"{path}: data is {got}, expected uint8 (N, 3072) rows of 1024 R, 1024 G, 1024 B; {how_to_get(data_dir)}"
        )
    try:
        labels = np.asarray(raw[b"fine_labels"], dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{path}: fine_labels must be {len(images)} integers, one per image; {how_to_get(data_dir)}")
    if len(labels) and (labels.min() < 0 or labels.max() > 99):
        found = f"{labels.min()}..{labels.max()}"
        raise DataError(f"{path}: fine labels must be in 0..99, found {found}; {how_to_get(data_dir)}")
    names = raw.get(b"filenames")
    filenames = [_decode(n) for n in names] if names is not None else [f"{split}_{i:05d}" for i in range(len(images))]
    if len(filenames) != len(images):
        raise DataError(f"{path}: {len(filenames)} filenames for {len(images)} images; {how_to_get(data_dir)}")
    return Split(np.ascontiguousarray(images), labels, filenames)


def load_label_names(data_dir) -> list[str]:
    """The 100 fine label names from data_dir/meta, in official order."""
    path = Path(data_dir) / "meta"
    raw = safe_load(path)
    names = raw.get(b"fine_label_names") if isinstance(raw, dict) else None
    if names is None or len(names) != 100:
        raise DataError(f"{path} does not list the 100 CIFAR-100 fine label names; {how_to_get(data_dir)}")
    return [_decode(n) for n in names]


def resolve_classes(names, label_names) -> list[int]:
    """Official fine ids of `names`, in the order given."""
    label_names = list(label_names)
    ids, seen = [], set()
    for name in names:
        if name in seen:
            raise DataError(f"class {name!r} is listed twice; list each class once")
        seen.add(name)
        if name not in label_names:
            close = difflib.get_close_matches(name, label_names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "the 100 names are FINE_LABEL_NAMES in branching/data.py"
            raise DataError(f"unknown CIFAR-100 class {name!r}; {hint}")
        ids.append(label_names.index(name))
    return ids


def select(split: Split, fine_ids):
    """Rows whose fine label is in fine_ids, in file order: (images, labels as positions in fine_ids, row indices)."""
    fine_ids = [int(i) for i in fine_ids]
    position = np.full(100, -1, dtype=np.int64)
    for pos, fine_id in enumerate(fine_ids):
        if not 0 <= fine_id < 100:
            raise DataError(f"fine class id {fine_id} is not in 0..99")
        position[fine_id] = pos
    indices = np.flatnonzero(position[split.fine_labels] >= 0).astype(np.int64)
    labels = position[split.fine_labels[indices]]
    counts = np.bincount(labels, minlength=len(fine_ids))
    for pos, fine_id in enumerate(fine_ids):
        if counts[pos] == 0:
            name = FINE_LABEL_NAMES[fine_id]
            raise DataError(f"no images of class {name!r} (id {fine_id}) in this split; use data that contains it")
    return split.images[indices], labels, indices


# ---------------------------------------------------------------- writing the official format
def _atomic_write(path, write) -> None:
    """Call write(file) on a temporary file beside path, then os.replace it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _pickle_to(path, obj) -> None:
    # Protocol 4: protocol 2 would pickle bytes via _codecs.encode, which safe_load refuses.
    _atomic_write(path, lambda f: pickle.dump(obj, f, protocol=4))


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
