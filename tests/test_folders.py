"""Image folders as data: the resize policy against PIL by hand, the layout and its bad forms as one-line
errors, images of every mode as RGB, the cache (reused, rebuilt on a change), bad images named or
skipped, leakage counted, `branching init`, networks at other sizes, and the real six classes written as
PNG folders giving exactly the figures of CIFAR's files."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from branching.cli import main as cli
from branching.config.parse import parse_config
from branching.data import image_cache
from branching.data.cifar import load_label_names, load_split
from branching.data.folders import scan
from branching.data.images import load_image, resize_center_crop
from branching.data.tree_data import load_tree_data
from branching.errors import DataError
from branching.models import module_parent, nets
from branching.models.batches import mirror, shift
from branching.models.model import Model

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHING_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def photo(path, size=(40, 30), seed=0, mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(mode).save(path, format=fmt)
    return path


def folders(root, layout, n=3, size=(40, 30)):
    """layout: {"group/class": count or None}; n images per class in train/ and test/ by default."""
    seed = 0
    for split in ("train", "test"):
        for name in layout:
            for i in range(n):
                seed += 1
                photo(root / split / name / f"{i:03d}.png", size, seed)
    return root


def test_resize_is_shorter_side_then_centre_crop_as_by_hand(tmp_path):
    for width, height in ((40, 20), (20, 41), (33, 33), (16, 16)):
        image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))
        size = 16
        if width <= height:  # torchvision.transforms.Resize(16): the shorter side to 16, the other truncated
            scaled = (16, int(16 * height / width))
        else:
            scaled = (int(16 * width / height), 16)
        resized = np.asarray(image if scaled == (width, height) else image.resize(scaled, Image.Resampling.BILINEAR))
        top, left = round((resized.shape[0] - size) / 2), round((resized.shape[1] - size) / 2)
        want = resized[top:top + size, left:left + size]
        np.testing.assert_array_equal(np.asarray(resize_center_crop(image, size)), want)
        image.save(tmp_path / "x.png")
        flat = load_image(tmp_path / "x.png", size)  # the CIFAR layout: all of red, then green, then blue
        np.testing.assert_array_equal(flat, want.transpose(2, 0, 1).reshape(-1))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_every_mode_becomes_the_rgb_pil_converts_to(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(2).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(tmp_path / "x.png")  # uint16: a 16-bit grey PNG
        want = np.repeat(np.asarray(rgb.convert("L"))[None], 3, axis=0)
    else:
        converted = rgb.convert(mode)
        converted.save(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))
        reread = Image.open(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))
        want = np.asarray(reread.convert("RGB")).transpose(2, 0, 1)
    got = load_image(next(tmp_path.glob("x.*")), 20)
    np.testing.assert_array_equal(got, want.reshape(-1))


def test_exif_rotated_photo_is_upright(tmp_path):
    upright = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    upright.rotate(90, expand=True).save(tmp_path / "r.png", exif=exif)
    upright.save(tmp_path / "u.png")
    np.testing.assert_array_equal(load_image(tmp_path / "r.png", 20), load_image(tmp_path / "u.png", 20))


def test_scan_finds_classes_groups_and_ignores_other_files(tmp_path):
    root = folders(tmp_path / "d", ["tomato/early_blight", "tomato/healthy", "potato/late_blight", "corn"])
    (root / "train" / ".DS_Store").write_bytes(b"x")
    (root / "train" / "tomato" / "healthy" / "notes.txt").write_text("x")
    (root / "test" / "Thumbs.db").write_bytes(b"x")
    found = scan(root)
    assert found.classes == ["corn", "early_blight", "healthy", "late_blight"]
    assert found.groups == {"early_blight": ("tomato",), "healthy": ("tomato",), "late_blight": ("potato",),
                            "corn": ()}
    assert found.ignored == 3
    names = [(f.path.name, f.rel) for f in found.splits["train"]]
    assert names == sorted(names) and len(names) == 12


def _bad(root, case):
    folders(root, ["a/x", "a/y", "b"])
    if case == "test lacks a class":
        for f in (root / "test" / "b").iterdir():
            f.unlink()
        (root / "test" / "b").rmdir()
    elif case == "test has an extra class":
        photo(root / "test" / "c" / "0.png")
    elif case == "empty class":
        (root / "train" / "a" / "z").mkdir()
    elif case == "class in two groups":
        photo(root / "train" / "b2" / "x" / "0.png")
    elif case == "link outside":
        photo(root.parent / "elsewhere" / "0.png")
        os.symlink(root.parent / "elsewhere" / "0.png", root / "train" / "b" / "link.png")
    elif case == "images beside folders":
        photo(root / "train" / "a" / "loose.png")
    elif case == "images at the top":
        photo(root / "train" / "loose.png")
    elif case == "no test":
        for f in sorted((root / "test").rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        (root / "test").rmdir()


BAD = {"test lacks a class": "lacks class folders", "test has an extra class": "that train/ lacks",
       "empty class": "empty class", "class in two groups": "in two groups", "link outside": "outside the data folder",
       "images beside folders": "both images and folders", "images at the top": "holds images directly",
       "no test": "no test/ folder"}


@pytest.mark.parametrize("case", BAD)
def test_bad_layouts_are_one_line_errors_before_anything_is_written(tmp_path, case, cache, capsys):
    root = tmp_path / "d"
    _bad(root, case)
    with pytest.raises(DataError, match=BAD[case]):
        scan(root)
    tree = tmp_path / "t.toml"
    tree.write_text('[parent]\nclasses = ["x", "y", "b"]\nhidden = [8]\n')
    assert cli.main(["run", "--config", str(tree), "--data", str(root), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and BAD[case] in err[0]
    assert not (tmp_path / "out").exists() and not cache.exists()


def test_cache_is_reused_and_rebuilt_when_a_file_or_the_size_changes(tmp_path, monkeypatch):
    root = folders(tmp_path / "d", ["a", "b"])
    first = image_cache.load_cached(scan(root), 16, progress=False)
    built = []
    real_build = image_cache._build
    monkeypatch.setattr(image_cache, "_build", lambda *a, **k: (built.append(a[1]), real_build(*a, **k)))
    again = image_cache.load_cached(scan(root), 16, progress=False)
    assert built == [] and again.manifest_sha256 == first.manifest_sha256
    np.testing.assert_array_equal(again.splits["train"].images, first.splits["train"].images)
    changed = root / "train" / "a" / "000.png"
    photo(changed, seed=99)
    os.utime(changed, ns=(1, 1))
    image_cache.load_cached(scan(root), 16, progress=False)
    image_cache.load_cached(scan(root), 24, progress=False)
    assert built == [16, 24]
    np.testing.assert_array_equal(image_cache.load_cached(scan(root), 16, progress=False).splits["train"].images[
        [f.rel for f in scan(root).splits["train"]].index("train/a/000.png")], load_image(changed, 16))


def test_workers_decode_what_one_process_decodes(tmp_path, cache):
    root = folders(tmp_path / "d", ["a", "b"], n=40)
    one = image_cache.load_cached(scan(root), 16, progress=False, workers=1)
    for part in cache.iterdir():
        import shutil
        shutil.rmtree(part)
    two = image_cache.load_cached(scan(root), 16, progress=False, workers=2)
    for split in ("train", "test"):
        np.testing.assert_array_equal(one.splits[split].images, two.splits[split].images)


def test_bad_images_are_named_or_skipped_and_recorded(tmp_path, capsys):
    root = folders(tmp_path / "d", ["a", "b"], n=4)
    bad = root / "train" / "a" / "001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    tree = tmp_path / "t.toml"
    tree.write_text('[parent]\nclasses = ["a", "b"]\nhidden = [8]\n')
    args = ["run", "--config", str(tree), "--data", str(root), "--quiet", "--max-epochs", "1"]
    assert cli.main([*args, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "1 unreadable image(s)" in err and "001.png" in err and "--skip-bad-images" in err
    assert not (tmp_path / "o1").exists()
    assert cli.main([*args, "--out", str(tmp_path / "o2"), "--skip-bad-images"]) == 0
    metrics = json.loads((tmp_path / "o2" / "metrics.json").read_text())
    assert metrics["data"]["images"] == {"train": 7, "test": 8}
    assert len(metrics["data"]["skipped_images"]) == 1 and "001.png" in metrics["data"]["skipped_images"][0]
    assert "skipped_images" in metrics["notes"]


def test_too_few_images_to_validate_on_is_a_one_line_error(tmp_path, capsys):
    root = folders(tmp_path / "d", ["a", "b"], n=3)  # 15% of 6 images is 1: no stratified hold-out of 2 classes
    tree = tmp_path / "t.toml"
    tree.write_text('[parent]\nclasses = ["a", "b"]\nhidden = [8]\n')
    assert cli.main(["run", "--config", str(tree), "--data", str(root), "--out", str(tmp_path / "o"), "--quiet",
                     "--max-epochs", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "too few training images" in err[0] and "val/" in err[0]
    assert not (tmp_path / "o").exists()


def test_test_images_with_training_bytes_are_reported_as_leakage(tmp_path):
    root = folders(tmp_path / "d", ["a", "b"], n=8)
    (root / "test" / "b" / "copy.png").write_bytes((root / "train" / "a" / "001.png").read_bytes())
    tree = tmp_path / "t.toml"
    tree.write_text('[parent]\nclasses = ["a", "b"]\nhidden = [8]\n')
    out = tmp_path / "o"
    assert cli.main(["run", "--config", str(tree), "--data", str(root), "--out", str(out), "--quiet",
                     "--max-epochs", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["leaked_images"] == [["test/b/copy.png", "train/a/001.png"]]
    assert "leakage" in metrics["notes"]


def test_init_writes_a_branch_per_group_with_two_or_more_children(tmp_path, capsys):
    root = folders(tmp_path / "d", ["crops/tomato/early_blight", "crops/tomato/healthy", "crops/potato/late_blight",
                                    "crops/corn", "weeds/thistle"], n=1)
    out = tmp_path / "tree.toml"
    assert cli.main(["init", "--data", str(root), "--out", str(out), "--image-size", "48"]) == 0
    config = parse_config(out.read_text())
    assert config.image_size == 48 and set(config.parent.classes) == {"early_blight", "healthy", "late_blight",
                                                                      "corn", "thistle"}
    # weeds and potato have one child each: no branch; crops covers 4 of 5 classes
    assert {n: (b.source, set(b.classes)) for n, b in config.branches.items()} == {
        "crops": ("parent", {"early_blight", "healthy", "late_blight", "corn"}),
        "tomato": ("crops", {"early_blight", "healthy"})}
    assert cli.main(["init", "--data", str(root), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_init_on_cifar_files_uses_the_superclasses(tmp_path, real_data_dir):
    out = tmp_path / "tree.toml"
    assert cli.main(["init", "--data", str(real_data_dir), "--out", str(out)]) == 0
    config = parse_config(out.read_text())
    assert config.image_size is None and len(config.parent.classes) == 6
    assert {n: set(b.classes) for n, b in config.branches.items()} == {"aquatic_mammals": {"beaver", "whale"}}


@pytest.mark.parametrize("side", [16, 48, 64])
def test_networks_take_images_of_any_side(side):
    width = 3 * side * side
    cnn = Model([width, 4], kind="cnn", shape={"widths": [4, 8, 8], "depth": 1}, seed=0)
    assert [t["shape"] for t in cnn.net.feature_info] == [(4, side, side), (8, side // 2, side // 2),
                                                          (8, side // 4, side // 4)]
    vit = Model([width, 4], kind="vit", shape={"dim": 8, "depth": 1, "heads": 2, "patch": 8}, seed=0)
    assert vit.net.feature_info[0]["shape"] == ((side // 8) ** 2 + 1, 8)
    x = np.random.default_rng(0).normal(size=(3, width)).astype(np.float32)
    for model in (cnn, vit, Model([width, 5, 4], seed=0)):
        assert model.logits(x).shape == (3, 4)


def test_flips_and_crops_at_another_side_match_numpy():
    side = 12
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 3 * side * side)).astype(np.float32))

    flip = torch.tensor([True, False, True, False])
    images = x.numpy().reshape(4, 3, side, side)
    want = np.where(flip.numpy()[:, None, None, None], images[..., ::-1], images).reshape(4, -1)
    np.testing.assert_array_equal(mirror(x, flip).numpy(), want)
    dy, dx = torch.randint(0, 5, (2, 4), generator=torch.Generator().manual_seed(0))
    cropped = shift(x, dy, dx, 2).numpy().reshape(4, 3, side, side)
    padded = np.pad(images, ((0, 0), (0, 0), (2, 2), (2, 2)))
    for got, image in zip(cropped, padded):  # each is some window of its padded image
        assert any(np.array_equal(got, image[:, dy:dy + side, dx:dx + side]) for dy in range(5) for dx in range(5))


def test_a_module_parent_at_its_input_size_sees_the_cached_pixels(monkeypatch):
    import tiny_backbone
    module_parent.trust("tiny_backbone:build")
    net = module_parent.ModuleNet(4, "tiny_backbone:build", input_size=48)
    x = torch.arange(2 * 3 * 48 * 48, dtype=torch.float32).reshape(2, -1)
    assert torch.equal(net.images(x), x.reshape(2, 3, 48, 48))  # no resize: the pixels as cached
    small = torch.rand(2, 3 * 32 * 32)
    assert net.images(small).shape == (2, 3, 48, 48)  # 32-pixel data is still resized to input_size
    assert tiny_backbone  # the module the net was built from


@pytest.mark.parametrize("seed", [0, 1])
def test_cifar_as_png_folders_gives_the_figures_of_the_pickles(tmp_path, real_data_dir, seed):
    """Files named by their row, so that sorted order is the pickles' order."""
    names = load_label_names(real_data_dir)
    for split in ("train", "test"):
        part = load_split(real_data_dir, split)
        for i, (pixels, label) in enumerate(zip(part.images, part.fine_labels)):
            path = tmp_path / "png" / split / names[label] / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.reshape(3, 32, 32).transpose(1, 2, 0)).save(path)
    tree = tmp_path / "t.toml"
    tree.write_text('[parent]\nclasses = ["beaver", "whale", "wolf", "sunflower", "forest", "oak_tree"]\n'
                    'hidden = [64, 32]\n[branches.mammals]\nclasses = ["beaver", "whale", "wolf"]\nlayer = 1\n'
                    'hidden = [16]\n')
    figures = []
    for data in (tmp_path / "png", real_data_dir):
        out = tmp_path / f"out-{data.name}"
        assert cli.main(["run", "--config", str(tree), "--data", str(data), "--out", str(out), "--quiet",
                         "--no-download", "--max-epochs", "2", "--seed", str(seed), "--no-report"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        figures.append({k: metrics[k] for k in ("parent", "branches", "tree")})
        with open(out / "predictions" / "parent.csv") as f:  # every column but the file's name (the folders' own)
            figures[-1]["predictions"] = [{k: v for k, v in row.items() if k != "file"} for row in csv.DictReader(f)]
    assert figures[0] == figures[1]
    data = load_tree_data(parse_config(tree.read_text()), tmp_path / "png")
    six = {names[i] for i in set(load_split(real_data_dir, "train").fine_labels.tolist())}
    assert data.side == 32 and data.label_names == sorted(six) and len(six) == 6


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("rows_at_a_time", [1, 3, 7, 1024])
def test_normaliser_fitted_a_batch_at_a_time_is_numpys_to_the_bit(monkeypatch, per_channel, rows_at_a_time):
    """The float64 mean and std before the float32 cast, on values whose sums are not exact."""
    from branching.data.normalization import Normalizer

    x = np.random.default_rng(rows_at_a_time).normal(100, 50, (50, 3 * 16))
    if per_channel:
        channels = x.reshape(len(x), 3, -1)
        want = np.repeat(channels.mean(axis=(0, 2)), 16), np.repeat(channels.std(axis=(0, 2)), 16)
    else:
        want = x.mean(axis=0), x.std(axis=0)
    seen = []

    class Recording(Normalizer):
        def __init__(self, mean, std):
            seen.append((np.asarray(mean), np.asarray(std)))
            super().__init__(mean, std)

    monkeypatch.setattr(Normalizer, "FIT_BYTES", rows_at_a_time * 8 * x.shape[1])
    Recording.fit(x, per_channel=per_channel)
    np.testing.assert_array_equal(seen[0][0], want[0])
    np.testing.assert_array_equal(seen[0][1], want[1])
    rows = np.array([5, 1, 30, 2, 2])  # rows picked, in their order, repeats kept
    Recording.fit(x, per_channel=per_channel, rows=rows)
    subset = x[rows].reshape(len(rows), 3, -1) if per_channel else x[rows]
    axes = (0, 2) if per_channel else 0
    want_mean = np.repeat(subset.mean(axis=axes), 16) if per_channel else subset.mean(axis=axes)
    np.testing.assert_array_equal(seen[1][0], want_mean)


@pytest.mark.parametrize("recipe", ["default", "original"])
def test_a_val_folder_is_what_every_node_validates_on(tmp_path, recipe):
    from branching.tree.checkpoint import load_folder

    root = folders(tmp_path / "d", ["g/x", "g/y", "b"], n=6)
    for i, name in enumerate(["g/x", "g/y", "b"]):
        for j in range(3):
            photo(root / "val" / name / f"v{j}.png", seed=500 + 10 * i + j)
    tree = tmp_path / "t.toml"
    tree.write_text('[parent]\nclasses = ["x", "y", "b"]\nhidden = [8]\n[branches.g]\nclasses = ["x", "y"]\n'
                    'layer = 0\nhidden = [4]\n')
    out = tmp_path / "o"
    assert cli.main(["run", "--config", str(tree), "--data", str(root), "--out", str(out), "--quiet",
                     "--max-epochs", "1", "--recipe", recipe, "--no-report"]) == 0
    data = load_tree_data(parse_config(tree.read_text()), root, progress=False)
    val = set(data.val_rows.tolist())
    assert len(val) == 9 and all(data.train.filenames[r].startswith("val/") for r in val)
    assert isinstance(data.train.images, np.memmap) and data.train.images.shape[0] == 27  # train/ and val/, no copy
    np.testing.assert_array_equal(data.train.images[sorted(val)][0], load_image(root / "val" / "b" / "v0.png", 32))
    _, models = load_folder(out)
    for name, model in models.items():
        trained, validated = set(model.meta.train_rows.tolist()), set(model.meta.val_rows.tolist())
        assert not trained & val, name  # no node trains on a val/ image
        assert validated and validated <= val, name


def test_predict_on_image_folders_names_the_bad_images_of_its_split_only(tmp_path, capsys):
    root = folders(tmp_path / "d", ["a", "b"], n=8)
    tree = tmp_path / "t.toml"
    tree.write_text('[parent]\nclasses = ["a", "b"]\nhidden = [8]\n')
    out = tmp_path / "o"
    assert cli.main(["run", "--config", str(tree), "--data", str(root), "--out", str(out), "--quiet",
                     "--max-epochs", "1", "--no-report"]) == 0
    capsys.readouterr()
    (root / "train" / "a" / "junk.png").write_bytes(b"not an image")  # a bad image outside the split asked
    assert cli.main(["predict", "--models", str(out), "--data", str(root), "--split", "test"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 16
    (root / "test" / "b" / "junk.png").write_bytes(b"not an image either")
    assert cli.main(["predict", "--models", str(out), "--data", str(root), "--split", "test"]) == 2
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 16 and "test/b/junk.png" in captured.err
    assert "train/a/junk.png" not in captured.err


def test_a_cache_left_half_swapped_does_not_block_the_next_build(tmp_path, cache):
    root = folders(tmp_path / "d", ["a", "b"])
    image_cache.load_cached(scan(root), 16, progress=False)
    built = next(cache.iterdir())
    stale = built.parent / (built.name + ".old")  # what a build killed between its two renames left
    stale.mkdir()
    (stale / "index.json").write_text("{}")
    photo(root / "train" / "a" / "000.png", seed=7)
    os.utime(root / "train" / "a" / "000.png", ns=(2, 2))
    image_cache.load_cached(scan(root), 16, progress=False)


def test_init_names_every_branch_once_and_refuses_a_size_the_networks_cannot_take(tmp_path, capsys):
    root = folders(tmp_path / "d", ["a/q/x", "a/q/y", "a/r", "b/q/z", "b/q/w", "b/s"], n=1)
    out = tmp_path / "tree.toml"
    assert cli.main(["init", "--data", str(root), "--out", str(out)]) == 0
    config = parse_config(out.read_text())
    assert {n: set(b.classes) for n, b in config.branches.items()} == {
        "a": {"x", "y", "r"}, "b": {"z", "w", "s"}, "q": {"x", "y"}, "b_q": {"z", "w"}}
    assert config.branches["b_q"].source == "b" and config.image_size == 64
    assert cli.main(["init", "--data", str(root), "--out", str(tmp_path / "t2.toml"), "--image-size", "0"]) == 2
    assert "--image-size: must be from 8 to 1024 pixels" in capsys.readouterr().err
    assert not (tmp_path / "t2.toml").exists()


def test_normalized_images_index_as_the_normalised_array_does():
    from branching.data.normalization import Normalizer

    images = np.random.default_rng(0).integers(0, 256, (9, 3 * 4 * 4), dtype=np.uint8)
    normalizer = Normalizer.fit(images, per_channel=True)
    lazy, eager = normalizer.lazy(images), normalizer.transform(images)
    mask = np.arange(9) % 2 == 0
    for key in (slice(None), slice(2, 7), slice(None, None, -2), np.array([4, -1, 4, 0]), mask,
                torch.tensor([3, 1]), np.array([], dtype=float)):
        want = eager[key.numpy() if isinstance(key, torch.Tensor) else key.astype(np.int64) if
                     isinstance(key, np.ndarray) and key.dtype == float else key]
        np.testing.assert_array_equal(np.asarray(lazy[key]), want)
        assert len(lazy[key]) == len(want) and lazy[key].shape == want.shape
    np.testing.assert_array_equal(np.asarray(lazy[2:8][np.array([0, 5])]), eager[2:8][[0, 5]])
    np.testing.assert_array_equal(np.asarray(lazy[np.array([8, 2, 5])][1:]), eager[[8, 2, 5]][1:])
    with pytest.raises(IndexError):
        lazy[mask[:5]]
