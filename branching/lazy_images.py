"""Images seen as their normalised values without a float copy of them all (NormalizedImages): what
Normalizer.lazy gives and every loop over batches reads."""

from __future__ import annotations

import numpy as np


class NormalizedImages:
    """Images (N, 3 * side * side), usually uint8 and memory-mapped, seen as their normalised float32 values
    (Normalizer.transform) without computing them all: indexing with a slice, an index array or a mask gives
    another NormalizedImages of those rows, and only np.asarray (numpy's __array__) normalises, so a loop
    over batches holds one batch of floats at a time. `mirrored`: the stored values of the images' mirror images,
    row for row, where they cannot be made from the values (an encoded parent's vectors of mirrored images)."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, images: np.ndarray, normalizer, rows: np.ndarray | None = None, mirrored=None):
        self.images, self.normalizer, self.rows, self.mirrored = images, normalizer, rows, mirrored

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.images.shape[1])

    def __len__(self) -> int:
        return len(self.images) if self.rows is None else len(self.rows)

    def __getitem__(self, key) -> "NormalizedImages":
        if hasattr(key, "numpy"):  # a torch tensor of indices
            key = key.numpy()
        if isinstance(key, slice) and self.rows is None:
            return NormalizedImages(self.images[key], self.normalizer, None,
                                    None if self.mirrored is None else self.mirrored[key])
        if isinstance(key, slice):
            return NormalizedImages(self.images, self.normalizer, self.rows[key], self.mirrored)
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (len(self),):
                raise IndexError(f"a mask of {key.shape} for {len(self)} images")
            key = np.flatnonzero(key)
        elif key.size == 0:
            key = key.astype(np.int64)
        if key.ndim != 1 or not np.issubdtype(key.dtype, np.integer):
            raise TypeError(f"index NormalizedImages with a slice, an index array or a mask; got {key!r}")
        rows = key.astype(np.int64) if self.rows is None else self.rows[key]
        return NormalizedImages(self.images, self.normalizer, rows, self.mirrored)

    def mirror_images(self) -> "NormalizedImages":
        """The same rows of the mirror images (known only where `mirrored` was given)."""
        if self.mirrored is None:
            raise ValueError("these inputs' mirror images are not known")
        return NormalizedImages(self.mirrored, self.normalizer, self.rows, self.images)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        values = self.normalizer.transform(self.images if self.rows is None else self.images[self.rows])
        return values if dtype is None else values.astype(dtype, copy=False)
