"""Writing files atomically: a reader sees the old file or the whole new one, never a part.

Every file the project writes goes through `atomic_path`: the content goes to a temporary file in
the same folder, which gets the mode a plain `open(path, "w")` would give (0o666 less the umask)
and is then renamed over the target. On any error the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from branching import distributed
from branching.errors import OutputError

__all__ = ["atomic_path", "check_new_file", "new_file_mode", "staged_dir", "write_bytes", "write_csv",
           "write_json", "write_text"]

RUN_MARKERS = ("metrics.json", "compare.json", "selfeval.json")  # a folder holding one of these is an earlier run's output


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """0o666 less the process umask: the mode open() gives a new file."""
    return 0o666 & ~_umask()


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


def write_files(folder, files: dict[str, bytes]) -> list[Path]:
    """Each {name: bytes} written atomically into folder (made if need be); rendering comes first, so
    that an error while rendering writes nothing."""
    folder = Path(folder)
    for name, data in files.items():
        write_bytes(folder / name, data)
    return [folder / name for name in files]


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


# ---- whole output folders ---------------------------------------------------------------------

@contextlib.contextmanager
def staged_dir(path, what: str = "--out"):
    """Build a folder's new content in a temporary sibling, then swap it in whole.

    Yields the sibling (empty). On success it replaces `path`; on any error or interrupt it is removed
    and `path` is left as it was, so a folder never holds files of two runs. An existing `path` must be
    empty or an earlier run's output (it holds metrics.json or compare.json): nothing else is replaced.
    Everything that can be checked is checked on entry, before any work. Under torchrun only rank 0 writes
    `path`: the other ranks get a private temporary folder, removed at the end, and rank 0 swaps its folder in
    only once every rank has finished.
    """
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{what} {path} is a symbolic link; give the folder it points to ({path.resolve()})")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file; give a folder (it is replaced by the run's output)")
    if path.is_dir() and any(path.iterdir()) and not any((path / m).is_file() for m in RUN_MARKERS):
        raise OutputError(f"{what} {path} holds files that are not a run's output, and the run would replace "
                          f"the folder whole; choose a new or empty folder")
    if not distributed.is_main():
        scratch = Path(tempfile.mkdtemp(prefix=f"branching-rank{distributed.rank()}-"))
        try:
            yield scratch
            distributed.barrier()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new"))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write in {path.parent} ({e.strerror or e}); choose a folder "
                          f"you can write to") from None
    try:
        yield staging
        distributed.barrier()
        _swap(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap(new: Path, path: Path) -> None:
    """Put folder `new` at `path` and remove the folder that was there: in one atomic exchange where
    the system has one (Linux renameat2), else by two renames."""
    if not path.exists():
        os.rename(new, path)
        return
    if _exchange(new, path):
        shutil.rmtree(new)  # now the previous folder
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    os.rename(path, old / "previous")
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old / "previous", path)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 with RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def check_new_file(path, what: str) -> Path:
    """A file that is about to be written must not be a folder and its folder must be writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: cannot write in {existing}; choose a folder you can write to")
    return path


def study_files(stem: str, result: dict, markdown: str, plot: bytes, extra: dict | None = None) -> dict[str, bytes]:
    """A study's files, rendered before any is written: STEM.json, STEM.md, STEM.png and `extra`."""
    return {f"{stem}.json": (json.dumps(result, indent=2) + "\n").encode(), f"{stem}.md": markdown.encode(),
            f"{stem}.png": plot, **(extra or {})}
