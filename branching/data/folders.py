"""Image folders in the layout of torchvision's ImageFolder: DATA/train/.../CLASS/image, DATA/test/...,
and optionally DATA/val/... A folder that holds images is a class, named by the folder; the folders
above it are its groups (tomato/early_blight: class early_blight in group tomato).

`scan` lists every split's images and checks the layout before anything is decoded: the same classes in
every split, no empty class, no class name in two groups, no link that leads outside the data folder.
Files that are not images (.DS_Store, Thumbs.db, notes) are ignored and counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from branching.data.images import IMAGE_SUFFIXES
from branching.errors import DataError

SPLITS = ("train", "val", "test")  # val/ is optional: without it the recipe holds out part of train/


@dataclass(frozen=True)
class ImageFile:
    path: Path       # where it is read from
    rel: str         # its path inside the data folder, as reports name it
    class_name: str
    size: int        # bytes and modification time: a change makes the cache rebuild
    mtime_ns: int


@dataclass
class ImageFolders:
    root: Path
    splits: dict[str, list[ImageFile]]            # each sorted by (file name, relative path)
    classes: list[str]                            # sorted
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # class -> its groups, outermost first
    ignored: int = 0                              # files that are not images


def is_image_folder(path) -> bool:
    """Whether `path` is laid out as image folders (it has a train/ folder)."""
    return (Path(path) / "train").is_dir()


def scan(root) -> ImageFolders:
    """Every image of DATA/train, DATA/test and (if present) DATA/val, checked as the module says."""
    root = Path(root)
    inside = root.resolve()
    if not (root / "test").is_dir():
        raise DataError(f"{root} has train/ but no test/ folder; add test/ with the same class folders (a "
                        f"held-out share of the images, never trained on)")
    splits, groups, ignored = {}, {}, 0
    for split in SPLITS:
        if not (root / split).is_dir():
            continue
        files, found, skipped = _walk(root, split, inside)
        splits[split], ignored = files, ignored + skipped
        groups[split] = found
    train = groups["train"]
    for split in splits:
        missing = sorted(set(train) - set(groups[split]))
        extra = sorted(set(groups[split]) - set(train))
        if extra:
            raise DataError(f"{root / split} has class folders that train/ lacks: {_few(extra)}; add them to "
                            f"train/ or remove them from {split}/")
        if missing:
            raise DataError(f"{root / split} lacks class folders of train/: {_few(missing)}; every class needs "
                            f"images in {split}/ too")
        moved = [c for c in train if groups[split][c] != train[c]]
        if moved:
            c = moved[0]
            raise DataError(f"class {c!r} is in {'/'.join(train[c]) or 'the top'} of train/ but in "
                            f"{'/'.join(groups[split][c]) or 'the top'} of {split}/; put it in the same group")
    return ImageFolders(root, splits, sorted(train), train, ignored)


def _walk(root: Path, split: str, inside: Path):
    """(the split's images sorted, {class: groups}, how many other files were ignored)."""
    files: list[ImageFile] = []
    classes: dict[str, tuple[str, ...]] = {}
    ignored = 0
    seen: set[Path] = set()
    pending = [(root / split, ())]
    while pending:
        folder, parts = pending.pop()
        real = folder.resolve()
        if real != inside and inside not in real.parents:
            raise DataError(f"{folder} links to {real}, outside the data folder {root}; copy what it points "
                            f"to into {root} or remove the link")
        if real in seen:
            continue  # a link back to a folder already walked
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list {folder} ({e.strerror or e}); check its permissions") from None
        images, subfolders = [], []
        for entry in entries:
            if entry.name.startswith("."):
                ignored += entry.is_file()
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                _check_link(path, real, root)
            if entry.is_dir():
                subfolders.append(path)
            elif entry.is_file():
                if path.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(path)
                else:
                    ignored += 1
        if images and not parts:
            raise DataError(f"{folder} holds images directly; put them in one folder per class, e.g. "
                            f"{folder}/CLASS/{images[0].name}")
        if images and subfolders:
            raise DataError(f"{folder} holds both images and folders; a folder is either a class (images "
                            f"only) or a group of class folders: move its images into a class folder")
        if images:
            name, groups = parts[-1], parts[:-1]
            if name in classes and classes[name] != groups:
                raise DataError(f"class {name!r} is in two groups of {root / split}: "
                                f"{'/'.join(classes[name]) or 'the top'} and {'/'.join(groups) or 'the top'}; "
                                f"rename one (e.g. {'_'.join(groups[-1:] + (name,))})")
            classes[name] = groups
            for path in images:
                real_file = path.resolve()
                if inside not in real_file.parents:
                    raise DataError(f"{path} links to {real_file}, outside the data folder {root}; copy the "
                                    f"file into {root} or remove the link")
                stat = real_file.stat()
                files.append(ImageFile(path, path.relative_to(root).as_posix(), name, stat.st_size,
                                       stat.st_mtime_ns))
        elif not subfolders and parts:
            raise DataError(f"{folder} is an empty class: no images ({', '.join(IMAGE_SUFFIXES)}); add images "
                            f"or remove the folder")
        pending += [(sub, parts + (sub.name,)) for sub in reversed(subfolders)]
    if not classes:
        raise DataError(f"{root / split} has no class folders with images; put each class's images in "
                        f"{root / split}/CLASS/")
    files.sort(key=lambda f: (f.path.name, f.rel))
    return files, classes, ignored


def _check_link(path: Path, folder: Path, root: Path) -> None:
    """A link in the data folder must lead somewhere, and not back to a folder above it (which would make its
    classes appear again, in another group)."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # a broken link, or one that leads to itself
        raise DataError(f"{path} is a link that leads nowhere (broken, or a loop); remove it or point it at a file "
                        f"inside {root}") from None
    if target.is_dir() and (target == folder or target in folder.parents):
        raise DataError(f"{path} links to {target}, a folder above it: the data would contain themselves; remove "
                        f"the link") from None


def _few(names, n=5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(map(repr, names[:n])) + more
