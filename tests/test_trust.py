"""Calibration, acceptance rules, metrics.json, predictions CSV and reports of a whole run on synthetic
data, each figure checked against an independent computation (scikit-learn, scipy, numpy loops)."""

import csv
import json
import math
import statistics

import numpy as np
import pytest
import scipy.special
from PIL import Image
from sklearn.metrics import brier_score_loss, confusion_matrix, log_loss, precision_recall_fscore_support

from branching.acceptance.metrics import format_report
from branching.acceptance.rule import Acceptance, rejects
from branching.acceptance.scores import recompute_selective
from branching.cli.main import main
from branching.config.parse import load_config, parse_config
from branching.config.recipes import get_recipe
from branching.data.tree_data import load_tree_data
from branching.errors import ConfigError
from branching.models.forward import node_inputs
from branching.reports.run import write_seeds_report
from branching.reports.seeds import parse_seeds
from branching.tables import HTML, MARKDOWN, interval, mean_std, num, pct, table
from branching.train.nodes import fit_acceptance, parent_normalizer
from branching.train.run import run, run_seeds
from branching.tree.checkpoint import ModelStore

TREE = """
parent = { classes = ["sunflower", "poppy", "tulip", "crab", "aquarium_fish", "shark"], hidden = [64, 32] }

[branches.fish]
classes = ["crab", "aquarium_fish", "shark"]
layer = 1
hidden = [16]
accept = { rule = "coverage", coverage = 0.5 }

[branches.flower]
classes = ["sunflower", "poppy", "tulip"]
layer = 1
hidden = [16]
accept = { rule = "risk", risk = 0.001, delta = 0.1 }
"""


EPOCHS = 6


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_c10):
    """One run with a coverage rule (fish) and a risk rule no threshold can meet (flower)."""
    root = tmp_path_factory.mktemp("trust")
    (root / "tree.toml").write_text(TREE)
    printed = []
    config = load_config(root / "tree.toml")
    metrics = run(config, synthetic_c10, root / "out", get_recipe("default", EPOCHS), seed=0,
                           progress=False, echo=printed.append)
    return root / "out", config, metrics, "\n".join(printed)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wilson(k, n, z=1.959963984540054):
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [(centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)]


def aurc_loop(confidence, correct):
    order = sorted(range(len(confidence)), key=lambda i: -confidence[i])
    assert len(set(confidence)) == len(confidence), "reference assumes no ties"
    errors, total = 0, 0.0
    for k, i in enumerate(order, start=1):
        errors += not correct[i]
        total += errors / k
    return total / len(order)


def ece_loop(confidence, correct, n_bins=15):
    confidence, correct = np.asarray(confidence), np.asarray(correct, dtype=float)
    edges = np.linspace(0, 1, n_bins + 1)
    return sum(inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
               for lo, hi in zip(edges[:-1], edges[1:]) if (inside := (confidence > lo) & (confidence <= hi)).any())


def test_single_seed_contract_is_kept(run_dir):
    out, _, metrics, _ = run_dir
    on_disk = json.loads((out / "metrics.json").read_text())
    assert {"seed", "recipe", "parent", "branches", "timings"} <= set(on_disk)
    assert on_disk["seed"] == 0 and set(on_disk["branches"]) == {"fish", "flower"}
    assert on_disk["branches"]["fish"]["coverage"] == metrics["branches"]["fish"]["coverage"]


