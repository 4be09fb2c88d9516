"""`python -m branching run`: short training on the real six classes, the output contract, metrics
recomputed from the predictions CSV, determinism and the original recipe (on synthetic data)."""

import csv
import json

import numpy as np
import pytest
from reference import (FISH, FLOWER, ORIGINAL_CLASSES, REPO_ROOT, branch_logits, file_mode_ok, forward, linear_layers,
                       load_checkpoint, normalise, read_pickle, read_split, run_command, softmax)
from sklearn.metrics import accuracy_score, confusion_matrix
from sklearn.model_selection import train_test_split

REAL_CONFIG = REPO_ROOT / "configs" / "cifar100-6.toml"
ORIGINAL_CONFIG = REPO_ROOT / "configs" / "original.toml"
REAL_PARENT = ["beaver", "whale", "wolf", "sunflower", "forest", "oak_tree"]
REAL_BRANCHES = {"mammals": ["beaver", "whale", "wolf"], "plants": ["sunflower", "forest", "oak_tree"]}
CSV_COLUMNS = ["index", "file", "true_class", "predicted_class", "confidence", "accepted"]


def run_tree(config, data, out, *extra):
    result = run_command(["-m", "branching", "run", "--config", config, "--data", data, "--out", out,
                          "--no-download", "--quiet", *extra], cwd=out.parent)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="session")
def real_run(real_data_dir, tmp_path_factory):
    """The real cifar100-6 tree trained for 3 epochs per node: (OUT, metrics, stdout)."""
    out = tmp_path_factory.mktemp("real") / "out"
    result = run_tree(REAL_CONFIG, real_data_dir, out, "--max-epochs", 3, "--seed", 0)
    return out, json.loads((out / "metrics.json").read_text()), result.stdout


def test_real_run_is_well_above_chance(real_run):
    _, metrics, stdout = real_run
    assert metrics["seed"] == 0 and metrics["recipe"] == "default"
    assert metrics["parent"]["test_samples"] == 600
    assert metrics["parent"]["test_accuracy"] > 0.5  # chance: 1/6
    assert set(metrics["branches"]) == set(REAL_BRANCHES)
    for name, branch in metrics["branches"].items():
        assert branch["test_samples"] == 300
        assert branch["accuracy"] > 0.55  # chance: 1/3
        assert branch["accuracy"] == branch["test_accuracy"]
        assert 0 <= branch["accepted"] <= 300
        assert branch["coverage"] == pytest.approx(branch["accepted"] / 300)
    assert metrics["timings"]["total_s"] > 0
    for title, n in (("parent", 600), ("mammals", 300), ("plants", 300)):
        assert f"== {title} ==\nTotal Test Samples: {n}\n" in stdout


def test_real_run_writes_the_predictions_contract(real_run, real_data_dir):
    out, metrics, _ = real_run
    test_labels = np.asarray(read_split_labels(real_data_dir))
    for name, classes in REAL_BRANCHES.items():
        path = out / "predictions" / f"{name}.csv"
        assert file_mode_ok(path) and file_mode_ok(out / "metrics.json")
        columns, rows = read_csv(path)
        assert columns[:6] == CSV_COLUMNS
        assert len(rows) == 300
        index = [int(r["index"]) for r in rows]
        assert len(set(index)) == 300
        # the index is the row of the official test file, whose label is the row's true class
        assert [r["true_class"] for r in rows] == [test_labels[i] for i in index]
        assert {r["predicted_class"] for r in rows} <= set(classes)
        assert {r["accepted"] for r in rows} <= {"0", "1"}
        assert all(1 / len(classes) - 1e-6 <= float(r["confidence"]) <= 1 + 1e-9 for r in rows)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["mammals.pt", "parent.pt", "plants.pt"]


def read_split_labels(data_dir):
    """Class name of every row of the official test file (plain pickle)."""
    names = [n.decode() for n in read_pickle(data_dir / "meta")[b"fine_label_names"]]
    return [names[f] for f in read_pickle(data_dir / "test")[b"fine_labels"]]


