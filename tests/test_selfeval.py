"""Self-evaluation branches: config errors before work, cross-fitting that never labels a fold with a
model that saw it, acceptance on any score, and a judged tree through run, predict and routing, checked
against an independent float64 forward pass."""

import csv

import numpy as np
import pytest
import scipy.special
import torch
from reference import (FOUR_CLASS_PARENT, MAMMALS, SMALL_TREE_CLASSES, WATER, forward, linear_layers, load_checkpoint,
                       read_split, toml_table)

from branching.acceptance import confidence, selective
from branching.acceptance.rule import Acceptance
from branching.models.meta import JudgeMeta
from branching.cli.main import main
from branching.config.parse import parse_config
from branching.config.recipes import get_recipe
from branching.config.tree import Acceptance as AcceptSpec
from branching.data.normalization import Normalizer
from branching.data.tree_data import load_tree_data
from branching.errors import ConfigError
from branching.models.model import Model
from branching.train import selfeval
from branching.train.run import run
from branching.tree import judge
from branching.tree.checkpoint import load_folder
from branching.tree.routing import TreePredictor

JUDGED_TREE = (FOUR_CLASS_PARENT + toml_table("parent.accept", score="energy", rule="coverage", coverage=0.9)
               + MAMMALS + WATER + toml_table("branches.water.selfeval", layers=[0], hidden=[5], folds=3)
               + toml_table("branches.water.accept", score="selfeval", rule="coverage", coverage=0.7))

BASE = FOUR_CLASS_PARENT + MAMMALS


# ---- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    ('[branches.mammals.accept]\nscore = "selfeval"\n', "needs a self-evaluation branch; add a [branches.mammals.selfeval]"),
    ('[parent.accept]\nscore = "selfeval"\n', "add a [parent.selfeval] table"),
    ('[branches.mammals.selfeval]\nlayer = 2\n', "[branches.mammals.selfeval] layer: 2 is out of range for 'parent'"),
    ('[branches.mammals.selfeval]\nlayers = [0, "stage1"]\n', "'parent' has no tap 'stage1'"),
    ('[parent.selfeval]\nlayer = -3\n', "[parent.selfeval] layer: -3 is out of range"),
    ('[branches.mammals.accept]\nscore = "entropy"\n', "score: is not a known choice"),
    ('[branches.mammals.accept]\nscore = "margin"\n', "threshold: is required with score 'margin'"),
    ('[branches.mammals.selfeval]\nlayer = 0\nlayers = [1]\n', "layers: contradicts layer"),
    ('[branches.mammals.selfeval]\nfolds = 1\n', "folds: must be an integer from 2 to 20"),
    ('[branches.mammals.selfeval]\nlayers = []\nlogits = false\n', "the judge would read nothing"),
    ('[branches.mammals.selfeval]\nlayers = []\nwhere = "post"\n', "where: is for taps, and layers = [] reads none"),
])
def test_config_errors_are_one_line(extra, message):
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + extra, "tree.toml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_judge_of_the_logits_only_reads_no_tap():
    spec = parse_config(BASE + '[parent.selfeval]\nlayers = []\n', "tree.toml").parent.selfeval
    assert spec.layers == () and spec.logits


def _judge_model(widths, hidden, activation, std_scale, use_logits, seed):
    """An untrained judge with random weights and standardisation (std_scale small: one input's std too
    small to fold into the weights)."""
    rng = np.random.default_rng(seed)
    width = sum(widths)
    model = Model([width, *hidden, 2], activation=activation, seed=seed).freeze()
    taps = len(widths) - 2 * use_logits
    model.meta = JudgeMeta("mammals", [["parent", i, "pre", "flat"] for i in range(taps)], use_logits,
                           rng.normal(size=width).astype(np.float32), rng.uniform(0.5, 2, size=width).astype(np.float32))
    model.meta.feature_std[0] *= std_scale
    return model


