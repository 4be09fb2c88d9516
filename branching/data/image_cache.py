"""The decoded images of image folders, cached on disk as uint8 arrays (N, 3 * size * size).

Every image is decoded once (on every core, with progress), made upright 8-bit RGB and resized as
Resize(size) + CenterCrop(size) do (branching.data.images). A manifest records each file's path, size
and modification time, the size and the resize policy: a change rebuilds the cache, a re-run reuses it
(read back memory-mapped). The sha256 of each file's bytes is kept, to count test images that are also
training images. The cache lives under $BRANCHING_CACHE (default ~/.cache/branching), never in OUT.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from branching.data.folders import ImageFolders
from branching.data.images import POLICY, decode_image
from branching.errors import DataError
from branching.fileio import check_free, disk_error, reserve, sweep_stale

VERSION = 2  # 2: one images.npy, the splits one after another (train and val/ adjoin)
SHOWN_BAD = 3        # bad images named in an error; the rest are counted
IN_PROCESS = 64      # fewer images than this are decoded without starting workers


@dataclass
class CachedSplit:
    images: np.ndarray              # uint8 (N, 3 * size * size), memory-mapped
    labels: np.ndarray              # int64 positions in ImageFolders.classes
    files: list[str]                # paths inside the data folder
    sha256: list[str]


@dataclass
class CachedFolders:
    splits: dict[str, CachedSplit]
    size: int
    manifest_sha256: str
    skipped: list[str] = field(default_factory=list)   # one-line errors of the unreadable images left out
    skipped_in: dict[str, list[str]] = field(default_factory=dict)  # the same, by split
    leaked: list[tuple[str, str]] = field(default_factory=list)  # (test or val file, train file), same bytes
    ignored: int = 0


def cache_root() -> Path:
    return Path(os.environ.get("BRANCHING_CACHE") or Path.home() / ".cache" / "branching")


def manifest(folders: ImageFolders, size: int) -> dict:
    return {"version": VERSION, "root": str(folders.root.resolve()), "size": size, "policy": POLICY,
            "classes": folders.classes,
            "files": {split: [[f.rel, f.class_name, f.size, f.mtime_ns] for f in files]
                      for split, files in folders.splits.items()}}


def load_cached(folders: ImageFolders, size: int, skip_bad: bool = False, progress: bool = True,
                workers: int | None = None) -> CachedFolders:
    """The folders' images at `size`, from the cache when its manifest matches, else decoded into it.
    Unreadable images are a DataError naming the first few, unless `skip_bad` leaves them out."""
    wanted = manifest(folders, size)
    text = json.dumps(wanted, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()
    where = cache_root() / f"images-{hashlib.sha256(wanted['root'].encode()).hexdigest()[:16]}-{size}"
    if not _matches(where, text):
        _build(folders, size, where, text, progress, workers)
    index = json.loads((where / "index.json").read_text())
    bad = index["bad"]
    if bad and not skip_bad:
        shown = "; ".join(bad[:SHOWN_BAD])
        raise DataError(f"{len(bad)} unreadable image(s) in {folders.root}: {shown}"
                        f"{' ...' if len(bad) > SHOWN_BAD else ''}; fix or remove them, or pass "
                        f"--skip-bad-images to leave them out (the run records which)")
    position = {name: i for i, name in enumerate(folders.classes)}
    skipped_in, start = {}, 0
    for split, entry in index["splits"].items():  # the bad images were listed split after split, in file order
        count = entry["ok"].count(False)
        skipped_in[split], start = bad[start:start + count], start + count
    splits, every = {}, np.load(where / "images.npy", mmap_mode="r")
    for split in folders.splits:
        entry = index["splits"][split]
        images = every[entry["start"]:entry["start"] + len(entry["ok"])]  # a view of the memory map
        keep = np.asarray(entry["ok"], dtype=bool)
        rows = np.flatnonzero(keep)
        splits[split] = CachedSplit(images[rows] if not keep.all() else images,
                                    np.array([position[c] for c, k in zip(entry["classes"], keep) if k], np.int64),
                                    [f for f, k in zip(entry["files"], keep) if k],
                                    [h for h, k in zip(entry["sha256"], keep) if k])
    for split, part in splits.items():
        empty = sorted(set(folders.classes) - {folders.classes[i] for i in np.unique(part.labels)})
        if empty:
            raise DataError(f"{folders.root / split}: no readable image of class {empty[0]!r} is left; add "
                            f"readable images of it")
    train = {h: f for h, f in zip(splits["train"].sha256, splits["train"].files)}
    leaked = [(f, train[h]) for split in ("val", "test") if split in splits
              for h, f in zip(splits[split].sha256, splits[split].files) if h in train]
    return CachedFolders(splits, size, digest, bad, skipped_in, leaked, folders.ignored)


def joined(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Two splits' images one after the other: a view of the memory map where they adjoin in it (train/ and
    val/, none left out), else a copy."""
    if (first.base is not None and first.base is second.base and first.flags.c_contiguous
            and second.flags.c_contiguous and first.ctypes.data + first.nbytes == second.ctypes.data):
        start = (first.ctypes.data - first.base.ctypes.data) // first.strides[0]
        return first.base[start:start + len(first) + len(second)]
    return np.concatenate([first, second])


