"""Tests of branching.data: safe loading, selection, normalisation, synthetic data."""

import os
import pickle
import re
import shutil

import numpy as np
import pytest
from synthetic import make_synthetic, write_meta, write_split

from branching.data import download
from branching.data.cifar import (COARSE_LABEL_NAMES, COARSE_OF_FINE, FINE_LABEL_NAMES, Split, load_label_names,
                                  load_split, resolve_classes, safe_load, select)
from branching.data.normalization import Normalizer
from branching.errors import DataError

ORIGINAL_CLASSES = ["sunflower", "poppy", "tulip", "crab", "aquarium_fish", "shark"]
REAL_COUNTS = {"beaver": 4, "forest": 33, "oak_tree": 52, "sunflower": 82, "whale": 95, "wolf": 97}


# ---------------------------------------------------------------- constants and real data
def test_label_name_constants():
    assert len(FINE_LABEL_NAMES) == 100 and len(set(FINE_LABEL_NAMES)) == 100
    assert FINE_LABEL_NAMES[:10] == ("apple", "aquarium_fish", "baby", "bear", "beaver",
                                     "bed", "bee", "beetle", "bicycle", "bottle")  # fmt: skip
    assert FINE_LABEL_NAMES[-1] == "worm"
    assert len(COARSE_LABEL_NAMES) == 20
    assert sorted(np.bincount(COARSE_OF_FINE).tolist()) == [5] * 20


def test_real_splits_load(real_data_dir):
    train, test = load_split(real_data_dir, "train"), load_split(real_data_dir, "test")
    for split, n, per_class in ((train, 3000, 500), (test, 600, 100)):
        assert split.images.dtype == np.uint8 and split.images.shape == (n, 3072)
        assert split.fine_labels.dtype == np.int64 and split.fine_labels.shape == (n,)
        assert len(split.filenames) == n and isinstance(split.filenames[0], str)
        counts = np.bincount(split.fine_labels, minlength=100)
        assert {FINE_LABEL_NAMES[i]: int(counts[i]) for i in np.flatnonzero(counts)} == {
            name: per_class for name in REAL_COUNTS
        }
    assert load_label_names(real_data_dir) == list(FINE_LABEL_NAMES)


def test_real_coarse_labels_match_mapping(real_data_dir):
    raw = safe_load(real_data_dir / "train")
    assert all(COARSE_OF_FINE[f] == c for f, c in zip(raw[b"fine_labels"], raw[b"coarse_labels"]))
    meta = safe_load(real_data_dir / "meta")
    assert [n.decode() for n in meta[b"coarse_label_names"]] == list(COARSE_LABEL_NAMES)


def test_real_select(real_data_dir):
    train = load_split(real_data_dir, "train")
    ids = resolve_classes(["wolf", "beaver"], load_label_names(real_data_dir))
    assert ids == [97, 4]
    images, labels, indices = select(train, ids)
    assert images.shape == (1000, 3072) and np.bincount(labels).tolist() == [500, 500]
    assert np.array_equal(train.fine_labels[indices], np.array(ids)[labels])


# ---------------------------------------------------------------- classes and selection
def test_resolve_classes_order_and_suggestions():
    assert resolve_classes(["shark", "apple"], FINE_LABEL_NAMES) == [73, 0]
    with pytest.raises(DataError, match=r"unknown CIFAR-100 class 'sunflowr'; did you mean 'sunflower'\?"):
        resolve_classes(["sunflowr"], FINE_LABEL_NAMES)
    with pytest.raises(DataError, match="FINE_LABEL_NAMES"):
        resolve_classes(["zzzzzz"], FINE_LABEL_NAMES)
    with pytest.raises(DataError, match="twice"):
        resolve_classes(["crab", "crab"], FINE_LABEL_NAMES)


def _toy_split():
    labels = np.array([5, 3, 9, 3, 5, 7], dtype=np.int64)
    images = np.arange(6, dtype=np.uint8)[:, None].repeat(3072, axis=1)
    return Split(images, labels, [f"f{i}" for i in range(6)])