@pytest.mark.parametrize("node", ["parent", "fish", "flower"])
def test_selective_figures_are_recomputable_from_the_csv(run_dir, node):
    out, _, metrics, _ = run_dir
    m = metrics["parent"] if node == "parent" else metrics["branches"][node]
    rows = read_csv(out / "predictions" / f"{node}.csv")
    assert list(rows[0])[:7] == ["index", "file", "true_class", "predicted_class", "confidence", "accepted",
                                 "raw_confidence"]
    correct = [r["true_class"] == r["predicted_class"] for r in rows]
    confidence = [float(r["confidence"]) for r in rows]
    accepted = [r["accepted"] == "1" for r in rows]
    n, k = len(rows), sum(accepted)
    assert m["test_samples"] == n and m["test_accuracy"] == pytest.approx(sum(correct) / n)
    assert m["test_accuracy_ci"] == pytest.approx(wilson(sum(correct), n))
    assert m["aurc"] == pytest.approx(aurc_loop(confidence, correct))
    perfect = aurc_loop([float(c) + 1e-9 * i for i, c in enumerate(correct)], correct)
    assert m["eaurc"] == pytest.approx(aurc_loop(confidence, correct) - perfect)
    assert m["ece"] == pytest.approx(ece_loop(confidence, correct))
    assert m["ece_raw"] == pytest.approx(ece_loop([float(r["raw_confidence"]) for r in rows], correct))
    if node == "parent":
        assert "coverage" not in m and all(accepted)  # no reject option unless [parent.accept] sets one
    else:
        right_accepted = sum(c for c, a in zip(correct, accepted) if a)
        assert (m["accepted"], m["coverage"]) == (k, pytest.approx(k / n))
        assert m["coverage_ci"] == pytest.approx(wilson(k, n))
        if k:
            assert m["accepted_accuracy"] == pytest.approx(right_accepted / k)
            assert m["accepted_accuracy_ci"] == pytest.approx(wilson(right_accepted, k))
        threshold = m["acceptance"]["threshold"]
        assert accepted == [threshold is not None and c >= threshold for c in confidence]
    again = recompute_selective(rows)
    for key, value in again.items():
        if key in m and key != "parent_head":
            assert m[key] == pytest.approx(value), key
    if "parent_head" in again:
        for key, value in again["parent_head"].items():
            assert m["parent_head"][key] == pytest.approx(value), key


def node_logits(out, config, data_dir, node, split, rows=None):
    """Logits of `node` (and of the parent) for its images of a split, through the saved models."""
    models = ModelStore(out / "models").load_tree(config)
    data = load_tree_data(config, data_dir)
    spec = config.node(node)
    images, labels, file_rows = data.node_rows(split, spec)
    if rows is not None:
        keep = np.isin(file_rows, rows)
        images, labels = images[keep], labels[keep]
    X = parent_normalizer(models["parent"]).transform(images)
    logits = models[node].logits(node_inputs(models, node, X)).astype(np.float64)
    return logits, labels, models, models["parent"].logits(X).astype(np.float64)


@pytest.mark.parametrize("node", ["parent", "fish"])
def test_temperature_is_the_nll_minimum_on_validation_logits(run_dir, synthetic_c10, node):
    out, config, metrics, _ = run_dir
    models = ModelStore(out / "models").load_tree(config)
    meta = models[node].meta
    logits, labels, _, _ = node_logits(out, config, synthetic_c10, node, "train", meta.val_rows)
    assert len(labels) == meta.acceptance["calibration"]["validation_samples"] > 0
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 20001))
    log_p = scipy.special.log_softmax(logits[None] / grid[:, None, None], axis=2)
    nll = -log_p[:, np.arange(len(labels)), labels].mean(axis=1)
    best = grid[int(np.argmin(nll))]
    assert 0.06 < best < 19, "the NLL minimum should be inside the search range for this test to mean much"
    assert meta.acceptance["temperature"] == pytest.approx(best, rel=1e-3)
    t = meta.acceptance["temperature"]  # and sklearn agrees on the NLL there
    assert meta.acceptance["calibration"]["val_nll"] == pytest.approx(
        log_loss(labels, scipy.special.softmax(logits / t, axis=1), labels=range(logits.shape[1])), rel=1e-6)
    assert meta.acceptance["calibrated"]
    m = metrics["parent"] if node == "parent" else metrics["branches"][node]
    assert m["temperature"] == meta.acceptance["temperature"]
    if node == "fish":  # coverage rule: the most confident half of the validation images
        confidence = np.sort(scipy.special.softmax(logits / m["temperature"], axis=1).max(axis=1))[::-1]
        assert m["acceptance"]["threshold"] == pytest.approx(confidence[math.ceil(0.5 * len(labels)) - 1])
        assert m["acceptance"]["asked"] == {"coverage": 0.5}
        assert m["acceptance"]["validation"]["coverage"] >= 0.5
        assert m["acceptance"]["test"]["coverage"] == m["coverage"]


