"""The cache of an encoded parent's vectors (a text folder's texts through a transformer, images through a
pretrained network): float32 arrays under $BRANCHING_CACHE, written once into a new folder and swapped in whole,
memory-mapped when read back, beside a manifest of everything they depend on. A folder whose manifest matches
and which reaches the taps wanted serves every later command (its first columns where it reaches deeper);
anything else encodes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from branching import distributed
from branching.fileio import check_free, disk_error, reserve, sweep_stale

Allocate = Callable[[str, tuple], np.ndarray]  # (array name, shape) -> a writable float32 array to fill


@dataclass
class Encodings:
    arrays: dict[str, np.ndarray]   # by name, float32, memory-mapped (all their columns)
    index: dict                     # what the encoder recorded: "depth" (taps encoded), splits, ...
    manifest_sha256: str
    encoded: bool                   # whether this call ran the network (not the cache)


def load_or_encode(where: Path, manifest: dict, depth: int, encode: Callable[[Allocate, int, tuple], dict],
                   arrays: tuple = ("vectors",)) -> Encodings:
    """The arrays cached at `where` for `manifest`, if they reach `depth` taps and hold the `arrays` wanted (a cache
    holding more serves too); otherwise `encode(allocate, depth, arrays)` fills the arrays it allocates (in a new
    folder beside `where`, or in memory on the ranks that do not write) and returns its index (with "depth"), and
    they are swapped in. What a cache there held is encoded again too (its depth if deeper, its arrays), so that
    trees reading more and less do not replace each other's cache in turn. Under torchrun every rank encodes
    (each its share, the encoder's doing) if any lacks the cache, and rank 0 writes."""
    text = json.dumps(manifest, sort_keys=True)
    index = _index(where, text)
    held = tuple(index.get("arrays", ["vectors"])) if index else ()
    needed = index is None or index["depth"] < depth or not set(arrays) <= set(held)
    if distributed.sharding():
        needed = distributed.all_sum(torch.tensor([float(needed)])).item() > 0
    if not needed:
        arrays = {name: np.load(where / f"{name}.npy", mmap_mode="r") for name in index.get("arrays", ["vectors"])}
        return Encodings(arrays, index, hashlib.sha256(text.encode()).hexdigest(), False)
    writes = distributed.leads()
    try:
        if writes:
            where.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(where.parent, where.name + ".")
        staging = (Path(tempfile.mkdtemp(prefix=f"{where.name}.{os.getpid()}-", dir=where.parent)) if writes
                   else None)
    except OSError as e:
        raise disk_error(e, where) or e from None
    filled: dict[str, np.ndarray] = {}

    def allocate(name: str, shape: tuple) -> np.ndarray:
        if not writes:
            filled[name] = np.zeros(shape, np.float32)
            return filled[name]
        check_free(where.parent, 4 * int(np.prod(shape)) + 2**20, "the encodings cache")
        filled[name] = np.lib.format.open_memmap(staging / f"{name}.npy", "w+", np.float32, shape)
        reserve(staging / f"{name}.npy", os.path.getsize(staging / f"{name}.npy"))  # full disk: an error now
        return filled[name]

    if index is not None:
        depth, arrays = max(depth, index["depth"]), tuple(dict.fromkeys((*arrays, *held)))
    try:
        index = {**encode(allocate, depth, arrays), "arrays": list(filled)}
        if writes:
            for array in filled.values():
                array.flush()
            filled.clear()  # the memory maps closed before the folder moves
            index = _swap_in(staging, where, index, text)
    except OSError as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise disk_error(e, where) or e from None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    arrays = ({name: np.load(where / f"{name}.npy", mmap_mode="r") for name in index["arrays"]} if writes else filled)
    return Encodings(arrays, index, hashlib.sha256(text.encode()).hexdigest(), True)


def _index(where: Path, text: str) -> dict | None:
    try:
        if (where / "manifest.json").read_text() != text:
            return None
        return json.loads((where / "index.json").read_text())
    except (OSError, ValueError):
        return None


def _swap_in(staging: Path, where: Path, index: dict, text: str) -> dict:
    """The staged folder in place of `where`, whole; returns the index of the folder there at the end (this one,
    or another process's swapped in meanwhile that serves as well)."""
    (staging / "index.json").write_text(json.dumps(index))
    (staging / "manifest.json").write_text(text)  # last: a cache without it is never read
    old = where.with_name(f"{where.name}.old.{os.getpid()}")  # this process's own: no stale one blocks it
    shutil.rmtree(old, ignore_errors=True)
    if where.exists():
        where.rename(old)
    try:
        staging.rename(where)
    except OSError:  # another process swapped in a cache meanwhile: keep it if it serves as well
        shutil.rmtree(staging, ignore_errors=True)
        found = _index(where, text)
        if (found is None or found["depth"] < index["depth"]
                or not set(index["arrays"]) <= set(found.get("arrays", ["vectors"]))):
            raise
        index = found
    shutil.rmtree(old, ignore_errors=True)
    return index
