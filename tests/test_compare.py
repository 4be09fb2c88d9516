"""`compare`: every method on a small synthetic tree, checked against hand counts and manual computations."""

import json

import numpy as np
import pytest
import torch
from reference import SMALL_TREE as TREE
from reference import SMALL_TREE_CLASSES as CLASSES
from reference import SMALL_TREE_N_TEST as N_TEST
from scipy import stats as scipy_stats

from branching.acceptance.rule import Acceptance
from branching.acceptance.stats import bootstrap_interval, t_interval
from branching.cli.main import main
from branching.config.recipes import get_recipe
from branching.models.forward import node_inputs
from branching.models.model import Model
from branching.reports.compare import paired_delta, summarise
from branching.studies.baselines import (EndToEnd, Outcome, Recipes, count_parameters, restricted_logits, run_branch,
                                         run_finetune, run_parent_head, unrestricted_logits)
from branching.studies.compare import compare_seed, make_context, score
from branching.train.nodes import parent_normalizer, train_branch
from branching.tree import cost


def lin(a, b):
    """Weights and biases of one Linear layer, by hand."""
    return a * b + b


@pytest.fixture(scope="module")
def result(small_config, small_data):
    return compare_seed(small_config, small_data, seed=0, recipes=Recipes.capped(1), progress=False)


@pytest.fixture(scope="module")
def context(small_config, small_data):
    return make_context(small_config, small_data, seed=0, recipes=Recipes.capped(1), progress=False)


def test_every_method_runs_on_every_branch(result):
    assert list(result["branches"]["mammals"]) == [
        "branch", "branch_original", "parent_head", "parent_unrestricted", "linear_probe",
        "layer0_pre", "layer0_post", "layer1_post", "taps_concat", "scratch_mlp", "finetune"]
    # water reads mammals, whose one hidden layer gives a single other reading: post
    assert list(result["branches"]["water"]) == [
        "branch", "branch_original", "parent_head", "parent_unrestricted", "linear_probe", "layer0_post",
        "taps_concat", "scratch_mlp", "finetune"]
    for name, n_classes in (("mammals", 3), ("water", 2)):
        for key, r in result["branches"][name].items():
            assert r["test_samples"] == n_classes * N_TEST, key
            assert r["correct"].shape == (n_classes * N_TEST,), key
            assert 0 <= r["test_accuracy"] <= 1 and r["test_accuracy"] == r["correct"].mean()
            if key != "parent_unrestricted":
                assert r["acceptance"] is not None and 0 <= r["coverage"] <= 1 and r["aurc"] is not None, key


def test_parameter_counts_by_hand(result):
    m = {k: r["trainable_parameters"] for k, r in result["branches"]["mammals"].items()}
    trunk = lin(3072, 16) + lin(16, 8)
    assert m["branch"] == m["branch_original"] == m["layer1_post"] == lin(8, 6) + lin(6, 3) == 75
    assert m["layer0_pre"] == m["layer0_post"] == lin(16, 6) + lin(6, 3)
    assert m["linear_probe"] == 8 * 3 + 3
    assert m["taps_concat"] == lin(16 + 8, 6) + lin(6, 3)  # both hidden layers, before their ReLU as the branch
    assert m["parent_head"] == m["parent_unrestricted"] == 0
    assert m["scratch_mlp"] == m["finetune"] == trunk + lin(8, 6) + lin(6, 3) == 49379
    w = {k: r["trainable_parameters"] for k, r in result["branches"]["water"].items()}
    assert w["branch"] == w["taps_concat"] == lin(6, 3) + lin(3, 2)
    # fine-tuning trains the parent's trunk, the mammals branch up to its layer 0, and water
    assert w["finetune"] == w["scratch_mlp"] == trunk + lin(8, 6) + lin(6, 3) + lin(3, 2)


