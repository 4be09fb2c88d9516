"""`branching predict`: answer your own PNG/JPEG images, or a CIFAR-format split, with the
routed tree (or one node). One line per image; `--out FILE.csv|.json` writes the same rows."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from branching.cli.args import flags, positive_int
from branching import distributed
from branching.api.tree import CLI_NAMES, Answer, Prepared, Tree
from branching.config.parse import load_config
from branching.data.cifar import load_label_names, load_split
from branching.data.folders import is_image_folder, scan
from branching.data.image_cache import load_cached
from branching.data.images import IMAGE_SUFFIXES
from branching.data.texts import is_text_folder
from branching.errors import ConfigError, DataError
from branching.fileio import check_new_file, write_csv, write_json
from branching.tree.routing import BATCH

COLUMNS = ("input", "true_class", "predicted_class", "confidence", "answered_by", "path", "accepted", "rejected_at",
           "rejected_confidence", "threshold")


def add_parser(sub) -> None:
    p = sub.add_parser("predict", parents=[flags("--device", device="where the CNN, ViT or module nodes run: auto "
                                                 "(CUDA when available), cpu or cuda; an MLP node's fused arithmetic "
                                                 "runs on the CPU (default auto)")], help="classify PNG/JPEG files or a CIFAR-format split with a trained tree")
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="images (PNG, JPEG, ...; any size and mode: made RGB, resized and centre-cropped to the tree's "
                        "image size), or folders of them (read recursively); to a text parent's tree, texts")
    p.add_argument("--models", required=True, help="models folder of a run (OUT/models, or OUT itself)")
    p.add_argument("--config", default=None, help="tree TOML the models must match (default: the tree the "
                                                  "model files record)")
    p.add_argument("--data", default=None, help="CIFAR-100 files or image folders (train/, test/): predict a whole "
                                                "split instead of files")
    p.add_argument("--texts", default=None, metavar="FILE",
                   help="a text parent's tree: the texts of FILE, one per line (.txt), or its text column (.csv, "
                        ".jsonl; a label column is taken as the true class)")
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


def load_split_inputs(data_dir, split: str, side: int = 32) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """Every image of a split of CIFAR's files or of image folders (at `side` pixels, through the image
    cache): (file names, pixels, true class names, one-line errors of the split's unreadable images)."""
    if Path(data_dir).is_file():
        raise DataError(f"--data {data_dir} is a file, not a folder; pass the folder of CIFAR-100's files (train, "
                        f"test, meta) or of image folders (train/, test/)")
    if not Path(data_dir).is_dir():
        raise DataError(f"--data {data_dir}: no such folder")
    if is_text_folder(data_dir):
        raise DataError(f"--data {data_dir} holds texts (train.csv, test.csv), and this tree reads images; pass "
                        f"image folders or CIFAR-100's files, or the models of a text parent's tree")
    if is_image_folder(data_dir):
        folders = scan(data_dir)
        if split not in folders.splits:
            raise DataError(f"--data {data_dir} has no {split}/ folder; choose --split from {', '.join(folders.splits)}")
        with distributed.main_first():  # under torchrun rank 0 builds the cache, the others read it
            cached = load_cached(folders, side, skip_bad=True)  # the split's bad images are reported, not answered
        part = cached.splits[split]
        return part.files, part.images, [folders.classes[i] for i in part.labels], cached.skipped_in[split]
    data = load_split(data_dir, split)
    label_names = load_label_names(data_dir)
    return data.filenames, data.images, [label_names[i] for i in data.fine_labels], []


def text_inputs(args, tree) -> tuple[Prepared, list[str] | None]:
    """The texts given to a text parent's tree, prepared (on the command line, in --texts FILE, or a split of
    --data: a text folder, read through the encoding cache), and their true classes (or None)."""
    from branching.data.text_cache import load_encoded
    from branching.data.texts import read_folder, read_lines, read_split
    if args.data:
        data = read_folder(args.data)
        if args.split not in data.splits:
            raise DataError(f"--data {args.data} has no {args.split}.csv; choose --split from {', '.join(data.splits)}")
        part = data.splits[args.split]
        vectors = np.asarray(load_encoded(data, tree.parent.shape, args.device).splits[args.split])
        return Prepared(list(part.ids), vectors, list(range(len(vectors))), {}), part.labels
    if args.texts is not None:
        path = Path(args.texts)
        if not path.is_file():
            raise DataError(f"--texts {path}: {'a folder' if path.is_dir() else 'no such file'}; pass a .txt file (one "
                            f"text per line), .csv or .jsonl (a text folder goes to --data)")
        part = read_split(path, labelled=False) if path.suffix in (".csv", ".jsonl") else read_lines(path)
        texts, truth, names = part.texts, part.labels or None, part.ids
    else:
        texts, truth = list(args.files), None
        paths = [t for t in texts if len(t) < 4096 and (os.sep in t or "." in t) and Path(t).exists()]
        if paths:
            raise DataError(f"{paths[0]} is a {'folder' if Path(paths[0]).is_dir() else 'file'}, and this tree reads "
                            f"texts: pass a file of texts with --texts FILE, or a text folder with --data DIR")
        names = None
    if not texts or any(not t.strip() for t in texts):
        raise DataError("an empty text was given; pass texts with words in them")
    prepared = tree.preprocess(texts)
    if names is not None:
        prepared.names = list(names)
    return prepared, truth


def encoded_split(config, args) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """(names, encodings, true classes, errors of unreadable images) of a split of --data for an encoded image
    parent: the data loaded as a run loads them, through the encodings cache (encoded once for run and predict)."""
    from branching.data.tree_data import load_tree_data
    if not Path(args.data).is_dir():
        raise DataError(f"--data {args.data}: no such folder" if not Path(args.data).exists() else
                        f"--data {args.data} is a file, not a folder; pass the folder of CIFAR-100's files or of "
                        f"image folders (train/, test/)")
    data = load_tree_data(config, args.data, download=False, skip_bad_images=True, device=args.device)
    part = data.test if args.split == "test" else data.train
    errors = [] if data.folders is None else data.folders.skipped_in.get(args.split, [])
    return (list(part.filenames), np.asarray(part.images), [data.label_names[i] for i in part.fine_labels],
            errors)


def image_paths(paths) -> tuple[list[Path], int]:
    """The files to read: each file named, and every PNG or JPEG below each folder named, in sorted order;
    and how many other files those folders hold (ignored)."""
    found, ignored = [], 0
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        inside = sorted(p for p in path.rglob("*") if p.is_file())
        images = [p for p in inside if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"{path}: a folder with no PNG or JPEG images in it; pass image files or a folder of them")
        found += images
        ignored += len(inside) - len(images)
    return list(dict.fromkeys(found)), ignored  # a file named twice, or also inside a folder named, is read once


def answer_row(name: str, answer: Answer, true_class: str | None = None) -> dict:
    """An Answer as a row of the printed lines and of --out (COLUMNS)."""
    return {"input": name, "true_class": true_class or "", "predicted_class": answer.guess,
            "confidence": answer.score, "answered_by": answer.node, "path": " > ".join(answer.path),
            "accepted": int(answer.accepted), "rejected_at": answer.rejected_at or "",
            "rejected_confidence": answer.rejected_score, "threshold": answer.threshold}


def format_line(row: dict) -> str:
    """`FILE: CLASS  confidence C >= threshold T  path ...  accepted`, or for an image a node rejected,
    `FILE: uncertain  path ...  rejected at NODE (its confidence is below its threshold); best guess ...`."""
    truth = f"  (true: {row['true_class']})" if row["true_class"] else ""
    threshold = "" if row["threshold"] is None else f" {row['threshold']:.4f}"
    if row["accepted"]:
        compared = f" >= threshold{threshold}" if threshold else ""
        return (f"{row['input']}: {row['predicted_class']}  confidence {row['confidence']:.4f}{compared}  "
                f"path {row['path']}  accepted{truth}")
    answered = row["answered_by"]
    return (f"{row['input']}: uncertain  path {row['path']}  rejected at {row['rejected_at']} (its confidence "
            f"{row['rejected_confidence']:.4f} is below its threshold{threshold}); best guess "
            f"{row['predicted_class']} ({answered}'s confidence {row['confidence']:.4f}){truth}")


def write_rows(path, rows: list[dict], errors: list[str]) -> None:
    if Path(path).suffix == ".json":
        write_json(path, {"predictions": rows, "errors": errors})
    else:
        write_csv(path, rows, COLUMNS)


def cmd_predict(args) -> int:
    if bool(args.files) + bool(args.data) + (args.texts is not None) != 1:
        raise ConfigError("pass image files (to a text parent's tree: texts, or --texts FILE) or --data DIR "
                          "(with --split), not both and not neither")
    if args.out is not None and Path(args.out).suffix not in (".csv", ".json"):
        raise ConfigError(f"--out {args.out}: the file name must end in .csv or .json")
    if args.out is not None:
        check_new_file(args.out, "--out")
    config = load_config(args.config) if args.config else None
    if args.node is not None and args.branch is not None:
        raise ConfigError("pass --node NAME (that node alone) or --branch NAME (routing from that branch), not both")
    if args.texts is not None and (args.files or args.data):
        raise ConfigError("pass texts on the command line, --texts FILE or --data DIR, one of them")
    args.device = distributed.start(args.device)
    tree = Tree.load(args.models, args.device, node=args.node, branch=args.branch, config=config, names=CLI_NAMES)
    encoded = tree.kind is not None and tree.kind.encoded  # an exported graph (.onnx) encodes inside it
    ignored, truth, errors = 0, None, []
    if tree.reads == "texts":
        prepared, truth = text_inputs(args, tree)
    elif args.texts is not None:
        raise ConfigError(f"--texts is for a text parent's tree; the models in {args.models} read images")
    elif args.data:  # a split, through the cache the run filled (an encoded parent's: its encodings)
        names, vectors, truth, errors = (encoded_split(tree.config, args) if encoded
                                         else load_split_inputs(args.data, args.split, tree.image_size))
        prepared = Prepared(names, vectors, list(range(len(names))), {})
    else:  # images resized as the tree was trained: to its side, or an encoded parent's input size
        files, ignored = image_paths(args.files)
        prepared = tree.preprocess(files)
        errors = list(prepared.errors.values())
    if ignored:
        print(f"ignored {ignored} files that are not PNG or JPEG images in the folders given", file=sys.stderr)
    for message in errors:
        print(f"error: {message}", file=sys.stderr)
    if args.data and getattr(tree.predictor, "reads_raw", False):  # a run's encodings, through the exits' cascade
        predictions = tree.predictor.predict_encoded(prepared.vectors, args.batch_size)
    else:
        predictions = tree.forward(prepared, args.batch_size)
    answers = tree.postprocess(prepared, predictions)
    rows = [answer_row(prepared.names[i], answers[i], truth[k] if truth is not None else None)
            for k, i in enumerate(prepared.readable)]
    try:  # printed first: an --out that cannot be written loses no answer
        for row in rows:
            print(format_line(row))
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`: stop printing quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.out and distributed.is_main():  # under torchrun, rank 0 writes
        write_rows(args.out, rows, errors)
    if truth is not None:
        print(summary_line(rows, tree.classes, tree.reads), file=sys.stderr)
    if errors:
        print(f"error: {len(errors)} of {len(errors) + len(rows)} files could not be read", file=sys.stderr)
        return 2
    return 0


def summary_line(rows: list[dict], classes, noun: str = "images") -> str:
    """Accuracy and coverage over the inputs (images or texts: `noun`) whose true class is one of the tree's."""
    known = [r for r in rows if r["true_class"] in classes]
    if not known:
        return f"none of the {len(rows)} {noun} is of a class of this tree ({', '.join(classes)})"
    correct = sum(r["predicted_class"] == r["true_class"] for r in known)
    accepted = [r for r in known if r["accepted"]]
    right = sum(r["predicted_class"] == r["true_class"] for r in accepted)
    accepted_acc = f"{100 * right / len(accepted):.2f}%" if accepted else "n/a"
    return (f"{len(known)} {noun} of the tree's classes: accuracy {100 * correct / len(known):.2f}%, "
            f"accepted {len(accepted)} ({100 * len(accepted) / len(known):.1f}%), accuracy on accepted "
            f"{accepted_acc}")
