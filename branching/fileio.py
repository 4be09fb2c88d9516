"""Writing files atomically: a reader sees the old file or the whole new one, never a part.

Every file the project writes goes through `atomic_path`: the content goes to a temporary file in
the same folder, which gets the mode a plain `open(path, "w")` would give (0o666 less the umask)
and is then renamed over the target. On any error the temporary file is removed, and a full disk, a quota or a
read-only file system is one line (`disk_error`). Whole folders go through `staged_dir`, locked against a second
process writing the same folder; staging folders carry their process's id, and those of processes that are gone
(a killed run) are removed by the next one (`sweep_stale`). Large files are reserved whole before they are
written (`reserve`), so that a full disk is an error at once, not a crash of whoever writes their pages later.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from branching import distributed
from branching.errors import OutputError

__all__ = ["atomic_path", "check_free", "check_new_file", "disk_error", "new_file_mode", "reserve", "staged_dir",
           "sweep_stale", "write_bytes", "write_csv", "write_json", "write_text"]

RUN_MARKERS = ("metrics.json", "compare.json", "selfeval.json")  # a folder holding one of these is an earlier run's output


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """0o666 less the process umask: the mode open() gives a new file."""
    return 0o666 & ~_umask()


DISK_FULL = {errno.ENOSPC: "no space is left on its disk", errno.EDQUOT: "its disk quota is used up",
             errno.EROFS: "its file system is read-only"}


def disk_error(e: OSError, path) -> OutputError | None:
    """One line for an error of a full disk, a quota or a read-only file system while writing `path` (else None)."""
    if getattr(e, "errno", None) not in DISK_FULL:
        return None
    path = Path(path)
    staging = next((p for p in path.parents if p.name.startswith(".") and p.name.endswith(".new")), None)
    if staging is not None:  # a file of a staged output folder: name the folder the user gave
        path = staging.parent / staging.name[1:].split(".")[0]
    folder = next((p for p in path.absolute().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free / 2**20 if e.errno != errno.EROFS else None
    return OutputError(f"cannot write {path}: {DISK_FULL[e.errno]}" + (f" ({free:.0f} MB free)" if free is not None
                                                                       else "")
                       + "; free space there, or write somewhere else (--out, $BRANCHING_CACHE)")


def check_free(folder, nbytes: int, what: str) -> None:
    """An OutputError before any work where `folder`'s disk has less than `nbytes` free for `what`."""
    folder = next((p for p in (Path(folder).absolute(), *Path(folder).absolute().parents) if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    if free < nbytes:
        raise OutputError(f"{what} needs about {nbytes / 2**20:.0f} MB in {folder}, whose disk has "
                          f"{free / 2**20:.0f} MB free; free space there, or write somewhere else (--out, "
                          f"$BRANCHING_CACHE)")


def reserve(path, nbytes: int) -> None:
    """Allocate a file's `nbytes` on its disk now (posix_fallocate): a full disk is an error here, not a SIGBUS
    in whoever writes the pages of a memory map later."""
    fd = os.open(path, os.O_RDWR)
    try:
        if nbytes and hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        raise disk_error(e, path) or e from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, mode: str = "wb"):
    """Open a temporary sibling of `path` for writing; on success it replaces `path` (parents created)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise disk_error(e, path) or e from None
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes the file private
        # text: UTF-8, a file name that is not UTF-8 written back as its own bytes (surrogateescape), never an error
        text = {} if "b" in mode else {"newline": "", "encoding": "utf-8", "errors": "surrogateescape"}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise disk_error(e, path) or e from None
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
    with _locked(path, what):
        yield from _staged(path, what)


@contextlib.contextmanager
def _locked(path: Path, what: str):
    """An exclusive lock while `path` is staged, on a file of the system's temporary folder named by the folder's
    absolute path (nothing is left beside it; the system drops the lock when the process ends, killed or not): a
    second process staging the same folder is refused, rather than both saying they wrote it and the first losing.
    Under torchrun rank 0 alone writes, so it alone locks."""
    if not distributed.is_main():
        yield
        return
    name = hashlib.sha256(os.fsencode(path.absolute())).hexdigest()[:24]
    lock = Path(tempfile.gettempdir()) / f"branching-out-{name}.lock"
    try:
        handle = open(lock, "a+")
    except OSError:  # a folder it cannot write in: staging says so
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise OutputError(f"{what} {path} is being written by another run ({owner}); wait for it to finish, or "
                              f"choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _staged(path: Path, what: str):
    if path.is_symlink():
        raise OutputError(f"{what} {path} is a symbolic link; give the folder it points to ({path.resolve()})")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path} is a file; give a folder (it is replaced by the run's output)")
    if path.is_dir() and any(path.iterdir()) and not any((path / m).is_file() for m in RUN_MARKERS):
        raise OutputError(f"{what} {path} holds files that are not a run's output, and the run would replace "
                          f"the folder whole; choose a new or empty folder")
    if not distributed.is_main():
        sweep_stale(Path(tempfile.gettempdir()), "branching-rank-")
        scratch = Path(tempfile.mkdtemp(prefix=f"branching-rank-{os.getpid()}-r{distributed.rank()}-"))
        try:
            yield scratch
            distributed.barrier()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent, f".{path.name}.")
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".new"))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
    except OSError as e:
        raise disk_error(e, path) or OutputError(f"{what} {path}: cannot write in {path.parent} ({e.strerror or e}); "
                                                 f"choose a folder you can write to") from None
    try:
        yield staging
        distributed.barrier()
        _swap(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


STALE = re.compile(r"(\d+)-[^/]*$")  # the process id a staging folder's name carries after its prefix


def sweep_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove the folders in `folder` named `prefix` + "<pid>-..." whose process is gone (a run killed before it
    could clean up: its staging folder, a rank's scratch folder, a cache being built); returns them. Folders of
    processes still running, and names without a process id, are left alone."""
    removed = []
    try:
        entries = [p for p in folder.iterdir() if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return removed
    for entry in entries:
        found = STALE.match(entry.name[len(prefix):])
        if found is None or int(found.group(1)) == os.getpid() or _alive(int(found.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed and distributed.is_main():
        print(f"note: removed {len(removed)} folder(s) that killed runs left in {folder} ({removed[0].name}"
              f"{', ...' if len(removed) > 1 else ''})", file=sys.stderr)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: alive
        return True
    return True


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
