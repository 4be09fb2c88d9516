"""Tests of ensure_cifar100 against a local HTTP server: md5, safe extraction, cleanup."""

import functools
import hashlib
import http.server
import io
import re
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from branching.data import download
from branching.data.cifar import load_label_names, load_split
from branching.data.download import ensure_cifar100
from branching.errors import DataError

ARCHIVE = "cifar-100-python.tar.gz"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _add_bytes(tar, name, content=b"x", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, linkname, len(content) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)


def _official_tar(path: Path, source: Path, extra=()):
    """A tar.gz with the official member names, plus extra (name, kind, linkname) members first."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, linkname in extra:
            _add_bytes(tar, name, kind=kind, linkname=linkname)
        tar.add(source, arcname="cifar-100-python", recursive=False)
        for name in ("meta", "test", "train"):
            tar.add(source / name, arcname=f"cifar-100-python/{name}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, synthetic_c10):
    """Serve a folder of archives on 127.0.0.1; yields (base_url, folder)."""
    root = tmp_path_factory.mktemp("served")
    _official_tar(root / ARCHIVE, synthetic_c10)
    content = (root / ARCHIVE).read_bytes()
    (root / "truncated.tar.gz").write_bytes(content[: len(content) // 2])
    for name, extra in {
        "dotdot.tar.gz": [("cifar-100-python/../../evil", tarfile.REGTYPE, "")],
        "absolute.tar.gz": [(str(root.parent / "evil_abs"), tarfile.REGTYPE, "")],
        "symlink.tar.gz": [("cifar-100-python/link", tarfile.SYMTYPE, "/etc/passwd")],
        "hardlink.tar.gz": [("cifar-100-python/hard", tarfile.LNKTYPE, "/etc/passwd")],
        "device.tar.gz": [("cifar-100-python/dev", tarfile.CHRTYPE, "")],
    }.items():
        _official_tar(root / name, synthetic_c10, extra)
    with tarfile.open(root / "incomplete.tar.gz", "w:gz") as tar:
        tar.add(synthetic_c10 / "train", arcname="cifar-100-python/train")

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def closed_port_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{ARCHIVE}"


def test_download_extract_and_load(server, tmp_path, synthetic_c10, capsys):
    base, root = server
    target = tmp_path / "cifar"
    result = ensure_cifar100(target, url=f"{base}/{ARCHIVE}", md5=_md5(root / ARCHIVE), progress=True)
    assert result == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar"]  # no temp files
    assert sorted(p.name for p in target.iterdir()) == ["meta", "test", "train"]
    for name in ("meta", "test", "train"):
        assert (target / name).read_bytes() == (synthetic_c10 / name).read_bytes()
    assert load_split(target, "train").images.shape == (300, 3072)
    assert len(load_label_names(target)) == 100
    assert "CIFAR-100" in capsys.readouterr().err  # the progress bar went to stderr


def test_fills_in_missing_files(server, tmp_path, synthetic_c10):
    base, root = server
    target = tmp_path / "cifar"
    target.mkdir()
    (target / "train").write_bytes((synthetic_c10 / "train").read_bytes())
    ensure_cifar100(target, url=f"{base}/{ARCHIVE}", md5=_md5(root / ARCHIVE), progress=False)
    assert sorted(p.name for p in target.iterdir()) == ["meta", "test", "train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar"]
    assert np.array_equal(load_split(target, "test").images, load_split(synthetic_c10, "test").images)


@pytest.mark.parametrize("existing", [False, True])
def test_wrong_md5_leaves_nothing(server, tmp_path, existing):
    base, _ = server
    target = tmp_path / "cifar"
    if existing:
        target.mkdir()
        (target / "train").write_bytes(b"keep me")
    with pytest.raises(DataError, match="corrupt.*md5.*retry"):
        ensure_cifar100(target, url=f"{base}/{ARCHIVE}", md5="0" * 32, progress=False)
    if existing:
        assert [p.name for p in target.iterdir()] == ["train"] and (target / "train").read_bytes() == b"keep me"
        assert [p.name for p in tmp_path.iterdir()] == ["cifar"]
    else:
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "archive, message",
    [
        ("truncated.tar.gz", "not a valid tar.gz"),
        ("incomplete.tar.gz", "lacks cifar-100-python/meta"),
        ("dotdot.tar.gz", "outside its folder"),
        ("absolute.tar.gz", "outside its folder"),
        ("symlink.tar.gz", "link or device"),
        ("hardlink.tar.gz", "link or device"),
        ("device.tar.gz", "link or device"),
    ],
)
def test_bad_archives_are_refused(server, tmp_path, archive, message):
    base, root = server
    target = tmp_path / "work" / "cifar"
    target.parent.mkdir()
    with pytest.raises(DataError, match=message):
        ensure_cifar100(target, url=f"{base}/{archive}", md5=_md5(root / archive), progress=False)
    assert list(target.parent.iterdir()) == []
    assert not (tmp_path / "evil").exists() and not (root.parent / "evil_abs").exists()
    assert not (root.parent / "evil").exists()


def test_unreachable_url(tmp_path, closed_port_url):
    target = tmp_path / "cifar"
    expected = rf"could not download CIFAR-100 from .*put its train, test and meta files in {re.escape(str(target))}$"
    with pytest.raises(DataError, match=expected):
        ensure_cifar100(target, url=closed_port_url, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error(server, tmp_path):
    base, _ = server
    with pytest.raises(DataError, match="HTTP 404"):
        ensure_cifar100(tmp_path / "cifar", url=f"{base}/nothing.tar.gz", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_present_data_needs_no_network(synthetic_c10, closed_port_url):
    assert ensure_cifar100(synthetic_c10, url=closed_port_url, progress=False) == synthetic_c10


def test_interrupt_cleans_up(server, tmp_path, monkeypatch):
    base, root = server

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "_extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_cifar100(tmp_path / "cifar", url=f"{base}/{ARCHIVE}", md5=_md5(root / ARCHIVE), progress=False)
    assert list(tmp_path.iterdir()) == []
