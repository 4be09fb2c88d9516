"""Text data in a folder: train.csv and test.csv (and an optional val.csv), columns `text` and `label`, or
the same as JSON lines (train.jsonl, ...), each row one text; checked whole before any work."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from branching.errors import DataError

SPLITS = ("train", "val", "test")
FORMATS = ("csv", "jsonl")
COLUMNS = ("text", "label")


@dataclass
class TextSplit:
    texts: list[str]
    labels: list[str]   # class names
    ids: list[str]      # "train.csv:ROW" (the row's line in a csv counts its header as line 1)


@dataclass
class TextFolder:
    root: Path
    classes: list[str]              # sorted
    splits: dict[str, TextSplit]    # train, val (when given), test


def text_files(root) -> dict[str, Path]:
    """The split files in `root`, by split."""
    found = {}
    for split in SPLITS:
        paths = [Path(root) / f"{split}.{fmt}" for fmt in FORMATS if (Path(root) / f"{split}.{fmt}").is_file()]
        if len(paths) > 1:
            raise DataError(f"{root} has both {paths[0].name} and {paths[1].name}; keep one file per split")
        if paths:
            found[split] = paths[0]
    return found


def is_text_folder(root) -> bool:
    return Path(root).is_dir() and bool(text_files(root))


def read_folder(root) -> TextFolder:
    """Every split of a text folder, checked: both train and test, the columns, UTF-8, no empty text, at
    least 2 classes and 2 training texts of each, no test class unseen in training."""
    root = Path(root)
    files = text_files(root)
    missing = [s for s in ("train", "test") if s not in files]
    if missing:
        raise DataError(f"{root} has no {missing[0]}.csv (or {missing[0]}.jsonl); a text folder holds train.csv and "
                        f"test.csv (val.csv optional), columns text and label")
    splits = {split: read_split(path) for split, path in files.items()}
    train = splits["train"]
    classes = sorted(set(train.labels))
    counts = {c: train.labels.count(c) for c in classes}
    if len(classes) < 2:
        raise DataError(f"{files['train']}: every text has label {classes[0]!r}; a tree needs at least 2 classes")
    few = [c for c, n in counts.items() if n < 2]
    if few:
        line = train.ids[train.labels.index(few[0])].rsplit(":", 1)[-1]
        raise DataError(f"{files['train']}, line {line}: label {few[0]!r} has {counts[few[0]]} text(s); give each "
                        f"label at least 2 training texts (one for validation), or remove it (a label taken from a "
                        f"text with an unquoted comma? quote texts that hold commas)")
    for split, part in splits.items():
        unseen = sorted(set(part.labels) - set(classes))
        if unseen:
            raise DataError(f"{files[split]}: label {unseen[0]!r} has no text in {files['train'].name}; add training "
                            f"texts of it, or remove it from {files[split].name}")
    return TextFolder(root, classes, splits)


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 (byte {e.start}: {e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check the file") from None


def read_lines(path: Path) -> TextSplit:
    """A plain text file's texts, one a line (blank lines skipped), without labels."""
    numbered = [(i, line) for i, line in enumerate(read_text(path).splitlines(), start=1) if line.strip()]
    if not numbered:
        raise DataError(f"{path} has no texts; write one text a line")
    return TextSplit([t for _, t in numbered], [], [f"{path.name}:{i}" for i, _ in numbered])


def read_split(path: Path, labelled: bool = True) -> TextSplit:
    """One file of texts (.csv or .jsonl; with `labelled` false a label column is optional: a file of
    texts to answer, its labels the true classes where it has them, else none)."""
    raw = read_text(path)
    rows = _csv_rows(path, raw, labelled) if path.suffix == ".csv" else _jsonl_rows(path, raw, labelled)
    if not rows:
        raise DataError(f"{path} has no texts; add rows with text and label")
    texts, labels, ids = [], [], []
    for line, text, label in rows:
        where = f"{path.name}:{line}"
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}, line {line}: the text is empty; remove the row or give it a text")
        texts.append(text)
        ids.append(where)
        if label is None and not labelled:
            continue
        if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            raise DataError(f"{path}, line {line}: the label {label!r} is not a name or a number; give every row "
                            f"a label")
        labels.append(str(label).strip())
    if labels and len(labels) != len(texts):
        raise DataError(f"{path}: some rows have a label and some have none; label every row, or none")
    return TextSplit(texts, labels, ids)


def _csv_rows(path: Path, raw: str, labelled: bool = True) -> list[tuple[int, object, object]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(raw, newline=""))
    columns = reader.fieldnames or []
    missing = [c for c in COLUMNS[:1 + labelled] if c not in columns]
    if missing:
        raise DataError(f"{path} has no column {missing[0]!r} (its columns: {', '.join(columns) or 'none'}); the "
                        f"header must name text and label")
    try:
        lines = [(reader.line_num, row) for row in reader]
        rows = [(line, row["text"], row.get("label")) for line, row in lines]
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e}); quote texts that hold commas, "
                        f"quotes or line breaks") from None
    short = next((line for line, _, label in rows if label is None), None) if "label" in columns else None
    if short is not None:
        raise DataError(f"{path}, line {short}: the row has fewer fields than the header; quote texts that hold "
                        f"commas, quotes or line breaks")
    long = next((line for line, row in lines if None in row), None)
    if long is not None:
        raise DataError(f"{path}, line {long}: the row has more fields than the header (an unquoted comma?); quote "
                        f"texts that hold commas, quotes or line breaks")
    return rows


def _jsonl_rows(path: Path, raw: str, labelled: bool = True) -> list[tuple[int, object, object]]:
    rows = []
    for line, text in enumerate(raw.splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as e:
            raise DataError(f"{path}, line {line}: not a JSON object ({e}); write one object per line") from None
        if not isinstance(row, dict) or any(c not in row for c in COLUMNS[:1 + labelled]):
            raise DataError(f"{path}, line {line}: needs the keys text and label; write e.g. "
                            f'{{"text": "a fine film", "label": "positive"}}')
        rows.append((line, row["text"], row.get("label")))
    return rows
