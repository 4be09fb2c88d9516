"""Per-pixel standardisation of images (or of every value of encoded texts), fitted on the parent's training
rows a batch at a time."""

from __future__ import annotations

import numpy as np

from branching.errors import DataError
from branching.fileio import atomic_path
from branching.lazy_images import NormalizedImages


ALIGNMENT = 64  # bytes, as torch's CPU allocator aligns its tensors


def aligned_float32(shape) -> np.ndarray:
    """An empty float32 array whose data start on an ALIGNMENT-byte boundary. numpy's own start wherever
    malloc puts them, and a BLAS's last bits can follow the alignment of its inputs: batches normalised
    here would then make the same seed give other figures from run to run."""
    count = int(np.prod(shape))
    raw = np.empty(4 * count + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + 4 * count].view(np.float32).reshape(shape)


class Normalizer:
    """Standardisation (x - mean) / std with mean and std float32 (3 * side * side,), in the CIFAR layout
    (every red value, then green, then blue): per pixel, or per colour channel (each channel's value
    repeated over its pixels)."""

    MIN_STD = 1e-6
    FIT_BYTES = 32 * 2**20  # float64 values read at a time while fitting (1,365 images of 32 pixels)

    def __init__(self, mean, std):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1)
        if self.mean.shape != self.std.shape or not self.mean.size:
            got = f"{self.mean.size} and {self.std.size}"
            raise DataError(f"normaliser mean and std must have the same number of values, one per input value "
                            f"(3 per pixel); got {got}")

    @classmethod
    def fit(cls, images, per_channel: bool = False, rows=None) -> "Normalizer":
        """Mean and std of every pixel over the images (or those of `rows`), or (per_channel) of every colour
        channel over all its pixels, repeated for each of them; two passes over FIT_BYTES of float64 values
        at a time, summed in numpy's own order, so the figures are numpy's whole-array ones to the bit."""
        images = images if hasattr(images, "shape") else np.asarray(images)
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
        if images.ndim != 2 or (len(images) if rows is None else len(rows)) == 0:
            raise DataError(f"cannot fit a normaliser on images of shape {images.shape}; need "
                            f"(N, 3 * side * side) with N > 0")
        n, width = (len(images) if rows is None else len(rows)), images.shape[1]
        if per_channel and width % 3:
            raise DataError(f"cannot fit a normaliser on rows of {width} values; need 3 per pixel")
        step = max(1, cls.FIT_BYTES // (8 * width))
        batches = [slice(start, start + step) if rows is None else rows[start:start + step]
                   for start in range(0, n, step)]

        def total(transform):  # numpy's sum over the rows (and pixels), in its order: row after row
            acc = None
            for b in batches:
                values = transform(np.asarray(images[b], dtype=np.float64))
                if per_channel:
                    values = values.reshape(len(values), 3, -1).sum(axis=2)
                acc = values.sum(axis=0) if acc is None else np.concatenate([acc[None], values]).sum(axis=0)
            return acc

        count = n * (width // 3 if per_channel else 1)
        mean = total(lambda values: values) / count
        full_mean = np.repeat(mean, width // 3) if per_channel else mean
        std = np.sqrt(total(lambda values: np.square(values - full_mean)) / count)
        if per_channel:
            std = np.repeat(std, width // 3)
        return cls(full_mean, np.maximum(std, cls.MIN_STD))

    @classmethod
    def of_channels(cls, mean, std, side: int = 32) -> "Normalizer":
        """Given per-channel mean and std (3 values each, on the 0..255 scale), repeated over the pixels of
        an image of `side` pixels."""
        mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
        if mean.shape != (3,) or std.shape != (3,) or not (std > 0).all():
            raise DataError(f"per-channel mean and std must be 3 values each (std > 0); got {mean} and {std}")
        return cls(np.repeat(mean, side * side), np.repeat(std, side * side))

    def transform(self, images) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 2 or images.shape[1] != self.mean.size:
            raise DataError(f"expected images of shape (N, {self.mean.size}), got {images.shape}")
        values = aligned_float32(images.shape)  # one float copy, normalised in place (the same arithmetic)
        np.copyto(values, images, casting="unsafe")
        values -= self.mean
        values /= self.std
        return values

    def lazy(self, images, mirrored=None) -> "NormalizedImages":
        """The images as transform gives them, read a batch at a time (see NormalizedImages); `mirrored`, the
        values of their mirror images where these cannot be made from them (an encoded parent's)."""
        images = np.asarray(images) if not isinstance(images, np.ndarray) else images
        if images.ndim != 2 or images.shape[1] != self.mean.size:
            raise DataError(f"expected images of shape (N, {self.mean.size}), got {images.shape}")
        if mirrored is not None and mirrored.shape != images.shape:
            raise DataError(f"mirror images of shape {mirrored.shape} for images of shape {images.shape}")
        return NormalizedImages(images, self, None, mirrored)

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
            with atomic_path(path, "wb") as f:
                np.save(f, values)

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

