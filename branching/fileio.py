"""Writing files atomically: a reader sees the old file or the whole new one, never a part.

Every file the project writes goes through `atomic_path`: the content goes to a temporary file in
the same folder, which gets the mode a plain `open(path, "w")` would give (0o666 less the umask)
and is then renamed over the target. On any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_path", "new_file_mode", "write_bytes", "write_csv", "write_json", "write_text"]


def new_file_mode() -> int:
    """0o666 less the process umask: the mode open() gives a new file."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path, mode: str = "wb"):
    """Open a temporary sibling of `path` for writing; on success it replaces `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes the file private
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": "", "encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path, "wb") as f:
        f.write(data)


def write_text(path, text: str) -> None:
    with atomic_path(path, "w") as f:
        f.write(text)


def write_json(path, obj) -> None:
    """Indented JSON with a final newline."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path, rows: list[dict], empty_columns=()) -> None:
    """A header (the first row's keys; `empty_columns` when there are no rows) and one line per dict;
    floats written with repr, so that they read back exactly."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else list(empty_columns))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
    write_text(path, buffer.getvalue())