@pytest.mark.parametrize("node", ["parent", "fish"])
def test_nll_brier_per_class_and_parent_head_match_sklearn(run_dir, synthetic_c10, node):
    out, config, metrics, _ = run_dir
    m = metrics["parent"] if node == "parent" else metrics["branches"][node]
    logits, labels, _, parent_logits = node_logits(out, config, synthetic_c10, node, "test")
    classes = list(config.node(node).classes)
    for suffix, t in (("_raw", 1.0), ("", m["temperature"])):
        p = scipy.special.softmax(logits / t, axis=1)
        assert m[f"nll{suffix}"] == pytest.approx(log_loss(labels, p, labels=range(len(classes))), rel=1e-6)
        assert m[f"brier{suffix}"] == pytest.approx(brier_score_loss(labels, p, labels=range(len(classes))),
                                                    rel=1e-6)
    predicted = logits.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, zero_division=0,
                                                                     labels=range(len(classes)))
    for i, name in enumerate(classes):
        assert m["per_class"][name] == pytest.approx({"precision": precision[i], "recall": recall[i], "f1": f1[i],
                                                      "support": support[i]})
    assert m["confusion_matrix"] == confusion_matrix(labels, predicted, labels=range(len(classes))).tolist()
    if node == "fish":  # the parent's own head restricted to the branch's classes
        columns = [config.parent.classes.index(c) for c in classes]
        restricted = parent_logits[:, columns]
        parent_t = metrics["parent"]["temperature"]
        rows = read_csv(out / "predictions" / "fish.csv")
        assert [r["parent_predicted_class"] for r in rows] == [classes[i] for i in restricted.argmax(axis=1)]
        np.testing.assert_allclose([float(r["parent_confidence"]) for r in rows],
                                   scipy.special.softmax(restricted / parent_t, axis=1).max(axis=1), rtol=1e-5)


def test_unattainable_rule_accepts_nothing_and_says_why(run_dir):
    out, _, metrics, printed = run_dir
    flower = metrics["branches"]["flower"]
    rule = flower["acceptance"]
    assert rule["threshold"] is None and rule["attained"] is False and "0.001" in rule["reason"]
    assert flower["accepted"] == 0 and flower["coverage"] == 0 and flower["accepted_accuracy"] is None
    assert all(r["accepted"] == "0" for r in read_csv(out / "predictions" / "flower.csv"))
    assert "cannot be met on validation" in printed and "accepting nothing" in printed
    assert "cannot be met" in (out / "report.md").read_text()


def test_printed_tables_show_the_calibrated_view(run_dir):
    _, config, metrics, printed = run_dir
    text = format_report("fish", metrics["branches"]["fish"], config.node("fish").classes)
    for needle in ("Accepted Predictions:", "Accuracy on Accepted:", "Acceptance: coverage rule (coverage 50%)",
                   "max probability >=", "Coverage:", "accepted accuracy:", "AURC", "E-AURC", "ECE", "on test:"):
        assert needle in text
    assert text in printed
    assert "AURC" in format_report("parent", metrics["parent"], config.parent.classes)


def test_one_way_to_write_figures():
    assert (pct(0.81234), pct(None), pct(0.5, 1), pct(0.012, 1, unit="", sign=True)) == ("81.23%", "n/a", "50.0%", "+1.2")
    assert interval([0.8012, 0.8234]) == " [80.1%, 82.3%]" and interval(None) == ""
    assert (num(0.123456), num(None), num(2.5, 1)) == ("0.1235", "n/a", "2.5")
    assert mean_std({"mean": 0.8123, "std": 0.0132}, scale=100, digits=1, unit="%") == "81.2 ± 1.3%"
    assert mean_std({"mean": 0.5, "std": None}) == "0.5000" and mean_std(None, na="-") == "-"
    assert table(["a", "b"], [["x", "0.9600"]], MARKDOWN).splitlines()[2] == "| x   | 0.9600 |"
    assert "<td>a&lt;b</td>" in table(["h"], [["a<b"]], HTML)


def test_report_has_tables_and_readable_pngs(run_dir):
    out, config, _, _ = run_dir
    report = (out / "report.md").read_text()
    for name in ("parent", "fish", "flower", "aquarium_fish", "precision", "AURC", "ECE", "The routed tree",
                 "exact McNemar p"):
        assert name in report
    images = [line[line.index("](") + 2:-1] for line in report.splitlines() if line.startswith("![")]
    expected = {f"plots/{kind}-{node}.png" for kind in ("training", "risk-coverage", "reliability", "confusion")
                for node in ("parent", "fish", "flower")}
    assert set(images) == expected
    for image in images:
        with Image.open(out / image) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 400
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(images) and "<table>" in html