def test_select_keeps_file_order_and_maps_labels():
    images, labels, indices = select(_toy_split(), [3, 5])
    assert indices.tolist() == [0, 1, 3, 4] and indices.dtype == np.int64
    assert labels.tolist() == [1, 0, 0, 1] and labels.dtype == np.int64
    assert images[:, 0].tolist() == [0, 1, 3, 4]


def test_select_missing_class():
    with pytest.raises(DataError, match="no images of class 'baby'"):
        select(_toy_split(), [3, 2])


# ---------------------------------------------------------------- normaliser
def test_normalizer_matches_numpy(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(40, 3072), dtype=np.uint8)
    images[:, 7] = 200  # constant pixel
    norm = Normalizer.fit(images)
    x = images.astype(np.float64)
    assert norm.mean.dtype == np.float32 and norm.mean.shape == (3072,)
    np.testing.assert_allclose(norm.mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.std[np.arange(3072) != 7], x.std(0)[np.arange(3072) != 7], rtol=1e-5)
    assert norm.std[7] == pytest.approx(1e-6)
    out = norm.transform(images)
    assert out.dtype == np.float32 and np.isfinite(out).all() and np.all(out[:, 7] == 0)
    np.testing.assert_allclose(out.mean(0)[:7], 0, atol=1e-4)

    again = Normalizer.from_dict(norm.to_dict())
    np.testing.assert_array_equal(again.mean, norm.mean)
    listed = Normalizer.from_dict({"mean": norm.mean.tolist(), "std": norm.std.tolist()})
    np.testing.assert_array_equal(listed.std, norm.std)
    norm.save_npy(tmp_path / "mean.npy", tmp_path / "std.npy")
    loaded = Normalizer.load_npy(tmp_path / "mean.npy", tmp_path / "std.npy")
    np.testing.assert_array_equal(loaded.mean, norm.mean)
    np.testing.assert_array_equal(loaded.std, norm.std)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mean.npy", "std.npy"]
    with pytest.raises(DataError, match="missing normaliser file"):
        Normalizer.load_npy(tmp_path / "nope.npy", tmp_path / "std.npy")


# ---------------------------------------------------------------- synthetic data and writing
def test_synthetic_round_trip(synthetic_c10):
    ids = resolve_classes(ORIGINAL_CLASSES, load_label_names(synthetic_c10))
    train = load_split(synthetic_c10, "train")
    assert train.images.shape == (300, 3072) and load_split(synthetic_c10, "test").images.shape == (120, 3072)
    assert sorted(set(train.fine_labels.tolist())) == sorted(ids)
    assert len(set(train.fine_labels[:6].tolist())) > 1  # interleaved, not sorted by class
    assert train.filenames[0].endswith(".png")
    raw = safe_load(synthetic_c10 / "train")
    assert [COARSE_OF_FINE[f] for f in raw[b"fine_labels"]] == raw[b"coarse_labels"]


def test_synthetic_is_deterministic_and_learnable(tmp_path, synthetic_c10):
    again = make_synthetic(tmp_path / "again", ORIGINAL_CLASSES)
    for name in ("train", "test", "meta"):
        assert (again / name).read_bytes() == (synthetic_c10 / name).read_bytes()
    other = load_split(make_synthetic(tmp_path / "other", ORIGINAL_CLASSES, seed=1), "train")
    assert not np.array_equal(other.images, load_split(synthetic_c10, "train").images)

    # nearest class mean on normalised pixels: well above chance (1/6), not perfect
    ids = resolve_classes(ORIGINAL_CLASSES, FINE_LABEL_NAMES)
    x_train, y_train, _ = select(load_split(synthetic_c10, "train"), ids)
    x_test, y_test, _ = select(load_split(synthetic_c10, "test"), ids)
    norm = Normalizer.fit(x_train)
    a, b = norm.transform(x_train), norm.transform(x_test)
    centres = np.stack([a[y_train == k].mean(0) for k in range(6)])
    accuracy = (((b[:, None] - centres[None]) ** 2).sum(-1).argmin(1) == y_test).mean()
    assert 0.4 < accuracy < 1.0


