"""A tree's data: the splits of a data folder and the rows of each node's classes (TreeData), loaded
and checked against the tree before any work (load_tree_data)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from branching.data.cifar import FINE_LABEL_NAMES, Split, load_label_names, load_split, resolve_classes, select
from branching.data.download import ensure_cifar100
from branching.errors import ConfigError, DataError


@dataclass
class TreeData:
    """The two splits of a CIFAR-100 folder and the official ids of the tree's classes."""

    data_dir: Path
    label_names: list[str]
    train: Split
    test: Split

    train_keep: np.ndarray | None = None  # training rows a k-shot comparison may use (None: all)

    def node_rows(self, split: str, spec):
        """(uint8 images, labels as positions in spec.classes, row numbers in the split file)."""
        images, labels, rows = select(getattr(self, split), resolve_classes(spec.classes, self.label_names))
        if split == "train" and self.train_keep is not None:
            keep = self.train_keep[rows]
            return images[keep], labels[keep], rows[keep]
        return images, labels, rows

    def limited(self, keep: np.ndarray) -> "TreeData":
        """The same data with only the training rows where `keep` (a mask over the training split) is true."""
        return replace(self, train_keep=np.asarray(keep, dtype=bool))

    def class_rows(self, name: str) -> np.ndarray:
        """Row numbers of class `name` in the whole training split."""
        return select(self.train, resolve_classes([name], self.label_names))[2]

    _fingerprint: dict | None = field(default=None, repr=False, compare=False)

    def fingerprint(self) -> dict:
        """The folder and the sha256 of its three files, hashed once (every branch and cache entry asks)."""
        if self._fingerprint is None:
            digest = lambda name: hashlib.sha256((self.data_dir / name).read_bytes()).hexdigest()[:16]  # noqa: E731
            self._fingerprint = {"dir": str(self.data_dir), **{f"{n}_sha256": digest(n) for n in ("train", "test", "meta")}}
        return dict(self._fingerprint)


def load_tree_data(config, data_dir, download: bool = False, progress: bool = True) -> TreeData:
    """Load (and, if asked, download) the data, checking that every class of the tree (a
    branching.config.tree.TreeConfig) exists in it."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise DataError(f"--data {data_dir} is a file, not a folder; pass the folder that holds the data (for "
                        f"CIFAR-100, the folder of its files train, test and meta)")
    for spec in (config.parent, *(b for b in config.branches.values() if b.new_classes)):
        try:  # before any download
            resolve_classes(spec.classes, list(FINE_LABEL_NAMES))
        except DataError as e:
            table = "[parent]" if spec.source is None else f"[branches.{spec.name}]"
            raise ConfigError(f"{config.path or '<config>'}: {table} classes: {e}") from None
    classes = config.classes()
    fine_ids = resolve_classes(classes, list(FINE_LABEL_NAMES))
    if download:
        ensure_cifar100(data_dir, progress=progress)
    elif not all((data_dir / n).is_file() for n in ("train", "test", "meta")):
        raise DataError(f"no CIFAR-100 files (train, test, meta) in {data_dir}; put the official cifar-100-python "
                        f"files there, or run a training command without --no-download to fetch them")
    data = TreeData(data_dir, load_label_names(data_dir), load_split(data_dir, "train"), load_split(data_dir, "test"))
    for split in ("train", "test"):
        present = set(np.unique(getattr(data, split).fine_labels).tolist())
        missing = [name for name, i in zip(classes, fine_ids) if i not in present]
        if missing:
            raise DataError(f"{data_dir / split} has no images of {', '.join(map(repr, missing))}, classes of the tree "
                            f"in {config.path or '<config>'}; pass --config with a tree of the data's classes (the "
                            f"default is the original study's fish and flower tree)")
    return data
