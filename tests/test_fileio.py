"""The one atomic writer: the umask's mode, all or nothing, exact floats in CSV."""

import csv
import json
import os

import pytest

from branching.fileio import atomic_path, write_bytes, write_csv, write_json, write_text


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_files_get_the_mode_open_would_give_them(tmp_path, umask_027):
    write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")  # parents are created
    write_text(tmp_path / "c.txt", "x")
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: a file opened the usual way
        f.write("x")
    for name in ("a/b.bin", "c.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"old": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target, "w") as f:
            f.write('{"new": ')
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_csv_floats_read_back_exactly_and_an_empty_table_keeps_its_header(tmp_path):
    rows = [{"index": 3, "confidence": 0.1 + 0.2, "name": "a,b"}]
    write_csv(tmp_path / "t.csv", rows)
    with open(tmp_path / "t.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert float(back[0]["confidence"]) == 0.1 + 0.2 and back[0]["name"] == "a,b"
    write_csv(tmp_path / "empty.csv", [], ("index", "confidence"))
    assert (tmp_path / "empty.csv").read_text().strip() == "index,confidence"
