"""CIFAR-100 official python files: safe loading, splits, class names and selection.

Downloading lives in branching/download.py, normalisation in branching/normalization.py.
"""

from __future__ import annotations

import difflib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from branching.data.download import how_to_get
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
    names = [_decode(n) for n in names]
    if names != list(FINE_LABEL_NAMES):  # a changed order would silently relabel every image
        i = next(i for i, (a, b) in enumerate(zip(names, FINE_LABEL_NAMES)) if a != b)
        raise DataError(f"{path} names fine label {i} {names[i]!r}, but the official CIFAR-100 name is "
                        f"{FINE_LABEL_NAMES[i]!r}: labels would be misread; {how_to_get(data_dir)}")
    return names


def resolve_classes(names, label_names, what: str = "CIFAR-100 class") -> list[int]:
    """Ids (positions in label_names: for CIFAR-100 the official fine ids) of `names`, in the order given."""
    label_names = list(label_names)
    ids, seen = [], set()
    for name in names:
        if name in seen:
            raise DataError(f"class {name!r} is listed twice; list each class once")
        seen.add(name)
        if name not in label_names:
            close = difflib.get_close_matches(name, label_names, n=1)
            hint = (f"did you mean {close[0]!r}?" if close else "the 100 names are FINE_LABEL_NAMES in "
                    "branching/data/cifar.py" if what == "CIFAR-100 class" else f"known: {', '.join(label_names[:12])}"
                    f"{' ...' if len(label_names) > 12 else ''}")
            raise DataError(f"unknown {what} {name!r}; {hint}")
        ids.append(label_names.index(name))
    return ids


def select(split: Split, fine_ids, label_names=FINE_LABEL_NAMES):
    """Rows whose label is in fine_ids, in file order: (images, labels as positions in fine_ids, row indices)."""
    labels, indices = select_rows(split, fine_ids, label_names)
    every = len(indices) == len(split.images)  # rows in file order: the whole split, not a copy of it
    return (split.images if every else split.images[indices]), labels, indices


def select_rows(split: Split, fine_ids, label_names=FINE_LABEL_NAMES):
    """select without reading the images: (labels as positions in fine_ids, row indices)."""
    fine_ids = [int(i) for i in fine_ids]
    position = np.full(len(label_names), -1, dtype=np.int64)
    for pos, fine_id in enumerate(fine_ids):
        if not 0 <= fine_id < len(label_names):
            raise DataError(f"class id {fine_id} is not in 0..{len(label_names) - 1}")
        position[fine_id] = pos
    indices = np.flatnonzero(position[split.fine_labels] >= 0).astype(np.int64)
    labels = position[split.fine_labels[indices]]
    counts = np.bincount(labels, minlength=len(fine_ids))
    for pos, fine_id in enumerate(fine_ids):
        if counts[pos] == 0:
            name = label_names[fine_id]
            raise DataError(f"no images of class {name!r} (id {fine_id}) in this split; use data that contains it")
    return labels, indices


def unused_classes(config, data_dir, classes: list[str], counts: dict[str, int], noun: str) -> dict[str, int]:
    """The data's classes that no node of the tree names, with their training counts; a DataError before any work
    for one that differs from a class of the tree only in case or spaces (two spellings of one label)."""
    named = {c.casefold().strip(): c for c in config.classes()}
    unused = {c: counts.get(c, 0) for c in classes if c not in config.classes()}
    for name, n in unused.items():
        if name.casefold().strip() in named:
            raise DataError(f"{data_dir}: the label {name!r} ({n} training {noun}) differs from the tree's class "
                            f"{named[name.casefold().strip()]!r} only in case or spaces; make them one label in the "
                            f"data (or name both in the tree)")
    return unused
