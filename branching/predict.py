"""`branching predict`: answer your own PNG/JPEG images, or a CIFAR-format split, with the
routed tree. One line per image; `--out FILE.csv|.json` writes the same rows."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np

from . import judge
from .acceptance import Acceptance
from .args import positive_int
from .checkpoint import load_folder
from .config import TreeConfig, load_config
from .data import N_PIXELS, load_label_names, load_split
from .errors import ConfigError, DataError
from .fileio import check_new_file, write_csv, write_json
from .forward import node_inputs
from .normalization import Normalizer
from .routing import BATCH, TreePredictions, TreePredictor

IMAGE_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: the JPEG variant many cameras write
SIDE = 32
MAX_PIXELS = 89_478_485  # Pillow's bomb limit (Image.MAX_IMAGE_PIXELS); larger images are refused undecoded
COLUMNS = ("input", "true_class", "predicted_class", "confidence", "path", "accepted", "rejected_at",
           "rejected_confidence")


def add_parser(sub) -> None:
    p = sub.add_parser("predict", help="classify PNG/JPEG files or a CIFAR-format split with a trained tree")
    p.add_argument("files", nargs="*", metavar="FILE", help="PNG or JPEG images (any size; resized to 32x32 RGB)")
    p.add_argument("--models", required=True, help="models folder of a run (OUT/models, or OUT itself)")
    p.add_argument("--config", default=None, help="tree TOML the models must match (default: the tree the "
                                                  "model files record)")
    p.add_argument("--data", default=None, help="CIFAR-100 folder: predict a whole split instead of files")
    p.add_argument("--split", default="test", choices=("train", "test"), help="split of --data (default test)")
    p.add_argument("--out", default=None, help="also write the rows to FILE.csv or FILE.json")
    p.add_argument("--branch", default=None, metavar="NAME",
                   help="send every image straight to this branch instead of routing from the parent (needed for a "
                        "module parent without a head and several branches)")
    p.add_argument("--batch-size", type=positive_int, default=BATCH, help=f"images per batch (default {BATCH})")
    p.add_argument("--node", default=None, metavar="NAME",
                   help="answer with this node alone, over its own classes (default: the routed tree); the way "
                        "to ask a branch of new classes, which routing never reaches")
    p.set_defaults(func=cmd_predict)


class NodePredictor:
    """One node of a tree on its own: the chain from the pixels to it, its classes, its acceptance rule.
    Gives the routed tree's TreePredictions, with the chain as the path."""

    def __init__(self, config: TreeConfig, models: dict, name: str):
        config.node(name)
        if not models[name].has_head:
            raise ConfigError(f"--node {name}: a module parent without head = true has no classes to answer with; "
                              f"ask one of its branches")
        self.models, self.name = models, name
        self.chain = tuple(config.chain(name))
        self.classes = self.answerable = tuple(config.node(name).classes)
        self.normalizer = Normalizer.from_dict(models["parent"].meta["normalization"])
        self.acceptance = Acceptance.of(models[name].meta)
        self.judge = judge.load_for(models, name)  # its self-evaluation branch, when it accepts by one

    def predict(self, images, batch_size: int = BATCH) -> TreePredictions:
        X = self.normalizer.transform(np.asarray(images).reshape(-1, N_PIXELS))
        logits = np.concatenate([self.models[self.name].logits(node_inputs(self.models, self.name, X[i:i + batch_size]))
                                 for i in range(0, len(X), batch_size)] or [np.zeros((0, len(self.classes)))])
        predicted = logits.argmax(axis=1)
        probability = None if self.judge is None else self.judge.score_images(self.models, X, logits)
        confidence = self.acceptance.confidence(logits, probability)
        low = ~self.acceptance.accepts(confidence)
        last = len(self.chain) - 1
        return TreePredictions(self.classes, self.chain, tuple(self.chain[:i + 1] for i in range(len(self.chain))),
                               predicted, confidence.astype(np.float32), np.full(len(X), last),
                               np.where(low, last, -1), np.where(low, confidence, np.nan).astype(np.float32),
                               predicted)


