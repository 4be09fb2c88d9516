"""`branching init --data DATA --out TREE.toml`: a tree TOML written from the data's own groups.

The parent covers every class; each group of image folders (tomato/ above tomato/early_blight/ and
tomato/healthy/) becomes a branch over its classes, reading the branch of the group above it (or the
parent); a group with one child adds no branch. For CIFAR-100's files the groups are its 20 official
superclasses. The file is checked by the same reader as any config before it is written.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from branching.config.parse import parse_config
from branching.config.tree import IMAGE_SIZES, toml_value
from branching.data.cifar import (
    COARSE_LABEL_NAMES,
    COARSE_OF_FINE,
    FINE_LABEL_NAMES,
    load_split,
)
from branching.data.folders import is_image_folder, scan
from branching.errors import ConfigError, DataError
from branching.fileio import write_text

DEFAULT_IMAGE_SIZE = 64  # pixels on a side for photos: 4x CIFAR's detail at 4x its cost


def add_init(sub) -> None:
    p = sub.add_parser("init", help="write a tree TOML from the data's class folders and their groups")
    p.add_argument("--data", required=True, help="image folders (train/, test/) or CIFAR-100's files")
    p.add_argument("--out", required=True, help="the tree TOML to write (refused if it exists, unless --force)")
    p.add_argument("--image-size", type=image_size, default=None,
                   help=f"[data] image_size to write for image folders (default {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(func=cmd_init)


def image_size(text: str) -> int:
    """argparse type: an image side the networks take (branching.config's limits)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of pixels, got {text!r}") from None
    if not IMAGE_SIZES[0] <= value <= IMAGE_SIZES[1]:
        raise argparse.ArgumentTypeError(f"must be from {IMAGE_SIZES[0]} to {IMAGE_SIZES[1]} pixels, got {value}")
    return value


def cmd_init(args) -> int:
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"--out {out} exists; pass --force to overwrite it, or choose another file")
    data = Path(args.data)
    if data.is_file():
        raise DataError(f"--data {data} is a file, not a folder; pass the folder that holds image folders (train/, "
                        f"test/) or CIFAR-100's files (train, test, meta)")
    if not data.is_dir():
        raise DataError(f"--data {data}: no such folder; pass image folders (train/, test/) or CIFAR-100's files")
    if is_image_folder(data):
        folders = scan(data)
        classes, groups = folders.classes, folders.groups
        for name in [*classes, *(g for path in groups.values() for g in path)]:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"the folder name {name.encode('utf-8', 'surrogateescape')!r} in {data} is not UTF-8 "
                                f"text, which a tree TOML (UTF-8) cannot hold; rename the folder") from None
        size = DEFAULT_IMAGE_SIZE if args.image_size is None else args.image_size
        source = f"the class folders of {data} ({len(folders.splits['train'])} training images)"
    elif (data / "train").is_file():
        labels = sorted(set(load_split(data, "train").fine_labels.tolist()))
        classes = [FINE_LABEL_NAMES[i] for i in labels]
        groups = {FINE_LABEL_NAMES[i]: (COARSE_LABEL_NAMES[COARSE_OF_FINE[i]],) for i in labels}
        size = None
        if args.image_size not in (None, 32):
            raise ConfigError("--image-size: CIFAR-100's files hold 32-pixel images; leave it out")
        source = f"CIFAR-100's classes in {data} and their superclasses"
    else:
        raise DataError(f"--data {data} holds neither image folders (train/, test/) nor CIFAR-100's files")
    text = tree_toml(classes, groups, size, source)
    config = parse_config(text, str(out))  # the same checks as any config, before writing
    write_text(out, text)
    print(f"wrote {out}: a parent over {len(classes)} classes and {len(config.branches)} branch(es) "
          f"{', '.join(config.branches) or '(no group has two or more classes)'}; edit it, then: "
          f"branching run --config {out} --data {data} --out runs/{out.stem}")
    return 0


def tree_toml(classes: list[str], groups: dict[str, tuple[str, ...]], image_size: int | None, source: str) -> str:
    """The TOML of a parent over `classes` and a branch per group that has two or more children."""
    members: dict[tuple[str, ...], list[str]] = {}  # group path -> its classes, at any depth
    for name in classes:
        path = groups.get(name, ())
        for depth in range(1, len(path) + 1):
            members.setdefault(path[:depth], []).append(name)
    def direct_children(g):  # its subgroups and the classes right inside it
        return {groups.get(c, ())[len(g)] if len(groups.get(c, ())) > len(g) else c for c in members[g]}

    branching = [g for g in sorted(members, key=lambda g: (len(g), g))
                 if len(direct_children(g)) > 1 and len(members[g]) < len(classes)]
    names: dict[tuple, str] = {}
    for i, g in enumerate(branching):  # the group's folder name, or its path, made unique with a number
        name = _branch_name(g[-1], i)
        if name in names.values():
            name = _branch_name("_".join(g), i)
        base, k = name, 2
        while name in names.values():
            name, k = f"{base}_{k}", k + 1
        names[g] = name
    lines = [f"# A tree written by branching init from {_comment(source)}.",
             "# Edit it: the parent's network (kind, hidden), each branch's layer, its acceptance ([... .accept]).", ""]
    if image_size is not None:
        lines += ["[data]", f"image_size = {image_size}  # pixels on a side: images are resized, then centre-cropped",
                  ""]
    lines += ["[parent]", f"classes = {_list(classes)}", ""]
    for g in branching:
        above = next((names[g[:d]] for d in range(len(g) - 1, 0, -1) if g[:d] in names), "parent")
        path = '/'.join(g)
        lines += [f"[branches.{names[g]}]" + (f"  # {_comment(path)}" if path != names[g] else ""),
                  f"classes = {_list(members[g])}"]
        if above != "parent":
            lines.append(f'from = "{above}"')
        lines.append("")
    return "\n".join(lines)


def _branch_name(name: str, i: int) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return cleaned if cleaned and cleaned != "parent" else f"group{i}"


def _list(values) -> str:
    return "[" + ", ".join(toml_value(v) for v in values) + "]"


def _comment(text: str) -> str:
    """Text for a TOML comment: its control characters (a newline would end the comment) escaped."""
    return toml_value(str(text))[1:-1]