@pytest.mark.parametrize("node", ["parent", *REAL_BRANCHES])
def test_real_metrics_recompute_from_the_csv(real_run, node):
    out, metrics, _ = real_run
    m = metrics["parent"] if node == "parent" else metrics["branches"][node]
    classes = REAL_PARENT if node == "parent" else REAL_BRANCHES[node]
    _, rows = read_csv(out / "predictions" / f"{node}.csv")
    true = [r["true_class"] for r in rows]
    predicted = [r["predicted_class"] for r in rows]
    accepted = np.array([r["accepted"] == "1" for r in rows])
    assert m["test_samples"] == len(rows)
    assert m["test_accuracy"] == pytest.approx(accuracy_score(true, predicted), abs=1e-12)
    matrix = confusion_matrix(true, predicted, labels=classes)
    assert m["confusion_matrix"] == matrix.tolist()
    assert m["per_class_accuracy"] == pytest.approx({c: matrix[i, i] / matrix[i].sum() for i, c in enumerate(classes)})
    if node == "parent":
        return
    assert m["accepted"] == accepted.sum()
    assert m["coverage"] == pytest.approx(accepted.mean(), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(true, predicted), abs=1e-12)
    assert m["accepted_accuracy"] == pytest.approx(accuracy_score(np.array(true)[accepted],
                                                                  np.array(predicted)[accepted]), abs=1e-12)
    # accepted exactly when the confidence reaches the threshold chosen on validation
    confidence = np.array([float(r["confidence"]) for r in rows])
    threshold = m["acceptance"]["threshold"]
    clear = np.abs(confidence - threshold) > 1e-6  # the CSV may round the confidence
    assert np.array_equal(accepted[clear], confidence[clear] >= threshold)


@pytest.mark.parametrize("node", REAL_BRANCHES)
def test_real_predictions_match_an_independent_forward_pass(real_run, real_data_dir, node):
    out, _, _ = real_run
    parent, branch = load_checkpoint(out / "models" / "parent.pt"), load_checkpoint(out / "models" / f"{node}.pt")
    norm = parent["meta"]["normalization"]
    classes = REAL_BRANCHES[node]
    images, labels, file_rows = read_split(real_data_dir, "test", classes)
    logits = branch_logits(images, parent, branch, norm["mean"].numpy(), norm["std"].numpy())
    confidence = softmax(logits, branch["meta"]["acceptance"]["temperature"]).max(axis=1)
    _, rows = read_csv(out / "predictions" / f"{node}.csv")
    by_index = {int(r["index"]): r for r in rows}
    assert sorted(by_index) == file_rows.tolist()
    assert [by_index[i]["predicted_class"] for i in file_rows] == [classes[p] for p in logits.argmax(axis=1)]
    np.testing.assert_allclose([float(by_index[i]["confidence"]) for i in file_rows], confidence, atol=2e-5)
    assert [by_index[i]["true_class"] for i in file_rows] == [classes[t] for t in labels]


def test_real_parent_predictions_match_an_independent_forward_pass(real_run, real_data_dir):
    out, _, _ = real_run
    parent = load_checkpoint(out / "models" / "parent.pt")
    norm = parent["meta"]["normalization"]
    images, _, file_rows = read_split(real_data_dir, "test", REAL_PARENT)
    logits = forward(normalise(images, norm["mean"].numpy(), norm["std"].numpy()), linear_layers(parent))
    _, rows = read_csv(out / "predictions" / "parent.csv")
    by_index = {int(r["index"]): r["predicted_class"] for r in rows}
    assert [by_index[i] for i in file_rows] == [REAL_PARENT[p] for p in logits.argmax(axis=1)]


# ---- synthetic data: determinism and the original recipe ---------------------------------------

def without_timings(path):
    metrics = json.loads(path.read_text())
    assert metrics.pop("timings")["total_s"] > 0
    return metrics


