"""Where the toolkit meets the operating system: full disks (a tmpfs mounted here, skipped where one cannot be),
file names that are not UTF-8, images of extreme shapes, devices and pipes, links that loop, folder names that
would inject TOML, a misspelt --data, runs killed or run twice into one folder, a busy machine, and the small
messages around them. Each case checks the one line the user sees, the exit status and what is left on disk."""

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reference import SMALL_TREE

from branching import console
from branching.cli import main as cli
from branching.config.parse import load_config
from branching.data import tree_data
from branching.data.images import MAX_ASPECT, MAX_SIDE, load_image, resize_center_crop
from branching.errors import DataError, OutputError
from branching.fileio import reserve, sweep_stale

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of the size asked, mounted in tmp_path (needs root and mount; skipped where it cannot be)."""
    mounted = []

    def mount(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def one_error_line(err: str) -> str:
    """The one `error:` line a command printed (its log of what it did aside), with no traceback."""
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def photos(root: Path, classes=("beaver", "whale"), n=3, size=(8, 8)) -> Path:
    for split in ("train", "test"):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", size, (10 * i, 50, 200 if c == "beaver" else 0)).save(folder / f"{i}.png")
    return root


def small_run(tmp_path, data, out, *extra):
    (tmp_path / "small.toml").write_text(SMALL_TREE)
    return ["run", "--config", str(tmp_path / "small.toml"), "--data", str(data), "--out", str(out),
            "--max-epochs", "1", "--quiet", "--no-report", "--no-download", *extra]


# ---- full disks ----------------------------------------------------------------------------------

def test_a_full_disk_under_the_image_cache_is_one_line_before_any_decoding(tmp_path, tmpfs, monkeypatch, capsys):
    cache = tmpfs("cache", "2M")
    monkeypatch.setenv("BRANCHING_CACHE", str(cache))
    data = photos(tmp_path / "photos", n=60)  # 240 images at 64 px: 2.9 MB of cache
    (tmp_path / "tree.toml").write_text('[data]\nimage_size = 64\n[parent]\nclasses = ["beaver", "whale"]\n')
    start = time.perf_counter()
    code = cli.main(["run", "--config", str(tmp_path / "tree.toml"), "--data", str(data), "--out",
                     str(tmp_path / "out"), "--quiet"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and "the image cache of 240 images at 64 px needs about" in line and "MB free" in line
    assert time.perf_counter() - start < 10 and list(cache.iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_disk_that_fills_meanwhile_is_an_error_when_the_file_is_reserved(tmpfs):
    disk = tmpfs("disk", "1M")
    (disk / "big.npy").write_bytes(b"")
    with pytest.raises(OutputError, match="no space is left on its disk"):
        reserve(disk / "big.npy", 4 * 2**20)


def test_a_full_disk_under_out_is_one_line_and_the_earlier_output_stays(tmp_path, tmpfs, small_data_dir, capsys):
    disk = tmpfs("disk", "4M")
    assert cli.main(small_run(tmp_path, small_data_dir, disk / "OUT")) == 0
    before = {p.name: p.read_bytes() for p in (disk / "OUT").rglob("*") if p.is_file()}
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * (free - 20_000))  # 20 kB left: the models do not fit
    capsys.readouterr()
    code = cli.main(small_run(tmp_path, small_data_dir, disk / "OUT"))
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and ("no space is left on its disk" in line or "needs about" in line)
    assert {p.name: p.read_bytes() for p in (disk / "OUT").rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in disk.iterdir()) == ["OUT", "filler"]  # no staging folder left


def test_predict_out_on_a_full_disk_prints_every_answer_first(tmp_path, tmpfs, small_data_dir, capsys):
    assert cli.main(small_run(tmp_path, small_data_dir, tmp_path / "OUT")) == 0
    disk = tmpfs("disk", "64k")
    (disk / "filler").write_bytes(b"\0" * (os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize))
    capsys.readouterr()
    code = cli.main(["predict", "--models", str(tmp_path / "OUT"), "--data", str(small_data_dir), "--out",
                     str(disk / "pred.csv")])
    captured = capsys.readouterr()
    assert code == 2 and "no space is left on its disk" in one_error_line(captured.err)
    assert len(captured.out.strip().splitlines()) > 10  # the answers were printed before the file was tried


# ---- names, images, devices ------------------------------------------------------------------------

def test_a_file_name_that_is_not_utf8_is_answered_printed_and_written(tmp_path, small_data_dir, capsys):
    assert cli.main(small_run(tmp_path, small_data_dir, tmp_path / "OUT")) == 0
    folder = tmp_path / "in"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    Image.new("RGB", (20, 20), (1, 2, 3)).save(folder / name)
    Image.new("RGB", (20, 20), (9, 9, 9)).save(folder / "plain.png")
    capsys.readouterr()
    assert cli.main(["predict", "--models", str(tmp_path / "OUT"), str(folder), "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert "caf\\xe9.png" in out and "plain.png" in out
    assert "caf\\xe9.png" in (tmp_path / "p.csv").read_text()


def test_an_image_of_extreme_shape_resizes_only_its_centre(tmp_path):
    strip = Image.new("RGB", (1, 1_000_000), (200, 100, 50))
    assert np.asarray(resize_center_crop(strip, 64)).shape == (64, 64, 3)
    rng = np.random.default_rng(0)
    for width, height in ((20, 20 * MAX_ASPECT + 7), (40 * MAX_ASPECT + 3, 40)):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        side = 16
        new = (side, int(side * height / width)) if width <= height else (int(side * width / height), side)
        resized = np.asarray(image.resize(new, Image.Resampling.BILINEAR)).astype(int)  # the policy, by hand
        top, left = round((new[1] - side) / 2), round((new[0] - side) / 2)
        want = resized[top:top + side, left:left + side]
        assert np.abs(np.asarray(resize_center_crop(image, side)).astype(int) - want).max() <= 1


def test_the_longest_strip_allowed_stays_within_twice_a_photos_memory(tmp_path):
    """Peak memory of decoding the longest side the limits allow against a photo's, each in a fresh process."""
    Image.new("RGB", (1, MAX_SIDE), (5, 6, 7)).save(tmp_path / "strip.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (800, 1200, 3), dtype=np.uint8)).save(tmp_path / "p.jpg")
    probe = ("import resource, sys\nfrom branching.data.images import load_image\nload_image(sys.argv[1], 224)\n"
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peak = {name: int(subprocess.run([sys.executable, "-c", probe, str(tmp_path / name)], capture_output=True,
                                     text=True, check=True).stdout) for name in ("strip.png", "p.jpg")}
    assert peak["strip.png"] < 2 * peak["p.jpg"], peak


def test_a_side_past_the_limit_is_refused_before_decoding(tmp_path):
    Image.new("RGB", (1, MAX_SIDE + 1), (5, 6, 7)).save(tmp_path / "strip.png")
    with pytest.raises(DataError, match=r"strip.png: 1x65536 pixels, a side longer than the limit of 65,535; crop"):
        load_image(tmp_path / "strip.png", 64)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_predict_refuses_a_device_or_a_pipe_at_once(tmp_path, small_data_dir, kind):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert cli.main(small_run(tmp_path, small_data_dir, tmp_path / "OUT")) == 0
    if kind == "fifo":
        target = tmp_path / "x.jpg"
        os.mkfifo(target)
    else:
        target = Path("/dev/zero")
    done = subprocess.run([sys.executable, "-m", "branching", "predict", "--models", str(tmp_path / "OUT"),
                           str(target)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "not a regular file (a device, a pipe or a socket)" in done.stderr


# ---- folders -----------------------------------------------------------------------------------------

def test_init_writes_emoji_and_escapes_a_name_that_would_inject_a_key(tmp_path, capsys):
    data = tmp_path / "photos"
    for split in ("train", "test"):
        for c in ("plants\nhidden = [8]/rose", "plants\nhidden = [8]/tulip\U0001F337", "cat"):
            folder = data / split / c
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(folder / "a.png")
    assert cli.main(["init", "--data", str(data), "--out", str(tmp_path / "tree.toml")]) == 0
    config = load_config(tmp_path / "tree.toml")
    branch = next(iter(config.branches.values()))
    assert branch.classes == ("rose", "tulip\U0001F337") and branch.hidden == (256,)  # no key was injected


def test_init_refuses_a_folder_name_that_is_not_utf8(tmp_path, capsys):
    data = tmp_path / "photos"
    for split in ("train", "test"):
        for c in (os.fsdecode(b"caf\xe9"), "cat"):
            folder = data / split / c
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8)).save(folder / "a.png")
    assert cli.main(["init", "--data", str(data), "--out", str(tmp_path / "tree.toml")]) == 2
    assert "is not UTF-8 text" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "tree.toml").exists()


@pytest.mark.parametrize("link", ["loop", "up"])
def test_a_link_that_loops_is_one_line(tmp_path, capsys, link):
    data = photos(tmp_path / "photos")
    if link == "loop":
        os.symlink("loop", data / "train" / "beaver" / "loop")
    else:
        os.symlink("../..", data / "train" / "beaver" / "up")
    (tmp_path / "tree.toml").write_text('[data]\nimage_size = 8\n[parent]\nclasses = ["beaver", "whale"]\n')
    assert cli.main(["run", "--config", str(tmp_path / "tree.toml"), "--data", str(data), "--out",
                     str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ("leads nowhere" if link == "loop" else "a folder above it") in line


def test_a_misspelt_data_folder_downloads_nothing(tmp_path, small_data_dir, monkeypatch, capsys):
    monkeypatch.setattr(tree_data, "ensure_cifar100", lambda *a, **k: pytest.fail("a download was started"))
    typo = small_data_dir.parent / (small_data_dir.name + "x")
    argv = small_run(tmp_path, typo, tmp_path / "OUT")
    argv.remove("--no-download")
    assert cli.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no such folder (did you mean" in line and not typo.exists()


def test_outputs_on_image_folders_name_every_file(tmp_path, capsys):
    data = photos(tmp_path / "photos", classes=("beaver", "whale", "wolf"), n=20)
    (tmp_path / "tree.toml").write_text('[data]\nimage_size = 8\n[parent]\nclasses = ["beaver", "whale"]\n'
                                        'hidden = [8]\n')
    assert cli.main(["run", "--config", str(tmp_path / "tree.toml"), "--data", str(data), "--out",
                     str(tmp_path / "out"), "--max-epochs", "1", "--quiet", "--no-report"]) == 0
    rows = (tmp_path / "out" / "predictions" / "parent.csv").read_text().splitlines()
    assert rows[0].startswith("index,file,") and rows[1].split(",")[1].startswith("test/")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["data"]["unused_classes"] == {"wolf": 20} and "'wolf' (20 training images)" in \
        metrics["notes"]["unused_classes"]


def test_a_label_that_differs_only_in_case_is_refused(tmp_path, capsys):
    data = photos(tmp_path / "photos", classes=("beaver", "Beaver", "whale"))
    (tmp_path / "tree.toml").write_text('[data]\nimage_size = 8\n[parent]\nclasses = ["beaver", "whale"]\n')
    assert cli.main(["run", "--config", str(tmp_path / "tree.toml"), "--data", str(data), "--out",
                     str(tmp_path / "out")]) == 2
    assert "differs from the tree's class 'beaver' only in case" in one_error_line(capsys.readouterr().err)


# ---- runs killed, or run twice ----------------------------------------------------------------------

def test_a_killed_runs_staging_folder_is_swept_by_the_next(tmp_path, small_data_dir, capsys):
    dead = 2**22 + 12345  # above the kernel's pid limit here: no such process
    stale = tmp_path / f".OUT.{dead}-abc.new"
    stale.mkdir()
    (stale / "metrics.json").write_text("{}")
    alive = tmp_path / f".OUT.{os.getpid()}-xyz.new"
    alive.mkdir()
    assert cli.main(small_run(tmp_path, small_data_dir, tmp_path / "OUT")) == 0
    assert not stale.exists() and alive.exists() and "removed 1 folder(s) that killed runs left" in \
        capsys.readouterr().err
    rank = Path(tempfile.gettempdir()) / f"branching-rank-{dead}-r1-q"
    rank.mkdir(exist_ok=True)
    assert sweep_stale(rank.parent, "branching-rank-") and not rank.exists()


def test_a_second_run_into_the_same_out_is_refused_while_the_first_writes(tmp_path, small_data_dir, capsys):
    out = tmp_path / "OUT"
    name = hashlib.sha256(os.fsencode(out.absolute())).hexdigest()[:24]
    with open(Path(tempfile.gettempdir()) / f"branching-out-{name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the first run holds it
        lock.write("pid 4242")
        lock.flush()
        code = cli.main(small_run(tmp_path, small_data_dir, out))
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert code == 2 and "is being written by another run (pid 4242)" in one_error_line(capsys.readouterr().err)
    assert cli.main(small_run(tmp_path, small_data_dir, out)) == 0  # once it has finished


# ---- a busy machine, and small messages -------------------------------------------------------------

def test_a_run_whose_threads_fought_for_the_cores_says_so(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    monkeypatch.setattr(console, "cores", lambda: 2)
    assert "the machine is busy (load 3.0 on 2 cores)" in console.busy_note(2)
    assert console.busy_note(1) is None  # one thread: nothing to fight over
    assert "got 65 CPU-s in 100 s" in console.busy_note(2, cpu_s=65, wall_s=100)
    assert console.busy_note(2, cpu_s=180, wall_s=100) is None  # 90% of their time: they ran
    monkeypatch.setattr(os, "getloadavg", lambda: (0.6, 0.6, 0.6))  # a little other work: no note
    assert console.busy_note(2) is None


def test_a_rejected_answer_names_the_node_of_its_best_guess(tmp_path, small_data_dir, capsys):
    assert cli.main(small_run(tmp_path, small_data_dir, tmp_path / "OUT")) == 0
    capsys.readouterr()
    assert cli.main(["predict", "--models", str(tmp_path / "OUT"), "--data", str(small_data_dir)]) == 0
    rejected = [line for line in capsys.readouterr().out.splitlines() if "uncertain" in line]
    assert rejected and all("'s confidence" in line for line in rejected)


def test_a_text_row_with_an_unquoted_comma_names_its_line(tmp_path):
    from branching.data.texts import read_folder
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "train.csv").write_text('text,label\n"good",positive\ngreat, fun\n"bad",negative\n'
                                                  '"dull",negative\n"fine",positive\n')
    (tmp_path / "texts" / "test.csv").write_text('text,label\n"ok",positive\n"meh",negative\n')
    with pytest.raises(Exception, match="train.csv, line 3: label 'fun' has 1 text"):
        read_folder(tmp_path / "texts")
