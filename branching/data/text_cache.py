"""Encoded texts, cached: a text folder's texts run once through a text parent's transformer, and every
pooling of every tap kept on disk (float32, memory-mapped when read back) under $BRANCHING_CACHE.

A manifest records what the vectors depend on: the model files' sha256 (weights, config, tokenizer),
max_length, the poolings, the versions of transformers and torch, and the sha256 of each split's texts. A matching cache that reaches the taps
wanted is read back (its first columns when it reaches deeper); anything else encodes again, so runs,
`compare` and k-shot curves on the same texts encode them once.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from branching import distributed
from branching.console import log
from branching.data.image_cache import cache_root
from branching.data.texts import TextFolder
from branching.models.device import CPU
from branching.models.text import TEXT_POOLS

VERSION = 1


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass
class EncodedTexts:
    splits: dict[str, np.ndarray]   # float32 (N, depth * len(TEXT_POOLS) * width) per split
    truncated: dict[str, int]       # texts cut at max_length, per split
    manifest_sha256: str
    encoded: bool                   # whether this call ran the transformer (not the cache)


def manifest(folder: TextFolder, shape: dict) -> dict:
    return {"version": VERSION, "root": str(folder.root.resolve()), "model": shape["model"],
            "files_sha256": shape["files_sha256"], "max_length": shape["max_length"], "pools": list(TEXT_POOLS),
            "width": shape["width"], "transformers": _version("transformers"), "torch": torch.__version__,
            "texts_sha256": {split: hashlib.sha256(json.dumps(part.texts).encode()).hexdigest()
                             for split, part in folder.splits.items()}}


def load_encoded(folder: TextFolder, shape: dict, device=CPU, progress: bool = True) -> EncodedTexts:
    """Every split of `folder` encoded to the parent's depth (shape: a text parent's shape keys)."""
    wanted = manifest(folder, shape)
    text = json.dumps(wanted, sort_keys=True)
    key = hashlib.sha256(f"{wanted['root']}|{shape['files_sha256']}|{shape['max_length']}".encode()).hexdigest()[:16]
    where = cache_root() / f"text-{key}"
    depth, columns = shape["depth"], shape["depth"] * len(TEXT_POOLS) * shape["width"]
    index = _index(where, text)
    encoded = index is None or index["depth"] < depth
    if distributed.sharding():  # under torchrun: encode together (each rank its share) if any rank lacks the cache
        encoded = distributed.all_sum(torch.tensor([float(encoded)])).item() > 0
    if encoded:
        every, index = _encode(folder, shape, where, device, progress)
        if distributed.leads():  # stored, then read back memory-mapped (the other ranks keep their copy)
            _store(every, index, where, text, shape["depth"])
            every = np.load(where / "vectors.npy", mmap_mode="r")
    else:
        every = np.load(where / "vectors.npy", mmap_mode="r")
    splits = {split: every[entry["start"]:entry["start"] + entry["count"], :columns]
              for split, entry in index["splits"].items()}
    return EncodedTexts(splits, {s: e["truncated"] for s, e in index["splits"].items()},
                        hashlib.sha256(text.encode()).hexdigest(), encoded)


def _index(where: Path, text: str) -> dict | None:
    try:
        if (where / "manifest.json").read_text() != text:
            return None
        return json.loads((where / "index.json").read_text())
    except (OSError, ValueError):
        return None


def _encode(folder: TextFolder, shape: dict, where: Path, device, progress: bool):
    """(vectors, index) of every split's texts, in order; under torchrun each rank encodes its share."""
    from branching.models.encoder import Encoder  # transformers is only imported where texts are encoded
    encoder = Encoder(shape["model"], shape["max_length"], device)
    texts = [t for part in folder.splits.values() for t in part.texts]
    log(f"encoding {len(texts)} texts of {folder.root} with {encoder.folder.name} on {device} "
        f"(cached under {where.parent})")
    vectors, cut = distributed.over_shards(
        len(texts), lambda rows: encoder.encode(texts[rows], shape["depth"], progress=progress))
    index, start = {"depth": shape["depth"], "splits": {}}, 0
    for split, part in folder.splits.items():
        count = len(part.texts)
        index["splits"][split] = {"start": start, "count": count, "truncated": int(cut[start:start + count].sum())}
        start += count
    return vectors, index


def _store(vectors: np.ndarray, index: dict, where: Path, text: str, depth: int) -> None:
    """The vectors into a new folder beside `where`, then swapped in whole."""
    where.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=where.name + ".", dir=where.parent))
    try:
        np.save(staging / "vectors.npy", vectors)
        (staging / "index.json").write_text(json.dumps(index))
        (staging / "manifest.json").write_text(text)  # last: a cache without it is never read
        old = where.with_name(f"{where.name}.old.{os.getpid()}")  # this process's own: no stale one blocks it
        shutil.rmtree(old, ignore_errors=True)
        if where.exists():
            where.rename(old)
        try:
            staging.rename(where)
        except OSError:  # another process swapped in a cache meanwhile: keep it if it serves this tree
            shutil.rmtree(staging, ignore_errors=True)
            found = _index(where, text)
            if found is None or found["depth"] < depth:
                raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