def test_write_split_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    write_split(tmp_path / "train", images, [0, 99, 4, 4], filenames=["a.png", "b.png", "c.png", "d.png"])
    write_meta(tmp_path / "meta")
    split = load_split(tmp_path, "train")
    np.testing.assert_array_equal(split.images, images)
    assert split.fine_labels.tolist() == [0, 99, 4, 4] and split.filenames == ["a.png", "b.png", "c.png", "d.png"]
    assert safe_load(tmp_path / "train")[b"coarse_labels"] == [4, 13, 0, 0]
    assert load_label_names(tmp_path) == list(FINE_LABEL_NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta", "train"]  # no temp files left


# ---------------------------------------------------------------- bad files
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilExec:
    def __reduce__(self):
        return (exec, ("open('MARKER_EXEC', 'w').close()",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    for protocol in (0, 2, 4):
        path = tmp_path / f"train{protocol}"
        path.write_bytes(pickle.dumps([_Evil(marker)], protocol=protocol))
        with pytest.raises(DataError, match=r"refusing to load .*it asks for (posix|nt|os)\.system.*malicious"):
            safe_load(path)
    (tmp_path / "train").write_bytes(pickle.dumps(_EvilExec()))
    with pytest.raises(DataError, match=r"builtins\.exec"):
        load_split(tmp_path, "train")
    assert not marker.exists() and not (tmp_path / "MARKER_EXEC").exists()


def _assert_truncated_is_refused(source, folder):
    content = source.read_bytes()
    (folder / "train").write_bytes(content[: len(content) // 2])
    with pytest.raises(DataError, match="truncated or corrupt.*download it again"):
        load_split(folder, "train")


def test_truncated_file(tmp_path, synthetic_c10):
    _assert_truncated_is_refused(synthetic_c10 / "train", tmp_path)
    (tmp_path / "meta").write_bytes(b"")
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_label_names(tmp_path)


def test_truncated_real_file(tmp_path, real_data_dir):
    _assert_truncated_is_refused(real_data_dir / "test", tmp_path)


def test_wrong_shape_and_labels(tmp_path):
    write_meta(tmp_path / "meta")
    cases = [
        ({b"data": np.zeros((3, 1024), np.uint8), b"fine_labels": [0, 1, 2]}, r"expected uint8 \(N, 3072\)"),
        ({b"data": np.zeros((3, 3072), np.float32), b"fine_labels": [0, 1, 2]}, r"expected uint8 \(N, 3072\)"),
        ({b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [0, 1]}, "one per image"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]}, r"0\.\.99"),
        ({b"images": np.zeros((2, 3072), np.uint8)}, "not a CIFAR-100 split"),
        ([1, 2, 3], "not a CIFAR-100 split"),
    ]
    for content, message in cases:
        (tmp_path / "test").write_bytes(pickle.dumps(content, protocol=4))
        with pytest.raises(DataError, match=message):
            load_split(tmp_path, "test")
    (tmp_path / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"a"]}, protocol=4))
    with pytest.raises(DataError, match="100 CIFAR-100 fine label names"):
        load_label_names(tmp_path)


def test_missing_file_and_unknown_split(tmp_path):
    expected = rf"missing CIFAR-100 file .*train; put the official .* in {re.escape(str(tmp_path))}$"
    with pytest.raises(DataError, match=expected):
        load_split(tmp_path, "train")
    with pytest.raises(DataError, match="unknown split 'valid'"):
        load_split(tmp_path, "valid")


def test_errors_are_one_line(tmp_path, synthetic_c10):
    shutil.copy(synthetic_c10 / "meta", tmp_path / "meta")
    for call in (lambda: load_split(tmp_path, "train"), lambda: resolve_classes(["x"], FINE_LABEL_NAMES)):
        with pytest.raises(DataError) as info:
            call()
        assert "\n" not in str(info.value)
    assert download.CIFAR100_MD5 == "eb9058c3a382ffc7106e4002c42a8d85"
