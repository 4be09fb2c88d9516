"""Fetching the official CIFAR-100 archive: download, md5 check, safe extraction of train, test and meta."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from branching.errors import DataError

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
SPLIT_FILES = ("train", "test", "meta")
DOWNLOAD_TIMEOUT_S = 60


def how_to_get(data_dir) -> str:
    """The end of every missing-data message: where the files come from and where they go."""
    return f"put the official train, test and meta files of cifar-100-python.tar.gz ({CIFAR100_URL}) in {data_dir}"


def _has_all(data_dir) -> bool:
    """Whether data_dir holds the three official files."""
    return all((Path(data_dir) / name).is_file() for name in SPLIT_FILES)


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
    """Write the three official members of archive into dest (a scratch folder).

    Every member is checked first, so that nothing is written from an unsafe or incomplete archive.
    """
    wanted = {f"cifar-100-python/{name}": name for name in SPLIT_FILES}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            found = {}
            for member in tar:
                name = member.name
                parts = PurePosixPath(name).parts
                if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                    raise DataError(f"unsafe archive: member {name!r} points outside its folder; {how_to_get(data_dir)}")
                if not (member.isfile() or member.isdir()):
                    raise DataError(f"unsafe archive: member {name!r} is a link or device; {how_to_get(data_dir)}")
                key = name[2:] if name.startswith("./") else name
                if key in wanted and member.isfile():
                    found[key] = member
            missing = sorted(set(wanted) - set(found))
            if missing:
                raise DataError(f"the downloaded archive lacks {', '.join(missing)}; {how_to_get(data_dir)}")
            for key, member in found.items():
                with tar.extractfile(member) as source, open(dest / wanted[key], "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"the downloaded archive is not a valid tar.gz ({e}); run the command again to retry") from None


def ensure_cifar100(data_dir, url=CIFAR100_URL, md5=CIFAR100_MD5, progress=True) -> Path:
    """Return data_dir holding train, test and meta, downloading and extracting the archive if needed.

    All or nothing: the archive and its files go to a scratch folder beside data_dir (in its nearest
    existing parent), which is always removed; data_dir is created and filled only once all three
    files are extracted. A failed or interrupted download leaves no folder and no file behind.
    """
    data_dir = Path(data_dir)
    if _has_all(data_dir):
        return data_dir
    anchor = next(p for p in (data_dir.absolute().parent, *data_dir.absolute().parents) if p.is_dir())
    with tempfile.TemporaryDirectory(dir=anchor, prefix=f".{data_dir.name}.", suffix=".download") as scratch:
        archive = Path(scratch) / "cifar-100-python.tar.gz"
        try:
            digest = _download(url, archive, progress)
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
        files = Path(scratch) / "files"
        files.mkdir()
        _extract(archive, files, data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        for name in SPLIT_FILES:
            os.replace(files / name, data_dir / name)
    return data_dir