@pytest.mark.parametrize("hidden, activation, std_scale, use_logits", [
    ([7], "relu", 1.0, True), ([7, 5], "tanh", 1.0, True), ([], "relu", 1.0, True), ([7], "relu", 1e-4, True),
    ([], "relu", 1e-4, True), ([7], "relu", 1.0, False), ([7], "relu", 1e-4, False)])
@pytest.mark.parametrize("n, dtype", [(1, np.float32), (33, np.float32), (5, np.float64), (0, np.float32)])
def test_judge_probability_is_a_float64_forward_pass(hidden, activation, std_scale, use_logits, n, dtype):
    """The judge's fast arithmetic (folded standardisation, one product per part, ascending sort against
    reversed rows, one logistic column; in torch and in numpy) against the plain definition in float64
    numpy and scipy."""
    widths = (9, 4, 3, 3) if use_logits else (9, 4)  # two taps, then 3 logits and their sorted softmax
    model = _judge_model(widths, hidden, activation, std_scale, use_logits, seed=len(hidden) + n)
    rng = np.random.default_rng(n)
    taps = [rng.normal(size=(n, w)).astype(dtype) for w in (9, 4)]
    taps[0] = np.asfortranarray(taps[0])  # not C-contiguous
    logits = (3 * rng.normal(size=(n, 3))).astype(dtype)
    x = np.concatenate([*taps, logits] if use_logits else taps, axis=1).astype(np.float64)
    if use_logits:
        p = scipy.special.softmax(x[:, -3:], axis=1)
        x = np.concatenate([x, -np.sort(-p, axis=1)], axis=1)  # largest first
    a = (x - model.meta.feature_mean) / model.meta.feature_std
    layers = [(m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
              for m in model.net if isinstance(m, torch.nn.Linear)]
    for i, (w, b) in enumerate(layers):
        a = a @ w.T + b
        if i < len(hidden):
            a = np.maximum(a, 0) if activation == "relu" else np.tanh(a)
    expected = scipy.special.softmax(a, axis=1)[:, 1]
    found = judge.Judge(model)
    assert found.numpy_rows > 0  # a judge this small multiplies with numpy on few rows; force each engine:
    for numpy_rows in (0, 10 ** 9):
        found.numpy_rows = numpy_rows
        p = found.probability_of(taps, logits)
        assert p.dtype == np.float32 and p.shape == (n,)
        np.testing.assert_allclose(p, expected, rtol=1e-4, atol=1e-5)


def test_only_a_small_judge_on_few_rows_multiplies_with_numpy():
    small = judge.Judge(_judge_model((9, 4, 3, 3), [7], "relu", 1.0, True, seed=0))
    assert small.numpy_rows == judge.NUMPY_PRODUCT // (19 * 7 + 7)
    wide = judge.Judge(_judge_model((1024, 512, 6, 6), [64], "relu", 1.0, True, seed=0))
    assert wide.numpy_rows == 0  # 1548 x 64 weights: numpy's BLAS could use threads torch was told not to


@pytest.mark.parametrize("widths", [(4, 9), (13,)])
def test_a_judge_refuses_taps_of_other_widths(widths):
    model = _judge_model((9, 4, 3, 3), [7], "relu", 1.0, True, seed=0)
    model.meta.tap_widths = [9, 4]  # as training records them
    taps = [np.zeros((2, w), np.float32) for w in widths]  # the same total width, cut otherwise
    with pytest.raises(ValueError, match=r"takes 19 inputs from 2 taps and the logits; got parts of widths"):
        judge.Judge(model).probability_of(taps, np.zeros((2, 3), np.float32))


def test_a_bad_selfeval_config_stops_run_before_any_work(tmp_path, capsys, small_data_dir):
    config = tmp_path / "tree.toml"
    config.write_text(BASE + '[branches.mammals.accept]\nscore = "selfeval"\n')
    out = tmp_path / "out"
    assert main(["run", "--config", str(config), "--data", str(small_data_dir), "--out", str(out),
                 "--no-download", "--quiet", "--max-epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "[branches.mammals.selfeval]" in err
    assert not out.exists()


def test_selfeval_table_round_trips_and_msp_files_keep_their_form():
    config = parse_config(BASE + '[branches.mammals.selfeval]\nlayers = ["hidden0.post", "hidden1.post"]\n'
                          '[branches.mammals.accept]\nscore = "energy"\nthreshold = -2.5\n')
    spec = config.branches["mammals"]
    assert spec.selfeval.layers == (0, 1) and spec.selfeval.where == "post"
    assert spec.accept.score == "energy" and spec.accept.threshold == -2.5
    assert parse_config(BASE).to_dict()["branches"]["mammals"].get("accept") is None
    again = parse_config(__import__("branching.config.tree", fromlist=["dump_toml"]).dump_toml(config))
    assert again.branches["mammals"] == spec
    assert "score" not in Acceptance(rule="threshold", threshold=0.9).to_dict()  # msp nodes: files unchanged
    energy = Acceptance(rule="coverage", threshold=-1.5, score="energy")
    assert energy.to_dict()["score"] == "energy" and Acceptance.from_dict(energy.to_dict()).score == "energy"


# ---- rules on any score --------------------------------------------------------------------------

@pytest.mark.parametrize("rule, kwargs", [("coverage", {"coverage": 0.6}), ("risk", {"risk": 0.3, "delta": 0.1})])
def test_rules_on_unbounded_scores_only_depend_on_the_order(rule, kwargs):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3, size=(400, 3))
    correct = rng.random(400) < 0.5 + 0.15 * confidence.margin(logits).clip(0, 3)
    for name in ("energy", "margin"):
        score = confidence.score(name, logits)
        base = selective.fit_rule(rule, score, correct, **kwargs)
        moved = selective.fit_rule(rule, 10 * score - 1000, correct, **kwargs)  # far outside [0, 1], same order
        assert base["attained"] and base["validation"] == moved["validation"]
        assert moved["threshold"] == pytest.approx(10 * base["threshold"] - 1000)


def test_threshold_rule_on_energy_counts_by_hand():
    logits = np.log(np.array([[1.0, 1.0], [3.0, 1.0], [6.0, 2.0], [0.5, 0.5]]))
    energy = confidence.energy(logits)  # log of the row sums: log 2, log 4, log 8, log 1
    assert energy == pytest.approx(np.log([2.0, 4.0, 8.0, 1.0]))
    correct = np.array([0, 1, 1, 0], dtype=bool)
    chosen = selective.fit_rule("threshold", energy, correct, threshold=float(np.log(3.0)))
    assert chosen["validation"] == {"samples": 4, "accepted": 2, "coverage": 0.5, "risk": 0.0}


def test_acceptance_fit_on_margin_by_hand():
    logits = np.array([[3.0, 0.0], [1.0, 0.5], [0.0, 2.0], [4.0, 3.5]])
    labels = np.array([0, 1, 1, 0])
    recipe = get_recipe("default").branch
    fitted = Acceptance.fit(AcceptSpec(rule="coverage", coverage=0.5, score="margin", calibrate=False), recipe,
                            logits, labels)
    assert fitted.threshold == 2.0 and fitted.score == "margin"  # margins 3, 0.5, 2, 0.5: the top half
    assert fitted.accepts(fitted.confidence(logits)).tolist() == [True, False, True, False]
    threshold = Acceptance.fit(AcceptSpec(threshold=-0.1, score="doctor", calibrate=False), recipe, logits, labels)
    g = lambda p: p * p + (1 - p) * (1 - p)  # noqa: E731
    p = 1 / (1 + np.exp(-np.array([3.0, 0.5, 2.0, 0.5])))
    assert threshold.confidence(logits) == pytest.approx(-(1 - g(p)) / g(p))


# ---- cross-fitting -------------------------------------------------------------------------------

@pytest.mark.parametrize("node", ["parent", "mammals"])
def test_crossfit_labels_come_from_copies_that_never_saw_the_fold(small_config, small_data, small_trained, node,
                                                                  monkeypatch, single_thread):
    seen = []
    original_fit = Normalizer.fit
    def spy(cls, images, rows=None, **kw):  # the images a normaliser was fit on
        seen.append(images.copy() if rows is None else images[rows])
        return original_fit(images, rows=rows, **kw)

    monkeypatch.setattr(Normalizer, "fit", classmethod(spy))
    cf = selfeval.crossfit(small_config, node, small_trained, small_data, get_recipe("default", 1), seed=0, folds=3)
    meta = small_trained[node].meta
    train_rows, val_rows = set(meta.train_rows.tolist()), set(meta.val_rows.tolist())
    held = [set(f.held_out.tolist()) for f in cf.folds]
    assert len(cf.folds) == 3 and sum(map(len, held)) == len(train_rows) and set().union(*held) == train_rows
    for fold in cf.folds:
        trained, out = set(fold.trained_on.tolist()), set(fold.held_out.tolist())
        assert not trained & out and trained | out == train_rows
        assert set(fold.validated_on.tolist()) == val_rows and not val_rows & out
    assert np.array_equal(cf.rows, np.concatenate([f.held_out for f in cf.folds]))
    record = cf.record()
    assert [set(f["trained_on"].tolist()) for f in record["folds"]] == [set(f.trained_on.tolist()) for f in cf.folds]
    if node == "parent":  # the images each copy was fit on: exactly its recorded rows, none of its fold
        pixels = small_data.train.images
        assert len(seen) == 3
        for fold, images in zip(cf.folds, seen):
            assert sorted(map(bytes, images)) == sorted(map(bytes, pixels[fold.trained_on]))
            assert not {bytes(r) for r in images} & {bytes(r) for r in pixels[fold.held_out]}
    labels = small_data.node_rows("train", small_config.node(node))
    by_row = dict(zip(labels[2].tolist(), labels[1].tolist()))
    assert cf.labels.tolist() == [by_row[r] for r in cf.rows.tolist()]


# ---- a judged tree end to end ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def judged_run(tmp_path_factory, small_data_dir):
    out = tmp_path_factory.mktemp("judged") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = run(parse_config(JUDGED_TREE), small_data_dir, out, get_recipe("default", 2), seed=0,
                      progress=False, report=False, echo=lambda *a: None)
    finally:
        torch.set_num_threads(previous)
    return out, metrics


def _reference_judge(out, data_dir, rows):
    """The water judge's probabilities in float64 numpy from the raw checkpoints: the mammals' hidden layer
    0 before its ReLU (what water's judge reads), water's logits, its sorted softmax."""
    parent, mammals, water = (load_checkpoint(out / "models" / f"{n}.pt") for n in ("parent", "mammals", "water"))
    judged = load_checkpoint(out / "models" / "water.selfeval.pt")
    images, _, file_rows = read_split(data_dir, "test", ["beaver", "whale", "wolf", "sunflower"])
    images = images[np.searchsorted(file_rows, rows)].astype(np.float64)
    norm = parent["meta"]["normalization"]
    x = (images - np.asarray(norm["mean"], np.float64)) / np.asarray(norm["std"], np.float64)
    h_parent = forward(x, linear_layers(parent), stop_layer=1, where="pre")
    h_mammals = forward(h_parent, linear_layers(mammals), stop_layer=0, where="pre")
    logits = forward(h_mammals, linear_layers(water))
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    features = np.concatenate([h_mammals, logits, -np.sort(-p, axis=1)], axis=1)
    meta = judged["meta"]
    z = (features - meta["feature_mean"].double().numpy()) / meta["feature_std"].double().numpy()
    out_logits = forward(z, linear_layers(judged))
    return 1 / (1 + np.exp(out_logits[:, 0] - out_logits[:, 1]))


def test_judged_run_writes_judges_and_uses_their_score(judged_run, small_data_dir):
    out, metrics = judged_run
    assert sorted(p.name for p in (out / "models").iterdir()) == ["mammals.pt", "parent.pt", "water.pt",
                                                                  "water.selfeval.pt"]
    config, models = load_folder(out / "models")  # the judge file is not taken for a node
    assert set(models) == {"parent", "mammals", "water"} and config.branches["water"].selfeval.folds == 3
    water = metrics["branches"]["water"]["acceptance"]
    assert water["score"] == "selfeval" and water["attained"] and metrics["parent"]["acceptance"]["score"] == "energy"
    judge_meta = load_checkpoint(out / "models" / "water.selfeval.pt")["meta"]
    assert judge_meta["node_fingerprint"] == models["water"].fingerprint()
    for fold in judge_meta["crossfit"]["folds"]:
        assert not set(fold["trained_on"].tolist()) & set(fold["held_out"].tolist())
    with open(out / "predictions" / "water.csv") as f:
        rows = list(csv.DictReader(f))
    expected = _reference_judge(out, small_data_dir, np.array([int(r["index"]) for r in rows]))
    got = np.array([float(r["confidence"]) for r in rows])
    assert got == pytest.approx(expected, abs=1e-5)
    threshold = water["threshold"]
    clear = np.abs(got - threshold) > 1e-5
    assert np.array_equal(np.array([r["accepted"] == "1" for r in rows])[clear], (got >= threshold)[clear])


def test_routing_and_predict_use_the_scores_as_the_generic_path_does(judged_run, small_data_dir, tmp_path,
                                                                     single_thread):
    out, metrics = judged_run
    config, models = load_folder(out / "models")
    data = load_tree_data(config, small_data_dir)
    images, labels, rows = data.node_rows("test", config.parent)
    result = TreePredictor.load(out / "models").predict(images, batch_size=7)
    # the parent rejects by energy at its fitted temperature, from the generic forward path
    X = Normalizer.from_dict(models["parent"].meta.normalization).transform(images)
    parent = Acceptance.of(models["parent"].meta)
    energy = parent.confidence(models["parent"].logits(X))
    at_parent = result.rejected_at == 0
    assert np.array_equal(at_parent, energy < parent.threshold)
    assert result.rejected_confidence[at_parent] == pytest.approx(energy[at_parent], abs=1e-4)
    # images that end at water carry its judge's probability, as evaluate_node computes it
    water = result.final_node == result.nodes.index("water")
    assert water.sum() >= 5
    expected = _reference_judge(out, small_data_dir, rows[water])
    assert result.confidence[water] == pytest.approx(expected, abs=1e-5)
    csv_path = tmp_path / "pred.csv"
    assert main(["predict", "--models", str(out), "--data", str(small_data_dir), "--split", "test",
                 "--out", str(csv_path)]) == 0
    with open(csv_path) as f:
        predicted = [r for r in csv.DictReader(f) if r["true_class"] in config.parent.classes]
    # predict shows the path as far as the node that answered or rejected
    shown = [result.path(i).split(" > ") for i in range(len(rows))]
    shown = [" > ".join(c[:c.index(result.rejected_level(i)) + 1] if result.rejected_level(i) else c)
             for i, c in enumerate(shown)]
    assert [r["path"] for r in predicted] == shown
    assert np.array([float(r["confidence"]) for r in predicted])[water] == pytest.approx(expected, abs=1e-5)
    assert metrics["tree"]["rules"]["water"]["score"] == "selfeval"


def test_a_missing_or_foreign_judge_is_refused(judged_run, tmp_path):
    out, _ = judged_run
    copy = tmp_path / "models"
    copy.mkdir()
    for name in ("parent", "mammals", "water"):
        (copy / f"{name}.pt").write_bytes((out / "models" / f"{name}.pt").read_bytes())
    from branching.errors import CheckpointError
    with pytest.raises(CheckpointError, match="no self-evaluation branch for 'water'"):
        TreePredictor.load(copy)
    (copy / "water.selfeval.pt").write_bytes((out / "models" / "water.selfeval.pt").read_bytes())
    (copy / "mammals.selfeval.pt").write_bytes((out / "models" / "water.selfeval.pt").read_bytes())
    TreePredictor.load(copy)  # an unused judge file is ignored


# ---- the comparison and the speed benchmark ----------------------------------------------------------

def test_fast_auroc_is_scikit_learns():
    from branching.studies.selfeval import fast_auroc
    rng = np.random.default_rng(3)
    values = np.round(rng.normal(size=300), 1)
    correct = rng.random(300) < 0.6
    assert fast_auroc(values, correct) == pytest.approx(confidence.auroc(values, correct), abs=1e-12)


def test_paired_difference_by_hand():
    from branching.studies.selfeval import paired_difference
    correct = np.array([1, 1, 0, 1, 0, 1], dtype=bool)
    good, bad = correct.astype(float), np.arange(6, dtype=float)  # a perfect ranking and an arbitrary one
    run = {"correct": correct.tolist(), "scores": {
        "msp_t": {"values": bad.tolist(), "aurc": selective.aurc(bad, correct)},
        "x": {"values": good.tolist(), "aurc": selective.aurc(good, correct)}}}
    d = paired_difference([run, run], "x", "aurc", n_boot=200)
    expected = selective.aurc(good, correct) - selective.aurc(bad, correct)
    assert d["mean"] == pytest.approx(expected) and d["values"] == pytest.approx([expected, expected])
    assert d["ci95_seeds"] == pytest.approx([expected, expected])
    low, high = d["ci95_images"]
    assert low <= 0 and high <= 0 and low < high  # a perfect ranking is never worse on any resample


def test_selfeval_command_writes_every_score(small_data_dir, tmp_path, single_thread):
    config = tmp_path / "tree.toml"
    config.write_text(BASE + "[branches.mammals.selfeval]\nhidden = [4]\nfolds = 2\n")
    out = tmp_path / "cmp"
    assert main(["selfeval", "--config", str(config), "--data", str(small_data_dir), "--seeds", "0",
                 "--max-epochs", "1", "--out", str(out), "--no-download", "--quiet", "--bootstrap", "20"]) == 0
    import json
    result = json.loads((out / "selfeval.json").read_text())
    mammals = result["summary"]["mammals"]
    assert set(mammals) == {"_node", "msp_1", "msp_t", "doctor", "energy", "margin", "selfeval_0", "selfeval_1",
                            "selfeval_all", "selfeval_logits", "oracle"}
    assert mammals["oracle"]["eaurc"]["mean"] == pytest.approx(0.0) and mammals["oracle"]["auroc"]["mean"] == 1.0
    seed = result["seeds"][0]["nodes"]["mammals"]
    assert seed["crossfit"]["folds"] == 2 and result["seeds"][0]["nodes"]["parent"]["crossfit"]["folds"] == 5
    assert max(seed["scores"]["msp_1"]["values"]) <= 1 and max(seed["scores"]["doctor"]["values"]) <= 0
    assert "## Verdicts" in (out / "selfeval.md").read_text()
    assert (out / "selfeval.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra, judge_mflop", [([], "0.067"), (["--logits-only"], "0.002")])
def test_bench_selfeval_times_each_judged_node(tmp_path, extra, judge_mflop):
    from reference import REPO_ROOT, run_command
    done = run_command([REPO_ROOT / "benchmarks" / "bench_selfeval.py", "--config", REPO_ROOT / "configs" /
                        "cifar100-6.toml", "--images", "64", "--single", "3", "--repeats", "1", "--batch-size", "32",
                        *extra], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "parent > mammals" in done.stdout and "largest batched" in done.stdout
    # a judge of [512 (+ 12 logits and sorted softmax) -> 64 -> 2]: 2 x (524 x 64 + 64 x 2) FLOPs; of 12 inputs alone
    parent_row = next(line for line in done.stdout.splitlines() if line.startswith("parent "))
    assert parent_row.split()[1] == judge_mflop and "judge alone" in done.stdout


CNN_JUDGED = (toml_table("parent", classes=SMALL_TREE_CLASSES, kind="cnn", widths=[8, 16], depth=1)
              + toml_table("parent.selfeval", layers=["stage0", "stage1"], hidden=[8], folds=2)
              + toml_table("parent.accept", score="selfeval", rule="coverage", coverage=0.6)
              + toml_table("branches.mammals", classes=["beaver", "whale", "wolf"], hidden=[6]))


def test_a_cnn_parent_judged_on_its_own_stages_routes_as_the_generic_path(small_data_dir, tmp_path, single_thread):
    out = tmp_path / "run"
    run(parse_config(CNN_JUDGED), small_data_dir, out, get_recipe("default", 1), seed=0, progress=False,
        report=False, echo=lambda *a: None)
    config, models = load_folder(out / "models")
    from branching.tree import judge
    found = judge.load_for(models, "parent")
    assert [r[1] for r in found.reads] == [0, 1] and found.reads[0][3] == "avg"
    images, _, _ = load_tree_data(config, small_data_dir).node_rows("test", config.parent)
    X = Normalizer.from_dict(models["parent"].meta.normalization).transform(images)
    generic = found.score_images(models, X)  # forward.extract: the taps pooled by nets.pool
    acceptance = Acceptance.of(models["parent"].meta)
    assert acceptance.score == "selfeval" and 0 < acceptance.accepts(generic).mean() < 1
    result = TreePredictor.load(out).predict(images, batch_size=16)
    clear = np.abs(generic - acceptance.threshold) > 1e-5
    assert np.array_equal((result.rejected_at == 0)[clear], (generic < acceptance.threshold)[clear])
    at_parent = result.rejected_at == 0
    assert result.rejected_confidence[at_parent] == pytest.approx(generic[at_parent], abs=1e-5)


def test_a_judge_of_the_logits_alone_trains_and_routes_as_the_generic_path(small_data_dir, tmp_path, single_thread):
    out = tmp_path / "run"
    tree = BASE + ('[branches.mammals.selfeval]\nlayers = []\nhidden = [4]\nfolds = 2\n'
                   '[branches.mammals.accept]\nscore = "selfeval"\nrule = "coverage"\ncoverage = 0.7\n')
    run(parse_config(tree), small_data_dir, out, get_recipe("default", 1), seed=0, progress=False, report=False,
        echo=lambda *a: None)
    config, models = load_folder(out / "models")
    found = judge.load_for(models, "mammals")
    assert found.reads == [] and found.tap_widths == [] and found.use_logits
    images, _, _ = load_tree_data(config, small_data_dir).node_rows("test", config.parent)
    X = Normalizer.from_dict(models["parent"].meta.normalization).transform(images)
    generic = found.score_images(models, X)
    result = TreePredictor.load(out).predict(images, batch_size=16)
    at_mammals = result.final_node == result.nodes.index("mammals")
    assert at_mammals.any()
    assert result.confidence[at_mammals] == pytest.approx(generic[at_mammals], abs=1e-5)


def test_predict_one_node_uses_its_judge(judged_run, small_data_dir, tmp_path):
    out, _ = judged_run
    csv_path = tmp_path / "water.csv"
    assert main(["predict", "--models", str(out), "--node", "water", "--data", str(small_data_dir), "--split", "test",
                 "--out", str(csv_path)]) == 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    _, _, file_rows = read_split(small_data_dir, "test", ["beaver", "whale", "wolf", "sunflower"])
    assert len(rows) == len(file_rows)
    expected = _reference_judge(out, small_data_dir, file_rows)
    assert np.array([float(r["confidence"]) for r in rows]) == pytest.approx(expected, abs=1e-5)


def test_a_module_parent_is_its_own_out_of_sample_copy(small_data_dir, tmp_path, single_thread):
    import tiny_backbone
    torch.manual_seed(0)
    torch.save(tiny_backbone.build().state_dict(), tmp_path / "w.pt")
    parent = (f'[parent]\nclasses = ["beaver", "whale", "wolf", "sunflower"]\nkind = "module"\n'
              f'module = "tiny_backbone:build"\nweights = "{tmp_path / "w.pt"}"\n')
    with pytest.raises(ConfigError, match="needs the parent's head, which this module parent does not have"):
        parse_config(parent + "[parent.selfeval]\nlayer = -1\n")
    config = parse_config(parent + 'head = true\n[parent.selfeval]\nlayers = ["layer1", "pool"]\nfolds = 3\n'
                          '[parent.accept]\nscore = "selfeval"\nrule = "coverage"\ncoverage = 0.5\n'
                          '[branches.mammals]\nclasses = ["beaver", "whale", "wolf"]\nlayer = "pool"\nhidden = [4]\n')
    out = tmp_path / "run"
    metrics = run(config, small_data_dir, out, get_recipe("default", 1), seed=0, progress=False, report=False,
                  echo=lambda *a: None)
    meta = load_checkpoint(out / "models" / "parent.selfeval.pt")["meta"]
    assert all(len(f["trained_on"]) == 0 for f in meta["crossfit"]["folds"])  # no copy: the module never trains
    parent_model = load_folder(out / "models")[1]["parent"]
    held = np.concatenate([f["held_out"].numpy() for f in meta["crossfit"]["folds"]])
    assert sorted(held.tolist()) == sorted(parent_model.meta.train_rows.tolist())
    assert metrics["parent"]["acceptance"]["score"] == "selfeval"
    assert TreePredictor.load(out).predict(read_split(small_data_dir, "test", ["beaver"])[0]).confidence.shape == (10,)


def test_routing_from_a_judged_entry_branch(judged_run, small_data_dir, single_thread):
    out, _ = judged_run
    images, _, file_rows = read_split(small_data_dir, "test", ["beaver", "whale", "wolf", "sunflower"])
    result = TreePredictor.load(out / "models", entry="water").predict(images, batch_size=9)
    assert set(result.final_node.tolist()) == {result.nodes.index("water")}
    assert result.confidence == pytest.approx(_reference_judge(out, small_data_dir, file_rows), abs=1e-5)


def test_selfeval_nodes_scores_only_the_nodes_named(small_data_dir, tmp_path, single_thread, capsys):
    config = tmp_path / "tree.toml"
    config.write_text(BASE + "[branches.mammals.selfeval]\nhidden = [4]\nfolds = 2\n")
    argv = ["selfeval", "--config", str(config), "--data", str(small_data_dir), "--seeds", "0", "--max-epochs", "1",
            "--no-download", "--quiet", "--bootstrap", "20"]
    assert main(argv + ["--out", str(tmp_path / "cmp"), "--nodes", "mammals"]) == 0
    import json
    result = json.loads((tmp_path / "cmp" / "selfeval.json").read_text())
    assert set(result["summary"]) == set(result["seeds"][0]["nodes"]) == {"mammals"}
    assert "--nodes mammals" in result["setup"]["command"]
    assert main(argv + ["--out", str(tmp_path / "bad"), "--nodes", "mammals,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown node 'nope'" in err and not (tmp_path / "bad").exists()


def test_a_judge_declared_beside_another_score_still_shows_in_the_metrics(small_data_dir, tmp_path, single_thread):
    text = BASE + "[branches.mammals.selfeval]\nhidden = [4]\nfolds = 2\n"  # mammals accepts by max softmax
    metrics = run(parse_config(text), small_data_dir, tmp_path / "run", get_recipe("default", 1), seed=0,
                  progress=False, report=False, echo=lambda *a: None)
    mammals = metrics["branches"]["mammals"]
    assert mammals["acceptance"].get("score", "msp") == "msp"
    assert "selfeval" in mammals["confidence_scores"] and "selfeval" not in metrics["parent"]["confidence_scores"]