def load_image(path) -> np.ndarray:
    """A PNG or JPEG file as uint8 (3072,) in the CIFAR layout (1024 R, 1024 G, 1024 B), resized to 32x32."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file; pass a PNG or JPEG image")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in IMAGE_FORMATS:
                    raise DataError(f"{path}: a {image.format} image; pass a PNG or JPEG image")
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise DataError(f"{path}: {width}x{height} pixels, more than the limit of {MAX_PIXELS:,}; "
                                    f"downscale it first")  # Pillow's own check stops twice as many
                image.draft("RGB", (SIDE, SIDE))  # JPEG: decode at a reduced scale when much larger
                pixels = np.asarray(_to_small_rgb(image), dtype=np.uint8)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; pass image files") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{path}: more than the limit of {MAX_PIXELS:,} pixels; downscale it first") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image (Pillow cannot identify it); pass a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{path}: unreadable image ({message}); pass an intact PNG or JPEG image") from None
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)).reshape(N_PIXELS)


def _to_small_rgb(image):
    """A decoded image upright (EXIF orientation), 8 bits per channel, RGB, 32x32."""
    from PIL import Image, ImageOps

    factor = min(image.size) // (3 * SIDE)
    if factor >= 2:  # shrink by whole factors first: the steps below then copy a small image
        image = image.reduce(factor)
    image = ImageOps.exif_transpose(image)  # after reduce: it copies the whole image
    if image.mode.startswith("I"):  # 16- or 32-bit grey (e.g. a 16-bit PNG): scale to 8 bits, not clip
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")
    rgb = image.convert("RGB")
    if rgb.size != (SIDE, SIDE):
        rgb = rgb.resize((SIDE, SIDE), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return rgb


def load_images(paths) -> tuple[list[str], np.ndarray, list[str]]:
    """(names of the files read, their pixels (N, 3072), one-line errors for the files that failed)."""
    names, rows, errors = [], [], []
    for path in paths:
        try:
            rows.append(load_image(path))
            names.append(str(path))
        except DataError as e:
            errors.append(str(e))
    pixels = np.stack(rows) if rows else np.zeros((0, N_PIXELS), np.uint8)
    return names, pixels, errors


def load_split_inputs(data_dir, split: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Every image of a CIFAR-format split: (file names, pixels, true class names)."""
    data = load_split(data_dir, split)
    label_names = load_label_names(data_dir)
    return data.filenames, data.images, [label_names[i] for i in data.fine_labels]


def prediction_table(names, predictions, true_classes=None) -> list[dict]:
    rows = predictions.rows()
    for i, (name, row) in enumerate(zip(names, rows)):
        row["input"] = name
        row["true_class"] = true_classes[i] if true_classes is not None else ""
        low = float(predictions.rejected_confidence[i])
        row["rejected_confidence"] = None if np.isnan(low) else low
    return [{k: row[k] for k in COLUMNS} for row in rows]


def format_line(row: dict) -> str:
    verdict = ("accepted" if row["accepted"] else
               f"rejected at {row['rejected_at']} (its confidence {row['rejected_confidence']:.4f} is below its threshold)")
    truth = f"  (true: {row['true_class']})" if row["true_class"] else ""
    return (f"{row['input']}: {row['predicted_class']}  confidence {row['confidence']:.4f}  "
            f"path {row['path']}  {verdict}{truth}")


def write_rows(path, rows: list[dict], errors: list[str]) -> None:
    if Path(path).suffix == ".json":
        write_json(path, {"predictions": rows, "errors": errors})
    else:
        write_csv(path, rows, COLUMNS)


def cmd_predict(args) -> int:
    if bool(args.files) == bool(args.data):
        raise ConfigError("pass image files or --data DIR (with --split), not both and not neither")
    if args.out is not None and Path(args.out).suffix not in (".csv", ".json"):
        raise ConfigError(f"--out {args.out}: the file name must end in .csv or .json")
    if args.out is not None:
        check_new_file(args.out, "--out")
    config = load_config(args.config) if args.config else None
    if args.node is not None and args.branch is not None:
        raise ConfigError("pass --node NAME (that node alone) or --branch NAME (routing from that branch), not both")
    if args.node is None:
        predictor = TreePredictor.load(args.models, config, args.branch)
    else:
        predictor = NodePredictor(*load_folder(args.models, config), args.node)
    if args.data:
        names, pixels, truth = load_split_inputs(args.data, args.split)
        errors: list[str] = []
    else:
        names, pixels, errors = load_images(args.files)
        truth = None
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    predictions = predictor.predict(pixels, batch_size=args.batch_size)
    rows = prediction_table(names, predictions, truth)
    if args.out:
        write_rows(args.out, rows, errors)
    try:
        for row in rows:
            print(format_line(row))
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`: stop printing quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if truth is not None:
        print(summary_line(rows, predictor.answerable), file=sys.stderr)
    if errors:
        print(f"error: {len(errors)} of {len(errors) + len(rows)} files could not be read", file=sys.stderr)
        return 2
    return 0


def summary_line(rows: list[dict], classes) -> str:
    """Accuracy and coverage over the images whose true class is one of the tree's."""
    known = [r for r in rows if r["true_class"] in classes]
    if not known:
        return f"none of the {len(rows)} images is of a class of this tree ({', '.join(classes)})"
    correct = sum(r["predicted_class"] == r["true_class"] for r in known)
    accepted = [r for r in known if r["accepted"]]
    right = sum(r["predicted_class"] == r["true_class"] for r in accepted)
    accepted_acc = f"{100 * right / len(accepted):.2f}%" if accepted else "n/a"
    return (f"{len(known)} images of the tree's classes: accuracy {100 * correct / len(known):.2f}%, "
            f"accepted {len(accepted)} ({100 * len(accepted) / len(known):.1f}%), accuracy on accepted "
            f"{accepted_acc}")
