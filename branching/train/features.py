"""A cache on disk of hidden-layer features for branch training.

`FeatureCache` keeps the features of a set of training rows, and of the same images flipped
left-right (for training with flips), beside a manifest of everything they depend on: the
fingerprints of every model on the way from the parent, the parent's normalisation, the data
files, the layer, pre/post, dtype, the row set, and the files' own hashes. An entry whose manifest
differs in anything is rebuilt, never reused.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from branching import distributed
from branching.data.normalization import Normalizer
from branching.fileio import write_bytes, write_json
from branching.models.batches import Augment
from branching.models.forward import chain, extract, extract_mirrored, read

FORMAT = "branching-features/1"
MANIFEST = "manifest.json"


# ---- the cache -------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureCache:
    """A folder of cached features, one subfolder per (source, layer, where, row set)."""

    def __init__(self, directory, log=None):
        self.directory = Path(directory)
        self.log = log or (lambda message: None)

    def manifest(self, models, r: tuple, rows: np.ndarray, data_hashes: dict, variants) -> dict:
        """Everything the features of read r (source, layer, where, pool) depend on."""
        source, layer, where, pool = read(models, *r)
        parent = models["parent"]
        norm = Normalizer.from_dict(parent.meta.normalization)
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        return {"format": FORMAT, "source": source, "kind": models[source].kind, "layer": layer, "where": where,
                "pool": pool, "dtype": "float32", "width": models[source].width(layer, where, pool),
                "parent_fingerprint": parent.fingerprint(),
                "chain": {name: models[name].fingerprint() for name in chain(models, source)},
                "normalization_sha256": _sha256(norm.mean.tobytes() + norm.std.tobytes()),
                "data": {k: v for k, v in sorted(data_hashes.items()) if k != "dir"},
                "rows": {"count": len(rows), "sha256": _sha256(rows.tobytes())},
                "variants": list(variants),
                # features read on a GPU (TF32, other kernels) differ in their last bits from the CPU's
                "device": parent.device.type if parent.device.type == "cpu" else
                f"{parent.device.type} tf32={torch.backends.cudnn.allow_tf32}"}

    def entry(self, manifest: dict) -> Path:
        return self.directory / (f"{manifest['source']}-layer{manifest['layer']}-{manifest['where']}-"
                                 f"{manifest['pool']}-{manifest['rows']['sha256'][:12]}")

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
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
            data = buffer.getvalue()
            write_bytes(path, data)
            files[path.name] = _sha256(data)
        write_json(folder / MANIFEST, {**manifest, "files": files})

    def features(self, models, r: tuple, X: np.ndarray, rows: np.ndarray, data_hashes: dict,
                 flips: bool = False) -> dict[str, np.ndarray]:
        """{"plain": read r (source, layer, where[, pool]) of X[i] (image rows[i])} and, with flips,
        {"flipped": of X[i] mirrored}."""
        variants = ("plain", "flipped") if flips else ("plain",)
        manifest = self.manifest(models, r, rows, data_hashes, variants)
        # under torchrun rank 0 reads and writes the cache, and every rank follows what it found
        arrays = distributed.broadcast(self.load(manifest) if distributed.leads() else None)
        if arrays is not None:
            self.log(f"feature cache {self.entry(manifest)}: reusing")
            return arrays
        normalizer = Normalizer.from_dict(models["parent"].meta.normalization)
        arrays = {"plain": extract(models, [r], X)[0]}
        if flips:
            arrays["flipped"] = extract_mirrored(models, r, X, normalizer)
        if distributed.leads():
            self.store(manifest, arrays)
        self.log(f"feature cache {self.entry(manifest)}: built ({len(X)} inputs, {', '.join(variants)})")
        return arrays


def branch_inputs(cache: FeatureCache, models, data_hashes: dict, r: tuple, X: np.ndarray, rows: np.ndarray,
                  train_idx: np.ndarray, val_idx: np.ndarray, flips: bool):
    """(train inputs, train transform or None, validation features) for Model.fit, from the cache;
    r is the read (source, layer, where[, pool]) of the branch. With flips the transform picks, by a coin per
    image, the features of its mirror image (batches.Augment with `mirrored`)."""
    arrays = cache.features(models, r, X, rows, data_hashes, flips)
    features_val = arrays["plain"][val_idx]
    if not flips:
        return arrays["plain"][train_idx], None, features_val
    return arrays["plain"][train_idx], Augment(mirrored=arrays["flipped"][train_idx]), features_val
