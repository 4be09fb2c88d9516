"""Image files as a tree's input: any size and mode, upright (EXIF), 8-bit RGB, resized as torchvision's
`Resize(size)` + `CenterCrop(size)` do (the shorter side to `size`, bilinear and antialiased, then the
centre square); a one-line error for a file that is not such an image."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np

from branching.errors import DataError

IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "TIFF", "WEBP")  # MPO: the JPEG variant many cameras write
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".mpo", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SIDE = 32
POLICY = "resize-shorter-bilinear-antialias+center-crop"  # recorded in caches: a change rebuilds them
MAX_PIXELS = 89_478_485  # Pillow's bomb limit (Image.MAX_IMAGE_PIXELS); larger images are refused undecoded
MAX_FILE_BYTES = 512 * 2**20  # an image file larger than this is refused unread (a device, a runaway file)
MAX_ASPECT = 8  # beyond this ratio of sides only the centre square is resized (see resize_center_crop)
MAX_SIDE = 65_535  # pixels on a side (JPEG's own limit): Pillow keeps a pointer per row, 0.7 GB for 89 M rows


def load_image(path, size: int = SIDE) -> np.ndarray:
    """An image file as uint8 (3 * size * size,) in the CIFAR layout (every R, then G, then B), resized
    and centre-cropped to size x size."""
    return decode_image(None, path, size)


def decode_image(data: bytes | None, path, size: int = SIDE) -> np.ndarray:
    """load_image for a file's bytes already read (None: read them here); `path` names it in errors."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    label = shown(path)  # a name that is not UTF-8 can still be printed and written
    try:
        if data is None:
            data = read_image_file(path)
        if len(data) == 0:
            raise DataError(f"{label}: empty file; pass a PNG or JPEG image")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in IMAGE_FORMATS:
                    raise DataError(f"{label}: a {image.format} image; pass a PNG or JPEG image")
                width, height = image.size
                if max(width, height) > MAX_SIDE:
                    raise DataError(f"{label}: {width}x{height} pixels, a side longer than the limit of {MAX_SIDE:,}; "
                                    f"crop or downscale it first")
                if width * height > MAX_PIXELS:
                    raise DataError(f"{label}: {width}x{height} pixels, more than the limit of {MAX_PIXELS:,}; "
                                    f"downscale it first")  # Pillow's own check stops twice as many
                return image_pixels(image, size)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{label}: is a folder; pass image files") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{label}: more than the limit of {MAX_PIXELS:,} pixels; downscale it first") from None
    except UnidentifiedImageError:
        raise DataError(f"{label}: not an image (Pillow cannot identify it); pass a PNG or JPEG image") from None
    except PermissionError:
        raise DataError(f"{label}: cannot be read (permission denied)") from None
    except (OSError, SyntaxError, ValueError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{label}: unreadable image ({message}); pass an intact PNG or JPEG image") from None


def image_pixels(image, size: int = SIDE) -> np.ndarray:
    """A PIL image as load_image gives an image file: upright, RGB, resized and centre-cropped to size x size, as
    uint8 (3 * size * size,) in the CIFAR layout."""
    pixels = np.asarray(resize_center_crop(upright_rgb(image), size), dtype=np.uint8)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).reshape(3 * size * size)


def read_image_file(path: Path) -> bytes:
    """A file's bytes, once it is known to be a regular file of at most MAX_FILE_BYTES: a device (/dev/zero) would
    be read until memory runs out, a named pipe would block for ever."""
    import stat as stat_module
    info = os.stat(path)
    if not stat_module.S_ISREG(info.st_mode):
        what = ("a folder; pass image files" if stat_module.S_ISDIR(info.st_mode) else
                "not a regular file (a device, a pipe or a socket); pass image files")
        raise DataError(f"{shown(path)}: {what}")
    if info.st_size > MAX_FILE_BYTES:
        raise DataError(f"{shown(path)}: {info.st_size / 2**20:.0f} MB, more than the limit of "
                        f"{MAX_FILE_BYTES // 2**20} MB for an image file; pass a smaller image")
    with open(path, "rb") as f:
        return f.read(MAX_FILE_BYTES + 1)


def shown(path) -> str:
    """A path as it can be printed and written to UTF-8 text: bytes of its name that are not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def upright_rgb(image):
    """A decoded image upright (EXIF orientation), 8 bits per channel, RGB (alpha dropped, as
    torchvision's loader does; 16-bit grey scaled to 8 bits, not clipped). A 32-bit integer image (mode "I": a
    16-bit PNG as some Pillow versions open it, or Image.fromarray of int32 values) is taken as 16-bit unless every
    value lies in 0..255: then its values are the 8-bit ones."""
    from PIL import Image, ImageOps

    if image.getexif().get(0x0112, 1) != 1:  # turned by its EXIF orientation (else no copy: 358 MB at the limit)
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)
        eight_bit = image.mode == "I" and values.size and 0 <= values.min() and values.max() <= 255
        image = Image.fromarray(np.clip(np.rint(values if eight_bit else values / 257.0), 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")  # no copy of an RGB image: the largest weigh 268 MB


def resize_center_crop(image, size: int):
    """torchvision's Resize(size) then CenterCrop(size) on a PIL image: the shorter side scaled to `size`
    (the longer one truncated, bilinear, antialiased as PIL resizes), then the centre size x size square.

    An image whose sides differ by more than MAX_ASPECT times (a 1 x 1,000,000 strip) would be resized to
    size x (MAX_ASPECT x size or far more) first: there only the region of the original that the centre square
    comes from is resized (PIL's `box`), which gives the same square within one level of 255 and bounds the
    work by the output."""
    from PIL import Image

    width, height = image.size
    if (width, height) != (size, size):
        if width <= height:
            new = (size, int(size * height / width))
        else:
            new = (int(size * width / height), size)
        top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
        if max(width, height) > MAX_ASPECT * min(width, height) and new != (width, height):
            sx, sy = width / new[0], height / new[1]
            return image.resize((size, size), Image.Resampling.BILINEAR,
                                box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
        if new != (width, height):
            image = image.resize(new, Image.Resampling.BILINEAR)
        image = image.crop((left, top, left + size, top + size))
    return image


def load_images(paths, size: int = SIDE) -> tuple[list[str], np.ndarray, list[str]]:
    """(names of the files read, their pixels (N, 3 * size * size), one-line errors for the files that
    failed)."""
    names, rows, errors = [], [], []
    for path in paths:
        try:
            rows.append(load_image(path, size))
            names.append(shown(path))
        except DataError as e:
            errors.append(str(e))
    pixels = np.stack(rows) if rows else np.zeros((0, 3 * size * size), np.uint8)
    return names, pixels, errors