def _matches(where: Path, text: str) -> bool:
    try:
        return (where / "manifest.json").read_text() == text and (where / "index.json").is_file()
    except OSError:
        return False


def _build(folders: ImageFolders, size: int, where: Path, text: str, progress: bool, workers: int | None) -> None:
    """Decode every image into a new folder beside `where`, then swap it in whole. The disk's room is checked
    first and the file reserved whole, so that a full disk is one line before any decoding."""
    total = sum(len(files) for files in folders.splits.values())
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(where.parent, where.name + ".")
        check_free(where.parent, total * 3 * size * size + 2**20, f"the image cache of {total} images at {size} px")
        staging = Path(tempfile.mkdtemp(prefix=f"{where.name}.{os.getpid()}-", dir=where.parent))
    except OSError as e:
        raise disk_error(e, where) or e from None
    try:
        target = str(staging / "images.npy")
        np.lib.format.open_memmap(target, "w+", np.uint8, (total, 3 * size * size)).flush()
        reserve(target, os.path.getsize(target))  # the workers write its pages: a full disk would kill them
        jobs = [(str(f.path), size, target, row) for row, f in
                enumerate(f for files in folders.splits.values() for f in files)]
        workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
        bar = tqdm(total=len(jobs), desc=f"decoding images at {size} px", unit="image", disable=not progress,
                   file=sys.stderr)
        index = {"splits": {}, "bad": []}
        results = _decoded(jobs, workers or 1)
        start = 0
        for split, files in folders.splits.items():
            ok, hashes = [], []
            for _ in files:
                sha, error = next(results)  # the pixels are in the file already
                bar.update()
                if error is not None:
                    index["bad"].append(error)
                ok.append(error is None)
                hashes.append(sha)
            index["splits"][split] = {"start": start, "files": [f.rel for f in files],
                                      "classes": [f.class_name for f in files], "ok": ok, "sha256": hashes}
            start += len(files)
        _OPEN.clear()
        bar.close()
        (staging / "index.json").write_text(json.dumps(index))
        (staging / "manifest.json").write_text(text)  # last: a cache without it is never read
        old = where.with_name(f"{where.name}.old.{os.getpid()}")  # this process's own: no stale one blocks it
        shutil.rmtree(old, ignore_errors=True)
        try:
            where.rename(old)
        except FileNotFoundError:
            pass
        try:
            staging.rename(where)
        except OSError:  # another process swapped in the same cache meanwhile: keep it if it is this one
            shutil.rmtree(staging, ignore_errors=True)
            if not _matches(where, text):
                raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise disk_error(e, where) or e from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _decoded(jobs, workers: int):
    """(sha256 of the file's bytes, one-line error or None) for each job, in order; each worker writes the
    pixels into the cache's file itself (nothing large crosses between processes). A worker that dies (killed,
    out of memory, a bus error) is a one-line error at once, not a wait for results that never come."""
    if workers <= 1 or len(jobs) < IN_PROCESS:
        yield from map(_decode, jobs)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield from pool.map(_decode, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers))))
    except BrokenProcessPool:
        raise DataError("a process decoding the images died (killed, out of memory, or a full disk under the cache); "
                        "check the memory and the disk of $BRANCHING_CACHE, then run again") from None
    finally:  # an error or an interrupt does not wait for the images still queued
        pool.shutdown(wait=False, cancel_futures=True)


_OPEN: dict[str, np.ndarray] = {}  # the cache file being written, memory-mapped once per process


def _decode(job):
    path, size, target, row = job
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return "", f"{path}: cannot read ({e.strerror or e})"
    sha = hashlib.sha256(data).hexdigest()
    try:
        pixels = decode_image(data, path, size)
    except DataError as e:
        return sha, str(e)
    if target not in _OPEN:
        _OPEN.clear()
        _OPEN[target] = np.load(target, mmap_mode="r+")
    _OPEN[target][row] = pixels
    return sha, None
