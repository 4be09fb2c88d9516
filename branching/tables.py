"""How figures are written, in one place: percentages, intervals, mean ± std, plain numbers, and tables
(rendered by `tabulate`) for the terminal, Markdown and HTML.

Every formatter writes "n/a" (or what `na` says) for a missing figure, so a table never shows "None".
"""

from __future__ import annotations

import math

from tabulate import tabulate

__all__ = ["HTML", "MARKDOWN", "PLAIN", "TEXT", "interval", "in_texts", "mean_std", "num", "pct", "table"]

TEXT = "simple"      # printed tables: header, dashes, rows
PLAIN = "plain"      # printed tables without rules
MARKDOWN = "github"  # report.md, compare.md
HTML = "html"        # report.html (cells are escaped)


def pct(value, digits: int = 2, unit: str = "%", sign: bool = False, na: str = "n/a") -> str:
    """A proportion as a percentage: 0.8123 -> "81.23%"; sign=True writes "+1.2" for positive values."""
    if value is None:
        return na
    return f"{100 * value:{'+' if sign else ''}.{digits}f}{unit}"


def interval(ci, digits: int = 1, unit: str = "%", sign: bool = False) -> str:
    """An interval of proportions to append to a figure: [0.801, 0.823] -> " [80.1%, 82.3%]"; "" when
    there is none."""
    if not ci:
        return ""
    return f" [{pct(ci[0], digits, unit, sign)}, {pct(ci[1], digits, unit, sign)}]"


def num(value, digits: int = 4, na: str = "n/a") -> str:
    """A number with `digits` decimals: 0.12345 -> "0.1235"."""
    return na if value is None else f"{value:.{digits}f}"


def mean_std(summary: dict | None, scale: float = 1, digits: int = 4, unit: str = "", na: str = "n/a") -> str:
    """A {"mean", "std"} summary (stats.sample_summary) as "81.2 ± 1.3%" (scale 100, digits 1, unit "%");
    just the mean when there is no std (one value), `na` when there is no mean."""
    if not summary or summary.get("mean") is None:
        return na
    std = summary.get("std")
    spread = "" if std is None or math.isnan(std) else f" ± {scale * std:.{digits}f}"
    return f"{scale * summary['mean']:.{digits}f}{spread}{unit}"


def table(header, rows, fmt: str = TEXT, align=None, indent: str = "") -> str:
    """The rows (lists of cells) under the header, as a `fmt` table (TEXT, PLAIN, MARKDOWN or HTML).
    Cells are written as given (no re-parsing of numbers); align: one "left"/"right"/"center" per column
    (default: all left); indent: prefixed to every line. header None: no header line. Lines carry no
    trailing spaces."""
    rows = [["" if cell is None else str(cell) for cell in row] for row in rows]
    header = () if header is None else [str(h) for h in header]
    width = len(header) or max((len(r) for r in rows), default=0)
    text = tabulate(rows, header, tablefmt=fmt, disable_numparse=True,
                    colalign=tuple(align) if align else ("left",) * width)
    return "\n".join((indent + line).rstrip() for line in text.splitlines())


# a study's wording about images, as it reads when the tree's inputs are texts (a text parent's)
IMAGE_WORDS = (("test images", "test texts"), ("validation images", "validation texts"),
               ("training images", "training texts"), ("images per class", "texts per class"),
               ("held-out images", "held-out texts"), ("MFLOPs/image", "MFLOPs/text"),
               ("the group the image belongs to", "the group the text belongs to"), ("[95% images]", "[95% texts]"),
               ("k images per class", "k texts per class"), ("the same images", "the same texts"),
               ("over the images", "over the texts"), ("per image, from the pixels", "per text, from its encoding"),
               ("the images named below", "the texts named below"), (" images, held-out", " texts, held-out"),
               (" images: coverage", " texts: coverage"), ("Each image goes down", "Each text goes down"),
               ("same images", "same texts"))


def in_texts(text: str, reads: str | None) -> str:
    """`text` (a study's Markdown or a figure's label) with its words for images turned into words for texts
    where the tree reads texts (its parent kind's `reads`); unchanged otherwise."""
    if reads != "texts":
        return text
    for image, words in IMAGE_WORDS:
        text = text.replace(image, words)
    return text
