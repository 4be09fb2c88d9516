"""`probe-layers`: linear probes on every hidden layer, validated on held-out images, and their advice."""

import numpy as np
import pytest
from scipy.special import softmax

from branching.cli.main import main
from branching.models.meta import NodeMeta
from branching.models.model import Model
from branching.studies.probe import fit_linear_probe, held_out_split, probe_layers, recommend


def test_one_row_per_layer_and_reading_validated_on_held_out_images(small_config, small_data, small_trained):
    config, data, models = small_config, small_data, small_trained
    table = probe_layers(config, models, data)
    assert [(r["branch"], r["layer"], r["where"]) for r in table] == [
        ("mammals", 0, "pre"), ("mammals", 0, "post"), ("mammals", 1, "pre"), ("mammals", 1, "post"),
        ("water", 0, "pre"), ("water", 0, "post")]
    assert [r["width"] for r in table] == [16, 16, 8, 8, 6, 6]
    assert [r["tap"] for r in table] == ["hidden0.pre", "hidden0.post", "hidden1.pre", "hidden1.post",
                                         "hidden0.pre", "hidden0.post"]
    to_parent_1 = 2 * (3072 * 16 + 16 * 8)  # by hand: 2 FLOPs per weight of every Linear on the way
    assert [r["flops_to_layer"] for r in table] == [2 * 3072 * 16] * 2 + [to_parent_1] * 2 + [to_parent_1 + 2 * 8 * 6] * 2
    assert [r["configured"] for r in table] == [False, False, True, False, True, False]
    parent_val = set(models["parent"].meta.val_rows.tolist())
    for row in table:
        _, _, rows = data.node_rows("train", config.node(row["branch"]))
        assert row["validation"] == "parent"
        assert row["val_samples"] == sum(r in parent_val for r in rows.tolist())
        assert row["train_samples"] + row["val_samples"] == len(rows)
    best = recommend(table)
    for name in ("mammals", "water"):
        rows = [r for r in table if r["branch"] == name]
        assert best[name]["val_accuracy"] == max(r["val_accuracy"] for r in rows)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_logits_give_scikit_learns_probabilities(n_classes):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 5)), np.arange(60) % n_classes
    X[:, 0] += y
    probe, val = fit_linear_probe(X[:40], y[:40], X[40:], y[40:])
    np.testing.assert_allclose(softmax(probe.logits(X[40:]), axis=1), probe.pipeline.predict_proba(X[40:]),
                               atol=1e-10)
    assert val["accuracy"] == np.mean(probe.pipeline.predict(X[40:]) == y[40:])
    assert probe.num_parameters == (5 * n_classes + n_classes if n_classes > 2 else 5 + 1)


def test_without_held_out_images_an_80_20_split_of_the_branch_images():
    parent = Model([4, 3, 2])
    parent.meta = NodeMeta("parent", "parent", val_rows=np.zeros(0, dtype=np.int64))
    labels = np.repeat([0, 1], 50)
    train_idx, val_idx, kind = held_out_split(parent, np.arange(100) * 3, labels)
    assert kind == "own" and len(val_idx) == 20 and np.bincount(labels[val_idx]).tolist() == [10, 10]
    assert sorted([*train_idx, *val_idx]) == list(range(100))


def test_probe_layers_command_trains_a_parent_or_reads_a_run(small_tree_file, small_data_dir, tmp_path, capsys):
    common = ["--config", str(small_tree_file), "--data", str(small_data_dir), "--quiet", "--no-download"]
    args = ["probe-layers", *common]
    assert main([*args, "--max-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "a parent trained here" in out and out.count("<- recommended") == 2
    assert "mammals: read parent hidden" in out and "water: read mammals hidden0" in out
    run = tmp_path / "run"
    assert main(["run", *common, "--out", str(run), "--max-epochs", "1", "--no-report"]) == 0
    capsys.readouterr()
    assert main([*args, "--models", str(run / "models")]) == 0
    assert f"models from {run / 'models'}" in capsys.readouterr().out
    assert main([*args, "--models", str(run)]) == 0  # a run folder, as predict takes it
    capsys.readouterr()
    assert main([*args, "--models", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no model for 'parent'") and len(err.strip().splitlines()) == 1