def test_same_seed_same_data_same_metrics(synthetic_c10, tmp_path, monkeypatch):
    """Bit for bit with one thread: with two, MKL's kernels can vary the last bits from run to run (about one
    run in seven here, at every commit tried)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        run_tree(ORIGINAL_CONFIG, synthetic_c10, out, "--max-epochs", 2, "--seed", 5)
    first, second = (without_timings(out / "metrics.json") for out in outs)
    assert first["seed"] == 5 and first["recipe"] == "default"
    assert first == second
    for node in ("parent", "fish", "flower"):
        assert (outs[0] / "predictions" / f"{node}.csv").read_bytes() == \
            (outs[1] / "predictions" / f"{node}.csv").read_bytes()


def test_original_recipe_runs_as_the_original_did(synthetic_c10, tmp_path):
    out = tmp_path / "out"
    run_tree(ORIGINAL_CONFIG, synthetic_c10, out, "--max-epochs", 2, "--recipe", "original")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["recipe"] == "original"
    assert metrics["parent"]["test_samples"] == 120
    assert {b: m["test_samples"] for b, m in metrics["branches"].items()} == {"fish": 60, "flower": 60}
    parent = load_checkpoint(out / "models" / "parent.pt")
    recipe = parent["meta"]["recipe"]
    assert {k: recipe["parent"][k] for k in ("optimizer", "lr", "batch_size", "dropout", "weight_decay")} == \
        {"optimizer": "adam", "lr": 1e-3, "batch_size": 64, "dropout": 0.3, "weight_decay": 0.0}
    assert {k: recipe["branch"][k] for k in ("optimizer", "lr", "batch_size", "dropout", "weight_decay", "patience")} \
        == {"optimizer": "adam", "lr": 3e-4, "batch_size": 32, "dropout": 0.5, "weight_decay": 0.01, "patience": 50}
    assert parent["dropout"] == 0.3

    # no validation for the parent; per-pixel mean/std over all of its training images
    images, _, rows = read_split(synthetic_c10, "train", ORIGINAL_CLASSES)
    assert len(parent["meta"]["val_rows"]) == 0
    assert sorted(parent["meta"]["train_rows"].tolist()) == rows.tolist()
    np.testing.assert_allclose(parent["meta"]["normalization"]["mean"].numpy(), images.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(parent["meta"]["normalization"]["std"].numpy(), images.std(axis=0), rtol=1e-5)

    for name, classes in (("fish", FISH), ("flower", FLOWER)):
        branch = load_checkpoint(out / "models" / f"{name}.pt")
        meta = branch["meta"]
        assert branch["dropout"] == 0.5
        # the output of the parent's 2nd Linear layer, before its ReLU
        assert (meta["source"], meta["layer"], meta["where"]) == ("parent", 1, "pre")
        # an 80/20 stratified split of the branch's training images with random_state=42
        _, labels, branch_rows = read_split(synthetic_c10, "train", classes)
        train_idx, val_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=42)
        assert sorted(meta["val_rows"].tolist()) == sorted(branch_rows[val_idx].tolist())
        assert sorted(meta["train_rows"].tolist()) == sorted(branch_rows[train_idx].tolist())
        # accept when the max softmax probability (no temperature) is at least 0.96
        acceptance = metrics["branches"][name]["acceptance"]
        assert acceptance["threshold"] == 0.96 and acceptance["temperature"] == 1.0
        _, rows_csv = read_csv(out / "predictions" / f"{name}.csv")
        test_images, test_labels, test_rows = read_split(synthetic_c10, "test", classes)
        norm = parent["meta"]["normalization"]
        logits = branch_logits(test_images, parent, branch, norm["mean"].numpy(), norm["std"].numpy())
        confidence = softmax(logits).max(axis=1)
        by_index = {int(r["index"]): r for r in rows_csv}
        np.testing.assert_allclose([float(by_index[i]["confidence"]) for i in test_rows], confidence, atol=2e-5)
        accepted = np.array([by_index[i]["accepted"] == "1" for i in test_rows])
        clear = np.abs(confidence - 0.96) > 1e-4
        assert np.array_equal(accepted[clear], confidence[clear] >= 0.96)


def test_the_device_asked_for_is_where_branches_read_and_nodes_are_evaluated(small_data_dir, tmp_path, monkeypatch):
    """Without a GPU here, the device is followed through: every block that runs a trunk or a node is asked
    to run on the device the run was given, and the models are back on the CPU afterwards."""
    import torch

    from reference import SMALL_TREE

    from branching.config.parse import parse_config
    from branching.config.recipes import get_recipe
    from branching.models import device as device_module
    from branching.train import nodes, run as run_module
    from branching.tree import routing

    asked = []
    real = device_module.on_device

    def recording(models, device):
        models = list(models)
        asked.append((str(device), sorted(m.meta.name if m.meta else "?" for m in models)))
        return real(models, device)

    monkeypatch.setattr(nodes, "on_device", recording)
    monkeypatch.setattr(run_module, "on_device", recording)
    monkeypatch.setattr(routing, "on_device", recording)
    config = parse_config(SMALL_TREE)
    metrics = run_module.run(config, small_data_dir, tmp_path / "out", get_recipe("default", 1), seed=0,
                             progress=False, echo=lambda *_: None, report=False, device=torch.device("cpu"))
    assert metrics["device"] == "cpu"
    branch_training = [names for device, names in asked if names == ["parent"] or names == ["mammals", "parent"]]
    evaluation = [names for device, names in asked if names == ["mammals", "parent", "water"]]
    assert {device for device, _ in asked} == {"cpu"}
    assert len(branch_training) == 2  # mammals and water trained
    assert len(evaluation) == 4  # three nodes evaluated, then the routed tree
