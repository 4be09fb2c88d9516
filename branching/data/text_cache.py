"""Encoded texts, cached (branching.data.encodings): a text folder's texts run once through a text parent's
transformer, and every pooling of every tap kept on disk (float32, memory-mapped when read back) under
$BRANCHING_CACHE.

A manifest records what the vectors depend on: the model files' sha256 (weights, config, tokenizer),
max_length, the poolings, the versions of transformers and torch, and the sha256 of each split's texts. A matching cache that reaches the taps
wanted is read back (its first columns when it reaches deeper); anything else encodes again, so runs,
`compare` and k-shot curves on the same texts encode them once.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from branching import distributed
from branching.console import log
from branching.data.encodings import load_or_encode
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
    key = hashlib.sha256(f"{wanted['root']}|{shape['files_sha256']}|{shape['max_length']}".encode()).hexdigest()[:16]
    where = cache_root() / f"text-{key}"
    found = load_or_encode(where, wanted, shape["depth"], lambda allocate, depth, arrays: _encode(
        folder, shape, depth, where, device, progress, allocate))
    columns = shape["depth"] * len(TEXT_POOLS) * shape["width"]
    every = found.arrays["vectors"]
    splits = {split: every[entry["start"]:entry["start"] + entry["count"], :columns]
              for split, entry in found.index["splits"].items()}
    return EncodedTexts(splits, {s: e["truncated"] for s, e in found.index["splits"].items()}, found.manifest_sha256,
                        found.encoded)


def _encode(folder: TextFolder, shape: dict, depth: int, where: Path, device, progress: bool, allocate) -> dict:
    """Every split's texts encoded to `depth` taps, in order, into the array `allocate` gives; under torchrun each
    rank encodes its share. Returns the index."""
    from branching.models.encoder import Encoder  # transformers is only imported where texts are encoded
    encoder = Encoder(shape["model"], shape["max_length"], device)
    texts = [t for part in folder.splits.values() for t in part.texts]
    log(f"encoding {len(texts)} texts of {folder.root} with {encoder.folder.name} on {device} "
        f"(cached under {where.parent})")
    vectors, cut = distributed.over_shards(
        len(texts), lambda rows: encoder.encode(texts[rows], depth, progress=progress))
    allocate("vectors", vectors.shape)[:] = vectors
    index, start = {"depth": depth, "splits": {}}, 0
    for split, part in folder.splits.items():
        count = len(part.texts)
        index["splits"][split] = {"start": start, "count": count, "truncated": int(cut[start:start + count].sum())}
        start += count
    return index
