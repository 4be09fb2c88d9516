"""CIFAR-100 official python files: safe loading, class selection, normalisation, download."""

from __future__ import annotations

import difflib
import hashlib
import http.client
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from branching.errors import DataError

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
SPLIT_FILES = ("train", "test", "meta")
N_PIXELS = 3072
DOWNLOAD_TIMEOUT_S = 60

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


def _how_to_get(data_dir) -> str:
    return f"put the official train, test and meta files of cifar-100-python.tar.gz ({CIFAR100_URL}) in {data_dir}"


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
        raise DataError(f"missing CIFAR-100 file {path}; {_how_to_get(path.parent)}") from None
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
        raise DataError(f"{path} is not a CIFAR-100 split (no b'data' and b'fine_labels'); {_how_to_get(data_dir)}")
    images = raw[b"data"]
    is_array = isinstance(images, np.ndarray)
    if not is_array or images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != N_PIXELS:
        got = f"{images.dtype} {images.shape}" if is_array else type(images).__name__
        raise DataError(
            f"{path}: data is {got}, expected uint8 (N, 3072) rows of 1024 R, 1024 G, 1024 B; {_how_to_get(data_dir)}"
        )
    try:
        labels = np.asarray(raw[b"fine_labels"], dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{path}: fine_labels must be {len(images)} integers, one per image; {_how_to_get(data_dir)}")
    if len(labels) and (labels.min() < 0 or labels.max() > 99):
        found = f"{labels.min()}..{labels.max()}"
        raise DataError(f"{path}: fine labels must be in 0..99, found {found}; {_how_to_get(data_dir)}")
    names = raw.get(b"filenames")
    filenames = [_decode(n) for n in names] if names is not None else [f"{split}_{i:05d}" for i in range(len(images))]
    if len(filenames) != len(images):
        raise DataError(f"{path}: {len(filenames)} filenames for {len(images)} images; {_how_to_get(data_dir)}")
    return Split(np.ascontiguousarray(images), labels, filenames)


def load_label_names(data_dir) -> list[str]:
    """The 100 fine label names from data_dir/meta, in official order."""
    path = Path(data_dir) / "meta"
    raw = safe_load(path)
    names = raw.get(b"fine_label_names") if isinstance(raw, dict) else None
    if names is None or len(names) != 100:
        raise DataError(f"{path} does not list the 100 CIFAR-100 fine label names; {_how_to_get(data_dir)}")
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


# ---------------------------------------------------------------- normalisation
class Normalizer:
    """Per-pixel standardisation: (x - mean) / std, both float32 (3072,)."""

    MIN_STD = 1e-6

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1)
        if self.mean.shape != (N_PIXELS,) or self.std.shape != (N_PIXELS,):
            got = f"{self.mean.size} and {self.std.size}"
            raise DataError(f"normaliser mean and std must have {N_PIXELS} values each, got {got}")

    @classmethod
    def fit(cls, images) -> "Normalizer":
        images = np.asarray(images, dtype=np.float64)
        if images.ndim != 2 or images.shape[0] == 0:
            raise DataError(f"cannot fit a normaliser on images of shape {images.shape}; need (N, 3072) with N > 0")
        return cls(images.mean(axis=0), np.maximum(images.std(axis=0), cls.MIN_STD))

    def transform(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 2 or images.shape[1] != N_PIXELS:
            raise DataError(f"expected images of shape (N, 3072), got {images.shape}")
        return ((images.astype(np.float32) - self.mean) / self.std).astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        import torch  # only the checkpoint format needs tensors

        return {"mean": torch.from_numpy(self.mean.copy()), "std": torch.from_numpy(self.std.copy())}

    @classmethod
    def from_dict(cls, d) -> "Normalizer":
        def as_array(v):
            return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)

        return cls(as_array(d["mean"]), as_array(d["std"]))

    def save_npy(self, mean_path, std_path) -> None:
        for path, values in ((mean_path, self.mean), (std_path, self.std)):
            _atomic_write(path, lambda f, v=values: np.save(f, v))

    @classmethod
    def load_npy(cls, mean_path, std_path) -> "Normalizer":
        arrays = []
        for path in (mean_path, std_path):
            try:
                arrays.append(np.load(path, allow_pickle=False))
            except FileNotFoundError:
                raise DataError(f"missing normaliser file {path}; train the parent again to recreate it") from None
            except (OSError, ValueError, EOFError) as e:
                raise DataError(f"{path} is not a valid .npy file ({e}); train the parent again") from None
        return cls(*arrays)


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


# ---------------------------------------------------------------- download
def _has_all(data_dir: Path) -> bool:
    return all((data_dir / name).is_file() for name in SPLIT_FILES)


def _download(url, dest: Path, progress: bool) -> str:
    """Stream url into dest; return its md5 hex digest."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(dest, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="CIFAR-100",
                  file=sys.stderr, disable=not progress) as bar:  # fmt: skip
            while chunk := response.read(1 << 20):
                out.write(chunk)
                md5.update(chunk)
                bar.update(len(chunk))
    return md5.hexdigest()


def _extract(archive: Path, dest: Path, data_dir: Path) -> None:
    """Copy the three official members of archive into dest; refuse unsafe members."""
    wanted = {f"cifar-100-python/{name}": name for name in SPLIT_FILES}
    found = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = member.name
                parts = PurePosixPath(name).parts
                if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise DataError(f"unsafe archive: member {name!r} points outside its folder; {_how_to_get(data_dir)}")
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"unsafe archive: member {name!r} is a link or device; {_how_to_get(data_dir)}")
                key = name[2:] if name.startswith("./") else name
                if key in wanted and member.isfile():
                    source = tar.extractfile(member)
                    with source, open(dest / wanted[key], "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
                    found[key] = True
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"the downloaded archive is not a valid tar.gz ({e}); run the command again to retry") from None
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise DataError(f"the downloaded archive lacks {', '.join(missing)}; {_how_to_get(data_dir)}")


def ensure_cifar100(data_dir, url=CIFAR100_URL, md5=CIFAR100_MD5, progress=True) -> Path:
    """Return data_dir holding train, test and meta, downloading and extracting the archive if needed."""
    data_dir = Path(data_dir)
    if _has_all(data_dir):
        return data_dir
    parent = data_dir.parent.resolve()
    parent.mkdir(parents=True, exist_ok=True)
    fd, archive = tempfile.mkstemp(dir=parent, prefix=f".{data_dir.name}.", suffix=".tar.gz.part")
    os.close(fd)
    staging = None
    try:
        try:
            digest = _download(url, Path(archive), progress)
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or e
            if isinstance(e, urllib.error.HTTPError):
                reason = f"HTTP {e.code} {e.reason}"
            raise DataError(
                f"could not download CIFAR-100 from {url} ({reason}); download cifar-100-python.tar.gz "
                f"yourself and put its train, test and meta files in {data_dir}"
            ) from None
        if md5 is not None and digest != md5:
            raise DataError(f"the download from {url} is corrupt (md5 {digest}, not {md5}); run the command again to retry")
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{data_dir.name}.", suffix=".tmp"))
        _extract(Path(archive), staging, data_dir)
        if not data_dir.exists():
            staging.chmod(0o755)  # mkdtemp makes it private
            os.rename(staging, data_dir)
        else:
            for name in SPLIT_FILES:
                os.replace(staging / name, data_dir / name)
    finally:
        Path(archive).unlink(missing_ok=True)
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return data_dir