def test_seeds_give_mean_and_std_of_the_headline_figures(tmp_path, synthetic_c10):
    (tmp_path / "tree.toml").write_text(TREE)
    printed = []
    config = load_config(tmp_path / "tree.toml")
    summary = run_seeds(config, synthetic_c10, tmp_path / "out", get_recipe("default", 1), [0, 1],
                        progress=False, echo=printed.append, report=False)
    write_seeds_report(tmp_path / "out")  # what run_seeds does with report=True, without each seed's report
    runs = [json.loads((tmp_path / "out" / f"seed-{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1]
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["seeds"] == [0, 1] and on_disk == json.loads(json.dumps(summary))
    for node, key in (("fish", "coverage"), ("fish", "aurc"), ("fish", "acceptance.threshold"),
                      ("parent", "test_accuracy"), ("parent", "ece")):
        values = []
        for r in runs:
            m = r["parent"] if node == "parent" else r["branches"][node]
            for part in key.split("."):
                m = m[part]
            values.append(m)
        got = on_disk["parent"][key] if node == "parent" else on_disk["branches"][node][key]
        assert got["mean"] == pytest.approx(statistics.mean(values))
        assert got["std"] == pytest.approx(statistics.stdev(values))
    assert "mean ± std over seeds 0, 1" in printed[-1] and "fish" in printed[-1]
    tree = [r["tree"]["test_accuracy"] for r in runs]  # the routed tree is summarised over seeds too
    assert on_disk["tree"]["test_accuracy"]["mean"] == pytest.approx(statistics.mean(tree))
    assert "routed tree, end to end" in printed[-1]
    assert "The routed tree, end to end" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "report.md").is_file()
    assert (tmp_path / "out" / "plots" / "risk-coverage-fish.png").is_file()


@pytest.mark.parametrize("text", ["0,x", "1,1", "-1", "", "0,,1"])
def test_bad_seed_lists_are_one_line_errors(text, capsys, tmp_path):
    with pytest.raises(ConfigError, match="--seeds"):
        parse_seeds(text)
    assert main(["run", "--seeds", text, "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--no-download"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_fixed_temperature_contradicting_calibrate_is_a_config_error():
    text = '[parent]\nclasses = ["a", "b"]\n[parent.accept]\ncalibrate = true\ntemperature = 2.0\n'
    with pytest.raises(ConfigError, match="temperature.*calibrate"):
        parse_config(text)


def test_parent_rejects_only_when_configured_and_rules_work_without_validation_images():
    base = '[parent]\nclasses = ["a", "b", "c"]\n[branches.x]\nclasses = ["a", "b"]\n'
    plain = parse_config(base)
    assert not rejects(plain.parent) and rejects(plain.node("x"))
    ruled = parse_config(base + '[parent.accept]\nthreshold = 0.5\n')
    assert rejects(ruled.parent)
    original = get_recipe("original").parent  # no validation images, no calibration
    empty = np.zeros((0, 3), dtype=np.float32)
    fitted = Acceptance.fit(ruled.parent.accept, original, empty, np.zeros(0, dtype=np.int64), rejects=False)
    assert (fitted.temperature, fitted.calibrated, fitted.calibration) == (1.0, False, {"validation_samples": 0})
    assert not fitted.rejects and fitted.accepts(np.array([0.1, 0.9])).all()
    rule = fit_acceptance(ruled.parent, original, empty, np.zeros(0, dtype=np.int64))
    assert rule.threshold == 0.5 and rule.validation["samples"] == 0
    covered = parse_config(base + '[parent.accept]\nrule = "coverage"\ncoverage = 0.9\n')
    rule = fit_acceptance(covered.parent, original, empty, np.zeros(0, dtype=np.int64))
    assert rule.threshold is None and "no validation images" in rule.reason
    assert not rule.accepts(np.array([0.99, 1.0])).any()
    assert Acceptance.from_dict(rule.to_dict()) == rule
    fixed = parse_config(base + '[parent.accept]\ntemperature = 2.5\n')
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    fitted = Acceptance.fit(fixed.parent.accept, get_recipe("default").parent, logits, np.array([0, 1]), rejects=False)
    assert (fitted.temperature, fitted.calibrated) == (2.5, False)
    np.testing.assert_allclose(fitted.confidence(logits), scipy.special.softmax(logits / 2.5, axis=1).max(axis=1))
    assert fitted.calibration["val_nll"] == pytest.approx(log_loss([0, 1], scipy.special.softmax(logits / 2.5, axis=1),
                                                       labels=[0, 1, 2]))
