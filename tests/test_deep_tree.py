"""A three-level tree end to end on synthetic data: train, the "tree" metrics, lineage, and `predict`."""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from reference import DEEP_TREE, DEEP_TREE_CLASSES
from synthetic import make_synthetic

from branching.cli.main import main
from branching.config.parse import parse_config
from branching.config.recipes import get_recipe
from branching.data.cifar import load_label_names, load_split
from branching.data.images import load_image
from branching.data.tree_data import load_tree_data
from branching.errors import CheckpointError
from branching.train.nodes import train_branch
from branching.train.run import run
from branching.tree.checkpoint import ModelStore
from branching.tree.routing import TreePredictor


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    data_dir = make_synthetic(root / "data", DEEP_TREE_CLASSES, n_train=40, n_test=15)
    config = parse_config(DEEP_TREE)
    metrics = run(config, data_dir, root / "out", get_recipe("default", 2), seed=0, progress=False,
                  echo=lambda text: None, report=False)
    return config, data_dir, root / "out", metrics


def test_tree_metrics_are_recomputable_and_beside_the_parent(deep_run):
    config, _, out, metrics = deep_run
    tree = metrics["tree"]
    with open(out / "tree.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == tree["test_samples"] == 6 * 15
    correct = [r["predicted_class"] == r["true_class"] for r in rows]
    accepted = [r["accepted"] == "1" for r in rows]
    assert tree["test_accuracy"] == pytest.approx(np.mean(correct))
    assert tree["coverage"] == pytest.approx(np.mean(accepted))
    assert tree["accepted"] == sum(accepted)
    assert all(r["path"].startswith("parent") for r in rows)
    assert {r["path"] for r in rows} <= {"parent > animals > water", "parent > animals", "parent > plants", "parent"}
    # oak_tree is in no branch: the parent answers it itself, and only it
    assert all((r["path"] == "parent") == (r["predicted_class"] == "oak_tree") for r in rows)
    assert all((r["accepted"] == "1") == (r["rejected_at"] == "") for r in rows)
    # the parent's flat accuracy on the same images, as evaluated node by node through torchly
    assert tree["parent_accuracy"] == pytest.approx(metrics["parent"]["test_accuracy"], abs=1 / 90 + 1e-9)
    assert set(tree["reached"]) == {"parent", "animals", "water", "plants"}
    assert tree["reached"]["parent"] == 90 and tree["reached"]["water"] <= tree["reached"]["animals"]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["tree"]["test_accuracy"] == tree["test_accuracy"]


def test_fingerprints_chain_and_a_retrained_source_is_refused(deep_run, tmp_path):
    config, data_dir, out, _ = deep_run
    store = ModelStore(out / "models")
    models = store.load_tree(config)
    water = models["water"].meta
    assert water.source == "animals"
    assert water.source_fingerprint == models["animals"].fingerprint()
    assert water.parent_fingerprint == models["parent"].fingerprint()
    copy = tmp_path / "models"
    shutil.copytree(out / "models", copy)
    data = load_tree_data(config, data_dir)
    retrained, meta = train_branch(config, "animals", models, data, get_recipe("default", 1), seed=5, progress=False)
    ModelStore(copy).save("animals", retrained, meta)
    with pytest.raises(CheckpointError, match=r"branch 'water'.*different source.*retrain"):
        ModelStore(copy).load_tree(config)
    with pytest.raises(CheckpointError, match=r"branch 'water'.*retrain"):
        TreePredictor.load(copy)


def test_predict_answers_png_and_jpeg_and_reports_bad_files(deep_run, tmp_path, capsys):
    config, data_dir, out, _ = deep_run
    split = load_split(data_dir, "test")
    names = load_label_names(data_dir)
    first = split.images[0].reshape(3, 32, 32).transpose(1, 2, 0)
    png, jpg, big = tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"
    Image.fromarray(first).save(png)
    Image.fromarray(first).resize((97, 61)).save(jpg, quality=90)
    Image.fromarray(first).convert("RGBA").resize((64, 64)).save(big)
    empty, text = tmp_path / "empty.png", tmp_path / "notes.jpg"
    empty.write_bytes(b"")
    text.write_text("not an image")
    assert np.array_equal(load_image(png), split.images[0])  # lossless 32x32: the exact CIFAR row

    result = tmp_path / "p.json"
    code = main(["predict", "--models", str(out / "models"), str(png), str(empty), str(jpg), str(text), str(big),
                 "--out", str(result)])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(png), str(jpg), str(big)]
    errors = [e for e in captured.err.splitlines() if e.startswith("error:")]
    assert any(str(empty) in e and "empty" in e for e in errors)
    assert any(str(text) in e and "not an image" in e for e in errors)
    written = json.loads(result.read_text())
    assert [p["input"] for p in written["predictions"]] == [str(png), str(jpg), str(big)]
    assert len(written["errors"]) == 2

    # the PNG gets the same answer as the same image read from the split
    split_csv = tmp_path / "split.csv"
    assert main(["predict", "--models", str(out), "--data", str(data_dir), "--split", "test",
                 "--out", str(split_csv)]) == 0
    with open(split_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(split.images)
    assert rows[0]["true_class"] == names[split.fine_labels[0]]
    png_row = written["predictions"][0]
    for key in ("predicted_class", "path", "rejected_at"):
        assert str(png_row[key]) == rows[0][key]
    assert float(rows[0]["confidence"]) == pytest.approx(png_row["confidence"], abs=1e-6)


def test_predict_usage_errors(deep_run, tmp_path, capsys):
    _, data_dir, out, _ = deep_run
    assert main(["predict", "--models", str(out)]) == 2
    assert main(["predict", "--models", str(out), "x.png", "--out", str(tmp_path / "p.txt")]) == 2
    assert main(["predict", "--models", str(tmp_path), "x.png"]) == 2
    err = capsys.readouterr().err
    assert "not both and not neither" in err and ".csv or .json" in err and "no model files" in err
