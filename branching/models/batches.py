"""The one data path of training and inference. A model's inputs reach its device in the type they are stored
in (uint8 images, float32 features or encoded texts), held there whole where they fit (DeviceInputs); batches
are taken there by index (slices of a random permutation for training), images are mirrored and shifted
there with batched tensor ops (Augment), and normalised there, as the first step of the batch."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from branching.lazy_images import NormalizedImages
from branching.models import nets
from branching.models.checks import rows_per_batch, writable

RESIDENT_SHARE = 0.5  # of a CUDA device's free memory that a training set may hold; beyond it, batches stream
UPLOAD_ROWS = 8192    # rows copied to a device at a time while a training set is made resident


class DeviceInputs:
    """Inputs X (an array, a tensor, or NormalizedImages: stored values and the normaliser that standardises
    them) for a model on `device`. On a CUDA device they are copied there once, in their stored type, if they
    take under RESIDENT_SHARE of its free memory; otherwise (and always on the CPU, where memory-mapped images
    stay mapped) each batch is read from the host. `rows` gives a batch normalised on the device."""

    def __init__(self, X, device: torch.device, hold: bool = True):
        self.device = torch.device(device)
        self.normalizer = X.normalizer if isinstance(X, NormalizedImages) else None
        if isinstance(X, NormalizedImages):
            self.host = X.images if X.rows is None else _Rows(X.images, X.rows)
        else:
            self.host = X if isinstance(X, torch.Tensor) else np.asarray(X)
            if type(self.host) is np.ndarray and self.host.flags.writeable:  # a tensor view of the same memory
                self.host = torch.from_numpy(self.host)  # (read-only and mapped arrays: copied a batch at a time)
        self.width = int(X.shape[1])
        self.length = len(X)
        self.mean = self.std = None
        if self.normalizer is not None:
            self.mean = torch.from_numpy(self.normalizer.mean).to(self.device)
            self.std = torch.from_numpy(self.normalizer.std).to(self.device)
        self.resident = None
        if hold and self.device.type == "cuda":
            self.resident = self._upload()

    def __len__(self) -> int:
        return self.length

    @property
    def index_device(self) -> torch.device:
        """Where batch indices should be: on the device when the inputs are held there."""
        return self.device if self.resident is not None else torch.device("cpu")

    @property
    def is_images(self) -> bool:
        """Stored images (uint8 pixels, not yet normalised) that can be mirrored as pixels."""
        return self.normalizer is not None and self.host.dtype in (np.uint8, torch.uint8)

    def raw(self, index: torch.Tensor) -> torch.Tensor:
        """The stored values of rows `index`, on the device."""
        if self.resident is not None:
            return self.resident[index.to(self.device)]
        rows = self.host[index.cpu()] if isinstance(self.host, torch.Tensor) else self.host[index.cpu().numpy()]
        values = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(writable(np.ascontiguousarray(rows)))
        return values.to(self.device, non_blocking=True)

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        """float32 values, standardised where the inputs carry a normaliser (as Normalizer.transform does)."""
        values = values.to(torch.float32)
        return values if self.mean is None else (values - self.mean) / self.std

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.normalize(self.raw(index))

    def _upload(self):
        free, _ = torch.cuda.mem_get_info(self.device)
        itemsize = self.host.element_size() if isinstance(self.host, torch.Tensor) else np.dtype(self.host.dtype).itemsize
        if self.length * self.width * itemsize > RESIDENT_SHARE * free:
            return None
        first = self.raw(torch.arange(min(UPLOAD_ROWS, self.length)))
        held = torch.empty((self.length, self.width), dtype=first.dtype, device=self.device)  # one copy, filled
        held[:len(first)] = first
        for start in range(UPLOAD_ROWS, self.length, UPLOAD_ROWS):
            held[start:start + UPLOAD_ROWS] = self.raw(torch.arange(start, min(start + UPLOAD_ROWS, self.length)))
        return held


class _Rows:
    """Some rows of an array (memory-mapped, usually), indexed without copying them all first."""

    def __init__(self, values, rows):
        self.values, self.rows, self.dtype = values, np.asarray(rows, dtype=np.int64), values.dtype

    def __getitem__(self, index):
        return self.values[self.rows[index]]


class Augment:
    """Random left-right mirror images (flip: a fair coin per image) and shifts by up to `crop` pixels (each
    normalised image padded with `crop` zeros on every side and cropped back at a random offset), drawn from
    the training generator on the CPU in this order: the coins, then the rows' offsets, then the columns', so
    that a seed gives the same images on every device.

    Stored images are mirrored as pixels before they are normalised. `mirrored`: the mirror images' inputs are
    known (features of the mirror images, row for row of the training inputs), and a coin picks them.
    `normalizer`: mirrors images given already normalised. `then`: maps the augmented batch to what the model
    reads (a trunk's tap)."""

    def __init__(self, flip: bool = True, crop: int = 0, normalizer=None, mirrored=None, then=None):
        self.flip, self.crop, self.normalizer, self.then = bool(flip), int(crop), normalizer, then
        self.mirrored = None if mirrored is None else np.asarray(mirrored, dtype=np.float32)
        self._mirrored_on: dict = {}

    def draw(self, n: int, generator: torch.Generator):
        """(coins or None, row offsets or None, column offsets or None) for n images."""
        flips = torch.rand(n, generator=generator) < 0.5 if self.flip else None
        if not self.crop:
            return flips, None, None
        dy, dx = (torch.randint(0, 2 * self.crop + 1, (n,), generator=generator) for _ in range(2))
        return flips, dy, dx

    def batch(self, inputs: DeviceInputs, index: torch.Tensor, generator: torch.Generator, share=(0, 1)) -> torch.Tensor:
        """Rows `index` of the inputs, augmented with fresh draws from `generator`, on the inputs' device.
        share (rank, world): the draws are made for `world` such batches, and this one takes part `rank`."""
        rank, world = share
        part = slice(rank * len(index), (rank + 1) * len(index))
        flips, dy, dx = (None if d is None else d[part] for d in self.draw(world * len(index), generator))
        device = inputs.device
        flips = None if flips is None else flips.to(device, non_blocking=True)
        if flips is not None and self.mirrored is not None:
            if device not in self._mirrored_on:  # copied to the device once
                self._mirrored_on[device] = torch.from_numpy(self.mirrored).to(device)
            mirrored = self._mirrored_on[device]
            x = torch.where(flips[:, None], mirrored[index.to(device)], inputs.rows(index))
        elif flips is not None and inputs.is_images:
            x = inputs.normalize(mirror(inputs.raw(index), flips))
        elif flips is not None:
            x = self.mirror_normalized(inputs.rows(index), flips)
        else:
            x = inputs.rows(index)
        if self.crop:
            x = shift(x, dy.to(device, non_blocking=True), dx.to(device, non_blocking=True), self.crop)
        return x if self.then is None else self.then(x)

    def mirror_normalized(self, x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Normalised images mirrored where `flips` is true: back to pixels, mirrored, normalised again."""
        if self.normalizer is None:
            raise ValueError("Augment(flip=True) of normalised images needs their normalizer (or stored images)")
        mean = torch.from_numpy(self.normalizer.mean).to(x.device)
        std = torch.from_numpy(self.normalizer.std).to(x.device)
        return (mirror(x * std + mean, flips) - mean) / std


def mirror(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flat images (N, 3 * side * side) mirrored left-right where `flips` is true."""
    side = nets.image_side(x.shape[1])
    images = x.reshape(len(x), nets.CHANNELS, side, side)
    return torch.where(flips[:, None, None, None], images.flip(3), images).reshape(len(x), -1)


def shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Flat images (N, 3 * side * side) padded by `pad` zeros on every side and cropped back to their side with
    the top-left corner at (dy, dx) of the padded image: one gather on the device."""
    n, channels, side = len(x), nets.CHANNELS, nets.image_side(x.shape[1])
    padded_side = side + 2 * pad
    padded = F.pad(x.reshape(n, channels, side, side), (pad,) * 4).reshape(n, channels, padded_side ** 2)
    steps = torch.arange(side, device=x.device)
    where = (dy[:, None, None] + steps[None, :, None]) * padded_side + (dx[:, None, None] + steps[None, None, :])
    return padded.gather(2, where.reshape(n, 1, side * side).expand(n, channels, side * side)).reshape(n, -1)


def device_batches(X, batch_size: int, device: torch.device):
    """Consecutive batches of at most batch_size rows of X (an array, a tensor or NormalizedImages), and at
    most checks.BATCH_BYTES of them, normalised on `device`: stored images travel in their own type."""
    inputs = DeviceInputs(X, device, hold=False)  # one batch at a time: nothing is held on the device
    batch_size = rows_per_batch(batch_size, inputs.width)
    for start in range(0, len(inputs), batch_size):
        yield inputs.rows(torch.arange(start, min(start + batch_size, len(inputs))))
