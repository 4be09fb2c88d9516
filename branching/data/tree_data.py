"""A tree's data: the splits of a data folder (CIFAR-100's files, or image folders decoded into the
image cache) and the rows of each node's classes (TreeData), loaded and checked against the tree before
any work (load_tree_data)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from branching import distributed
from branching.data.cifar import (FINE_LABEL_NAMES, Split, load_label_names, load_split, resolve_classes, select_rows,
                                  unused_classes)
from branching.data.download import ensure_cifar100
from branching.data.folders import is_image_folder, scan
from branching.data.image_cache import CachedFolders, joined, load_cached
from branching.data.text_data import is_text_folder, load_text_data, text_notes
from branching.console import log
from branching.errors import ConfigError, DataError, did_you_mean
from branching.models.device import CPU


@dataclass
class TreeData:
    """The training and test splits and the names of their labels: CIFAR-100's (its 100 fine classes,
    official ids) or image folders' (their classes, sorted; a val/ folder's images come after train/'s in
    the training split, its rows `val_rows`)."""

    data_dir: Path
    label_names: list[str]
    train: Split
    test: Split

    train_keep: np.ndarray | None = None  # training rows a k-shot comparison may use (None: all)
    val_rows: np.ndarray | None = None    # training rows of a val/ folder: every node validates on them
    folders: CachedFolders | None = None  # image folders: the cache they were read from
    texts: dict | None = None             # a text folder: its counts (texts, cut at max_length, leaked)
    raw_texts: dict | None = None         # a text folder: the texts of "train" (then val's) and "test", by row
    mirrored: np.ndarray | None = None    # encoded images: the training split's mirror images, row for row
    encodings: dict | None = None         # encoded images: the network, its input size, the taps encoded
    raw_images: dict | None = None        # encoded images: the pixels of "train" and "test", by row
    unused: dict | None = None            # image or text folders: classes no node of the tree names, and their count

    @property
    def side(self) -> int:
        """The side of the square images."""
        return int(round((self.train.images.shape[1] // 3) ** 0.5))

    def node_rows(self, split: str, spec):
        """(uint8 images, labels as positions in spec.classes, row numbers in the split file)."""
        labels, rows = self.node_labels(split, spec)
        images = getattr(self, split).images
        return (images if len(rows) == len(images) else images[rows]), labels, rows  # all rows: no copy

    def node_labels(self, split: str, spec):
        """node_rows without reading any image: (labels as positions in spec.classes, row numbers)."""
        labels, rows = select_rows(getattr(self, split), resolve_classes(spec.classes, self.label_names),
                                   self.label_names)
        if split == "train" and self.train_keep is not None:
            keep = self.train_keep[rows]
            return labels[keep], rows[keep]
        return labels, rows

    def augments(self, r):
        """A recipe node `r` (branching.config.recipes.NodeRecipe) as these data allow it: mirror images only where
        they are known (pixels; an encoded parent's vectors where its mirror images were encoded too), shifts only of
        pixels (not of texts' or images' encodings)."""
        if self.texts is None and self.encodings is None:
            return r
        flip = r.flip and self.mirrored is not None
        return r if (flip, 0) == (r.flip, r.crop) else replace(r, flip=flip, crop=0)

    def limited(self, keep: np.ndarray) -> "TreeData":
        """The same data with only the training rows where `keep` (a mask over the training split) is true."""
        return replace(self, train_keep=np.asarray(keep, dtype=bool))

    def class_rows(self, name: str) -> np.ndarray:
        """Row numbers of class `name` in the whole training split."""
        return select_rows(self.train, resolve_classes([name], self.label_names), self.label_names)[1]

    _fingerprint: dict | None = field(default=None, repr=False, compare=False)

    def facts(self) -> dict:
        """The fingerprint, and for image folders their image size, counts of images per split, of images
        left out, of leaked test images and of ignored files (a run's metrics.json records them)."""
        unused = {} if not self.unused else {"unused_classes": self.unused}
        if self.texts is not None:
            return {**self.fingerprint(), **self.texts, **unused}
        encoded = {} if self.encodings is None else {"encodings": self.encodings}
        if self.folders is None:
            return {**self.fingerprint(), **encoded}
        cached = self.folders
        return {**self.fingerprint(), **encoded, **unused, "image_size": cached.size,
                "images": {split: len(part.files) for split, part in cached.splits.items()},
                "skipped_images": cached.skipped, "leaked_images": [list(pair) for pair in cached.leaked],
                "ignored_files": cached.ignored}

    def fingerprint(self) -> dict:
        """The folder and the sha256 of its three files (image folders: of the cache's manifest), hashed
        once (every branch and cache entry asks)."""
        if self._fingerprint is None and self.folders is not None:
            self._fingerprint = {"dir": str(self.data_dir), "manifest_sha256": self.folders.manifest_sha256[:16]}
        if self._fingerprint is None:
            digest = lambda name: hashlib.sha256((self.data_dir / name).read_bytes()).hexdigest()[:16]  # noqa: E731
            self._fingerprint = {"dir": str(self.data_dir), **{f"{n}_sha256": digest(n) for n in ("train", "test", "meta")}}
        return dict(self._fingerprint)


def data_notes(data: TreeData) -> dict[str, str]:
    """What a user of image folders should know before trusting the figures: images left out, test
    images that are also training images, files that are not images."""
    cached, notes = data.folders, {}
    if data.unused:
        noun = "texts" if data.texts is not None else "images"
        named = ", ".join(f"{name!r} ({n} training {noun})" for name, n in list(data.unused.items())[:5])
        more = f" and {len(data.unused) - 5} more" if len(data.unused) > 5 else ""
        notes["unused_classes"] = (f"the data hold classes no node of the tree names: {named}{more}; they are left "
                                   f"out (add them to a node's classes to use them)")
    if data.texts is not None:
        return {**text_notes(data.texts), **notes}
    if cached is None:
        return notes
    if cached.skipped:
        notes["skipped_images"] = (f"{len(cached.skipped)} unreadable image(s) left out (--skip-bad-images), "
                                   f"e.g. {cached.skipped[0]}")
    if cached.leaked:
        held, train = cached.leaked[0]
        notes["leakage"] = (f"{len(cached.leaked)} validation or test image(s) have the same bytes as a training "
                            f"image, e.g. {held} = {train}: their figures are not held-out; remove the copies")
    return notes


def load_tree_data(config, data_dir, download: bool = False, progress: bool = True,
                   skip_bad_images: bool = False, device=CPU) -> TreeData:
    """Load (and, if asked, download) the data, checking that every class of the tree (a
    branching.config.tree.TreeConfig) exists in it. Texts (a text parent's) are encoded on `device`. Under
    torchrun rank 0 loads images first (it downloads, or builds the image cache) and the others after it."""
    data_dir = Path(data_dir)
    kind = config.parent.net_kind
    if kind.reads == "texts" or is_text_folder(data_dir):  # the ranks encode the texts together
        return TreeData(**load_text_data(config, data_dir, progress, device))
    with distributed.main_first():
        data = _load_image_data(config, data_dir, download, progress, skip_bad_images)
    if kind.encoded:  # through the parent's frozen network, once (the ranks together)
        from branching.data.image_encodings import encode_tree_data
        data = encode_tree_data(config, data, device, progress)
    return data


def _load_image_data(config, data_dir: Path, download, progress, skip_bad_images) -> TreeData:
    if data_dir.is_file():
        raise DataError(f"--data {data_dir} is a file, not a folder; pass the folder that holds the data (for "
                        f"CIFAR-100, the folder of its files train, test and meta; else image folders train/ "
                        f"and test/)")
    if not data_dir.exists():
        parent = data_dir.absolute().parent
        close = did_you_mean(data_dir.name, [p.name for p in parent.iterdir() if p.is_dir()]) if parent.is_dir() else ""
        if not download or close or not parent.is_dir() or config.image_size is not None:
            raise DataError(f"--data {data_dir}: no such folder{close}; pass the folder of the data (image folders "
                            f"train/ and test/, or CIFAR-100's files train, test, meta)"
                            + ("" if close or not download else ", or a new folder in an existing one to download "
                               "CIFAR-100 into"))
        log(f"--data {data_dir} does not exist: downloading CIFAR-100 (161 MB) into it")
    if is_image_folder(data_dir):
        return load_folder_data(config, data_dir, progress, skip_bad_images)
    if config.side != 32 and not config.parent.net_kind.encoded:  # an encoded parent resizes them in its trunk
        raise ConfigError(f"{config.path or '<config>'}: [data] image_size = {config.side}, but CIFAR-100's files "
                          f"in {data_dir} hold 32-pixel images; leave out image_size, or pass image folders")
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


def load_folder_data(config, data_dir: Path, progress: bool = True, skip_bad_images: bool = False) -> TreeData:
    """Image folders (branching.data.folders) at the tree's image size, through the image cache."""
    folders = scan(data_dir)  # the layout, checked before anything is decoded
    counts: dict[str, int] = {}
    for f in folders.splits["train"]:
        counts[f.class_name] = counts.get(f.class_name, 0) + 1
    unused = unused_classes(config, data_dir, folders.classes, counts, "images")
    where = f"class of {data_dir}"
    for spec in (config.parent, *(b for b in config.branches.values() if b.new_classes)):
        try:
            resolve_classes(spec.classes, folders.classes, where)
        except DataError as e:
            table = "[parent]" if spec.source is None else f"[branches.{spec.name}]"
            raise ConfigError(f"{config.path or '<config>'}: {table} classes: {e}; branching init --data "
                              f"{data_dir} writes a tree of them") from None
    cached = load_cached(folders, config.side, skip_bad=skip_bad_images, progress=progress)
    parts = cached.splits
    train, val = parts["train"], parts.get("val")
    if val is not None:
        images = joined(train.images, val.images)
        labels, files = np.concatenate([train.labels, val.labels]), train.files + val.files
        val_rows = np.arange(len(train.labels), len(labels))
    else:
        images, labels, files, val_rows = train.images, train.labels, train.files, None
    test = parts["test"]
    return TreeData(data_dir, folders.classes, Split(images, labels, files),
                    Split(test.images, test.labels, test.files), val_rows=val_rows, folders=cached, unused=unused)
