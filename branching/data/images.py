"""Image files as a tree's input: any size and mode, upright (EXIF), 8-bit RGB, resized as torchvision's
`Resize(size)` + `CenterCrop(size)` do (the shorter side to `size`, bilinear and antialiased, then the
centre square); a one-line error for a file that is not such an image."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from branching.errors import DataError

IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "TIFF", "WEBP")  # MPO: the JPEG variant many cameras write
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".mpo", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SIDE = 32
POLICY = "resize-shorter-bilinear-antialias+center-crop"  # recorded in caches: a change rebuilds them
MAX_PIXELS = 89_478_485  # Pillow's bomb limit (Image.MAX_IMAGE_PIXELS); larger images are refused undecoded


def load_image(path, size: int = SIDE) -> np.ndarray:
    """An image file as uint8 (3 * size * size,) in the CIFAR layout (every R, then G, then B), resized
    and centre-cropped to size x size."""
    return decode_image(None, path, size)


def decode_image(data: bytes | None, path, size: int = SIDE) -> np.ndarray:
    """load_image for a file's bytes already read (None: read them here); `path` names it in errors."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        if data is None:
            data = path.read_bytes()
        if len(data) == 0:
            raise DataError(f"{path}: empty file; pass a PNG or JPEG image")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise DataError(f"{path}: a {image.format} image; pass a PNG or JPEG image")
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise DataError(f"{path}: {width}x{height} pixels, more than the limit of {MAX_PIXELS:,}; "
                                    f"downscale it first")  # Pillow's own check stops twice as many
                pixels = np.asarray(resize_center_crop(upright_rgb(image), size), dtype=np.uint8)
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
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).reshape(3 * size * size)


def upright_rgb(image):
    """A decoded image upright (EXIF orientation), 8 bits per channel, RGB (alpha dropped, as
    torchvision's loader does; 16-bit grey scaled to 8 bits, not clipped)."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def resize_center_crop(image, size: int):
    """torchvision's Resize(size) then CenterCrop(size) on a PIL image: the shorter side scaled to `size`
    (the longer one truncated, bilinear, antialiased as PIL resizes), then the centre size x size square."""
    from PIL import Image

    width, height = image.size
    if (width, height) != (size, size):
        if width <= height:
            new = (size, int(size * height / width))
        else:
            new = (int(size * width / height), size)
        if new != (width, height):
            image = image.resize(new, Image.Resampling.BILINEAR)
        width, height = image.size
        top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return image


def load_images(paths, size: int = SIDE) -> tuple[list[str], np.ndarray, list[str]]:
    """(names of the files read, their pixels (N, 3 * size * size), one-line errors for the files that
    failed)."""
    names, rows, errors = [], [], []
    for path in paths:
        try:
            rows.append(load_image(path, size))
            names.append(str(path))
        except DataError as e:
            errors.append(str(e))
    pixels = np.stack(rows) if rows else np.zeros((0, 3 * size * size), np.uint8)
    return names, pixels, errors
