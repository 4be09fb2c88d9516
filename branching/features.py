"""Hidden-layer features for branch training: several layers in one pass, and a cache on disk.

`extract` computes each node's trunk once per batch for every requested (node, layer, where) and
runs each model only as deep as the deepest layer any request (or any reader downstream) needs.

`FeatureCache` keeps the features of a set of training rows, and of the same images flipped
left-right (for training with flips), beside a manifest of everything they depend on: the
fingerprints of every model on the way from the parent, the parent's normalisation, the data
files, the layer, pre/post, dtype, the row set, and the files' own hashes. An entry whose manifest
differs in anything is rebuilt, never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchly import Model

from .normalization import Normalizer

FORMAT = "branching-features/1"
MANIFEST = "manifest.json"
BATCH = 4096


# ---- extraction ------------------------------------------------------------------------------

def _chain(models: dict[str, Model], node: str) -> list[str]:
    names = [node]
    while names[0] != "parent":
        names.insert(0, models[names[0]].meta["source"])
    return names


def _stop(model: Model, layer: int, where: str) -> int:
    """How many leading modules of model.net produce hidden layer `layer` at `where`."""
    linears = [i for i, m in enumerate(model.net) if isinstance(m, nn.Linear)]
    return linears[layer] + (1 if where == "pre" else 2)


def plan(models: dict[str, Model], requests) -> dict[str, set[tuple[int, str]]]:
    """For each node that must run: the (layer, where) outputs wanted of it, by requests or readers."""
    need: dict[str, set[tuple[int, str]]] = {}
    pending = [(node, int(layer) % models[node].n_hidden, where) for node, layer, where in requests]
    while pending:
        node, layer, where = pending.pop()
        need.setdefault(node, set()).add((layer, where))
        if node != "parent":
            meta = models[node].meta
            pending.append((meta["source"], meta["layer"], meta["where"]))
    return need


def forward_taps(models: dict[str, Model], need: dict, x: torch.Tensor) -> dict[tuple, torch.Tensor]:
    """The outputs in `need` for normalised images x, keyed (node, layer, where)."""
    out: dict[tuple, torch.Tensor] = {}
    for node in sorted(need, key=lambda n: len(_chain(models, n))):
        model = models[node]
        if node == "parent":
            h = x
        else:
            meta = model.meta
            h = out[(meta["source"], meta["layer"], meta["where"])]
        stops = {_stop(model, layer, where): (layer, where) for layer, where in need[node]}
        for i, module in enumerate(model.net[:max(stops)], start=1):
            h = module(h)
            if i in stops:
                out[(node, *stops[i])] = h
    return out


def extract(models: dict[str, Model], requests, X: np.ndarray, batch_size: int = BATCH) -> list[np.ndarray]:
    """Features (float32) of normalised images X for each (node, layer, where) in requests, in order."""
    need = plan(models, requests)
    keys = [(node, int(layer) % models[node].n_hidden, where) for node, layer, where in requests]
    for m in models.values():
        m.net.eval()
    parts: list[list[torch.Tensor]] = [[] for _ in keys]
    with torch.inference_mode():
        for start in range(0, len(X), batch_size):
            taps = forward_taps(models, need, torch.from_numpy(np.ascontiguousarray(X[start:start + batch_size])))
            for part, key in zip(parts, keys):
                part.append(taps[key])
    if not len(X):
        return [np.zeros((0, models[k[0]].width(k[1])), np.float32) for k in keys]
    return [torch.cat(part).numpy() for part in parts]


def flip_all(X: np.ndarray, normalizer: Normalizer) -> np.ndarray:
    """Normalised images mirrored left-right (in pixel space, then normalised again)."""
    mean, std = normalizer.mean, normalizer.std
    images = (X * std + mean).reshape(-1, 3, 32, 32)[..., ::-1]
    return ((images.reshape(len(X), -1) - mean) / std).astype(np.float32)


# ---- the cache -------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FeatureCache:
    """A folder of cached features, one subfolder per (source, layer, where, row set)."""

    def __init__(self, directory, log=None):
        self.directory = Path(directory)
        self.log = log or (lambda message: None)

    def manifest(self, models, source: str, layer: int, where: str, rows: np.ndarray, data_hashes: dict,
                 variants) -> dict:
        """Everything the features depend on."""
        parent = models["parent"]
        norm = Normalizer.from_dict(parent.meta["normalization"])
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        return {"format": FORMAT, "source": source, "layer": int(layer) % models[source].n_hidden,
                "where": where, "dtype": "float32", "width": models[source].width(layer),
                "parent_fingerprint": parent.fingerprint(),
                "chain": {name: models[name].fingerprint() for name in _chain(models, source)},
                "normalization_sha256": _sha256(norm.mean.tobytes() + norm.std.tobytes()),
                "data": {k: v for k, v in sorted(data_hashes.items()) if k != "dir"},
                "rows": {"count": len(rows), "sha256": _sha256(rows.tobytes())},
                "variants": list(variants)}

    def entry(self, manifest: dict) -> Path:
        return self.directory / (f"{manifest['source']}-layer{manifest['layer']}-{manifest['where']}-"
                                 f"{manifest['rows']['sha256'][:12]}")

    def load(self, manifest: dict) -> dict[str, np.ndarray] | None:
        """The cached arrays if the entry's manifest and files match exactly; else None (and why, in the log)."""
        folder = self.entry(manifest)
        try:
            stored = json.loads((folder / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.log(f"feature cache {folder}: unreadable manifest; rebuilding")
            return None
        files = stored.pop("files", {}) if isinstance(stored, dict) else {}
        if stored != manifest:
            changed = sorted(k for k in set(stored) | set(manifest) if stored.get(k) != manifest.get(k))
            self.log(f"feature cache {folder}: {', '.join(changed)} changed; rebuilding")
            return None
        arrays = {}
        for variant in manifest["variants"]:
            path = folder / f"{variant}.npy"
            try:
                data = path.read_bytes()
            except OSError:
                data = b""
            if _sha256(data) != files.get(path.name):
                self.log(f"feature cache {folder}: {path.name} is missing or altered; rebuilding")
                return None
            arrays[variant] = np.load(path, allow_pickle=False)
        return arrays

    def store(self, manifest: dict, arrays: dict[str, np.ndarray]) -> None:
        folder = self.entry(manifest)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # no manifest: no reuse until everything is written
        files = {}
        for variant, array in arrays.items():
            path = folder / f"{variant}.npy"
            with tempfile.TemporaryFile() as f:
                np.save(f, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
                f.seek(0)
                data = f.read()
            _write_atomic(path, data)
            files[path.name] = _sha256(data)
        _write_atomic(folder / MANIFEST, (json.dumps({**manifest, "files": files}, indent=2) + "\n").encode())

    def features(self, models, source: str, layer: int, where: str, X: np.ndarray, rows: np.ndarray,
                 data_hashes: dict, flips: bool = False) -> dict[str, np.ndarray]:
        """{"plain": features of X[i] (image rows[i])} and, with flips, {"flipped": of X[i] mirrored}."""
        variants = ("plain", "flipped") if flips else ("plain",)
        manifest = self.manifest(models, source, layer, where, rows, data_hashes, variants)
        arrays = self.load(manifest)
        if arrays is not None:
            self.log(f"feature cache {self.entry(manifest)}: reusing")
            return arrays
        normalizer = Normalizer.from_dict(models["parent"].meta["normalization"])
        inputs = {"plain": X, "flipped": flip_all(X, normalizer) if flips else None}
        arrays = {v: extract(models, [(source, layer, where)], inputs[v])[0] for v in variants}
        self.store(manifest, arrays)
        self.log(f"feature cache {self.entry(manifest)}: built ({len(X)} images, {', '.join(variants)})")
        return arrays


def branch_inputs(cache: FeatureCache, models, data_hashes: dict, source: str, layer: int, where: str,
                  X: np.ndarray, rows: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, flips: bool):
    """(train inputs, train transform or None, validation features) for Model.fit, from the cache.

    With flips the training inputs are row positions and the transform looks up the plain or the
    flipped features, drawing the same coin per image as pipeline.flip_images does.
    """
    arrays = cache.features(models, source, layer, where, X, rows, data_hashes, flips)
    features_val = arrays["plain"][val_idx]
    if not flips:
        return arrays["plain"][train_idx], None, features_val
    plain = torch.from_numpy(np.ascontiguousarray(arrays["plain"][train_idx]))
    flipped = torch.from_numpy(np.ascontiguousarray(arrays["flipped"][train_idx]))

    def transform(positions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        index = positions[:, 0].long()
        flip = torch.rand(len(index), generator=generator) < 0.5
        return torch.where(flip[:, None], flipped[index], plain[index])

    positions = np.arange(len(train_idx), dtype=np.float32)[:, None]
    return positions, transform, features_val