def test_flops_by_hand(result, small_config):
    m = {k: r["inference_flops"] for k, r in result["branches"]["mammals"].items()}
    assert m["branch"] == 2 * (3072 * 16 + 16 * 8 + 8 * 6 + 6 * 3)
    assert m["parent_head"] == 2 * (3072 * 16 + 16 * 8 + 8 * 4)
    assert m["linear_probe"] == 2 * (3072 * 16 + 16 * 8 + 8 * 3)
    assert m["layer0_pre"] == 2 * (3072 * 16 + 16 * 6 + 6 * 3)
    assert m["taps_concat"] == 2 * (3072 * 16 + 16 * 8 + 24 * 6 + 6 * 3)
    assert cost.linear_params(cost.path_widths(small_config, "mammals")) == count_parameters(
        Model(cost.path_widths(small_config, "mammals")).net)


def test_restricted_parent_head_is_the_argmax_over_the_branch_classes(context, small_config, small_data):
    outcome = run_parent_head(context, small_config.node("mammals"))
    parent = context.models["parent"]
    images, labels, _ = small_data.node_rows("test", small_config.node("mammals"))
    logits = parent.logits(parent_normalizer(parent).transform(images))
    branch_classes = ["beaver", "whale", "wolf"]
    manual = [max(range(3), key=lambda j: logits[i, CLASSES.index(branch_classes[j])]) for i in range(len(logits))]
    np.testing.assert_array_equal(outcome.logits.argmax(axis=1), manual)
    assert outcome.trainable_parameters == 0
    # unrestricted: the parent's own 4-way prediction, "other" when it is sunflower
    own = logits.argmax(axis=1)
    expected = np.where(own == 3, 3, own)
    np.testing.assert_array_equal(unrestricted_logits(logits, CLASSES, branch_classes).argmax(axis=1), expected)
    # the order of the branch's classes is the order of the columns
    np.testing.assert_array_equal(restricted_logits(logits, CLASSES, ["wolf", "beaver"]), logits[:, [2, 0]])


