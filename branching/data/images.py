"""Image files as a tree's input: PNG or JPEG of any size and mode, upright (EXIF), 8-bit RGB, resized
to the network's input; a one-line error for a file that is not such an image."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from branching.data.cifar import N_PIXELS
from branching.errors import DataError

IMAGE_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: the JPEG variant many cameras write
SIDE = 32
MAX_PIXELS = 89_478_485  # Pillow's bomb limit (Image.MAX_IMAGE_PIXELS); larger images are refused undecoded


def load_image(path) -> np.ndarray:
    """A PNG or JPEG file as uint8 (3072,) in the CIFAR layout (1024 R, 1024 G, 1024 B), resized to 32x32."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file; pass a PNG or JPEG image")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in IMAGE_FORMATS:
                    raise DataError(f"{path}: a {image.format} image; pass a PNG or JPEG image")
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise DataError(f"{path}: {width}x{height} pixels, more than the limit of {MAX_PIXELS:,}; "
                                    f"downscale it first")  # Pillow's own check stops twice as many
                image.draft("RGB", (SIDE, SIDE))  # JPEG: decode at a reduced scale when much larger
                pixels = np.asarray(_to_small_rgb(image), dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; pass image files") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: more than the limit of {MAX_PIXELS:,} pixels; downscale it first") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (Pillow cannot identify it); pass a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: unreadable image ({message}); pass an intact PNG or JPEG image") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).reshape(N_PIXELS)


def _to_small_rgb(image):
    """A decoded image upright (EXIF orientation), 8 bits per channel, RGB, 32x32."""
    from PIL import Image, ImageOps

    factor = min(image.size) // (3 * SIDE)
    if factor >= 2:  # shrink by whole factors first: the steps below then copy a small image
        image = image.reduce(factor)
    image = ImageOps.exif_transpose(image)  # after reduce: it copies the whole image
    if image.mode.startswith("I"):  # 16- or 32-bit grey (e.g. a 16-bit PNG): scale to 8 bits, not clip
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    rgb = image.convert("RGB")
    if rgb.size != (SIDE, SIDE):
        rgb = rgb.resize((SIDE, SIDE), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return rgb


def load_images(paths) -> tuple[list[str], np.ndarray, list[str]]:
    """(names of the files read, their pixels (N, 3072), one-line errors for the files that failed)."""
    names, rows, errors = [], [], []
    for path in paths:
        try:
            rows.append(load_image(path))
            names.append(str(path))
        except DataError as e:
            errors.append(str(e))
    pixels = np.stack(rows) if rows else np.zeros((0, N_PIXELS), np.uint8)
    return names, pixels, errors