def test_end_to_end_starts_as_trunk_plus_branch_and_leaves_the_parent_alone(context, small_config, small_data):
    spec = small_config.node("mammals")
    run_branch(context, spec)
    parent, branch = context.models["parent"], context.models["mammals"]
    fingerprint = parent.fingerprint()
    X = parent_normalizer(parent).transform(small_data.node_rows("test", spec)[0])
    net = EndToEnd(context.models, "mammals")
    with torch.no_grad():
        combined = net(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(combined, branch.logits(node_inputs(context.models, "mammals", X)), atol=1e-5)
    # the parent's last hidden-to-output layer is not on the path: frozen, not counted
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == lin(3072, 16) + lin(16, 8) + 75
    run_finetune(context, spec)
    assert parent.fingerprint() == fingerprint and parent.frozen


def test_score_against_a_hand_computation():
    logits = np.log(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]))
    labels = np.array([0, 0, 0, 1])  # correct, wrong, correct, correct
    outcome = Outcome(logits, Acceptance(1.0, rule="threshold", threshold=0.75), 10, 100, 1.0, 2.0)
    r = score(outcome, labels)
    assert r["test_accuracy"] == 0.75
    assert r["coverage"] == 0.5 and r["accepted_accuracy"] == 0.5  # 0.9 (right) and 0.8 (wrong) accepted
    # confidences 0.9 R, 0.8 W, 0.7 R, 0.6 R: risks 0, 1/2, 1/3, 1/4
    assert r["aurc"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert r["total_train_s"] == 3.0
    nothing = score(Outcome(logits, Acceptance(1.0, rule="threshold", threshold=None), 0, 0, 0.0, 0.0), labels)
    assert nothing["coverage"] == 0 and nothing["accepted_accuracy"] is None


def test_intervals_against_scipy_and_a_normal_approximation():
    values = [0.8, 0.83, 0.78]
    expected = scipy_stats.t.interval(0.95, 2, loc=np.mean(values), scale=scipy_stats.sem(values))
    np.testing.assert_allclose(t_interval(values), expected)
    assert t_interval([0.8]) is None
    rng = np.random.default_rng(1)
    a = [rng.random(400) < 0.8 for _ in range(3)]
    b = [rng.random(400) < 0.7 for _ in range(3)]
    d = paired_delta(a, b)
    diff = np.mean(a, axis=0) - np.mean(b, axis=0)
    assert d["mean"] == pytest.approx(np.mean(a) - np.mean(b))
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert d["ci95"][0] == pytest.approx(diff.mean() - half, abs=0.01)
    assert d["ci95"][1] == pytest.approx(diff.mean() + half, abs=0.01)
    # the same resampling written out: 2000 resamples of the images by default_rng(0), 2.5 and 97.5 percentiles
    means = diff[np.random.default_rng(0).integers(0, len(diff), size=(2000, len(diff)))].mean(axis=1)
    np.testing.assert_allclose(d["ci95"], np.percentile(means, [2.5, 97.5]), rtol=0, atol=1e-12)
    np.testing.assert_allclose(bootstrap_interval(diff, 0.9, 500, seed=3),
                               np.percentile(diff[np.random.default_rng(3).integers(0, 400, size=(500, 400))]
                                             .mean(axis=1), [5, 95]), rtol=0, atol=1e-12)
    assert bootstrap_interval([0.25]) == [0.25, 0.25]
    assert t_interval([0.5, 0.5, 0.5]) == [0.5, 0.5]  # scipy alone would give nan


def test_summary_over_seeds(result):
    summary = summarise([result, result])
    branch = summary["branches"]["mammals"]["branch"]
    accuracy = result["branches"]["mammals"]["branch"]["test_accuracy"]
    assert branch["test_accuracy"]["n"] == 2 and branch["test_accuracy"]["mean"] == pytest.approx(accuracy)
    assert branch["test_accuracy"]["std"] == 0 and len(branch["per_seed"]) == 2
    assert summary["branches"]["mammals"]["parent_head"]["delta_vs_parent_head"]["mean"] == 0
    assert "correct" not in json.dumps(summary)


def test_compare_command_writes_its_three_files(small_data_dir, tmp_path, capsys):
    tree = tmp_path / "tree.toml"
    tree.write_text(TREE.split("branches.water")[0])
    out = tmp_path / "out"
    code = main(["compare", "--config", str(tree), "--data", str(small_data_dir), "--out", str(out),
                 "--seeds", "3", "--max-epochs", "1", "--quiet", "--no-download"])
    assert code == 0
    result = json.loads((out / "compare.json").read_text())
    mammals = result["summary"]["branches"]["mammals"]
    assert result["setup"]["seeds"] == [3] and mammals["branch"]["per_seed"][0]["trainable_parameters"] == 75
    assert "--seeds 3" in result["setup"]["command"]
    text = (out / "compare.md").read_text()
    assert "## mammals" in text and "MLP from scratch, same size" in text
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "compare.md" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0,x"], "--seeds"),
    (["--max-epochs", "0"], "--max-epochs"),
])
def test_bad_input_is_one_line_and_writes_nothing(small_tree_file, small_data_dir, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["compare", "--config", str(small_tree_file), "--data", str(small_data_dir), "--out", str(out),
                 "--quiet", "--no-download", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_tree_without_branches_is_an_error(small_data_dir, tmp_path, capsys):
    path = tmp_path / "flat.toml"
    path.write_text('[parent]\nclasses = ["beaver", "whale"]\nhidden = [8]\n')
    code = main(["compare", "--config", str(path), "--data", str(small_data_dir), "--out",
                 str(tmp_path / "o"), "--quiet", "--no-download"])
    assert code == 2 and "nothing to compare" in capsys.readouterr().err


def test_cached_activations_train_the_same_branch(small_config, small_data, small_trained, tmp_path):
    """compare trains the branches on other layers from the feature cache: same coin flips, same branch
    (up to the rounding of the features)."""

    recipe = get_recipe("default", 2)
    parent = small_trained["parent"]
    plain, plain_meta = train_branch(small_config, "mammals", {"parent": parent}, small_data, recipe, 0, False)
    plain.meta = plain_meta
    cached, _ = train_branch(small_config, "mammals", {"parent": parent}, small_data, recipe, 0, False, tmp_path)
    X = parent_normalizer(parent).transform(small_data.node_rows("test", small_config.node("mammals"))[0])
    features = node_inputs({"parent": parent, "mammals": plain}, "mammals", X)
    np.testing.assert_allclose(cached.logits(features), plain.logits(features), atol=1e-4)
