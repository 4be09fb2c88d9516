"""Early exits: the config's checks, the trunk run tap by tap (the same columns as encode, rows dropped between
taps), the cascade's fit against scipy's binomial, and a tree answering at its exits at any batch size as the
one-at-a-time run and the simulation on full encodings do."""

import json

import numpy as np
import pytest
import scipy.stats
import torch
from test_pretrained import random_weights, shape, tree  # noqa: F401 (fixtures)
from test_text import tiny_bert  # noqa: F401 (a fixture)

import branching
from branching.cli import main as cli
from branching.config.parse import parse_config
from branching.config.tree import CascadeSpec
from branching.errors import ConfigError
from branching.models import encoder as encoders
from branching.models.kinds import get_kind
from branching.models.stages import ImageStages, TextStages, offsets
from branching.tree import cascade as cascades
from branching.tree.checkpoint import load_folder
from branching.tree.routing import TreePredictor

EXITS = 'exits = ["block3", "block6"]\n\n[parent.cascade]\nrisk = 0.6\ndelta = 0.2\n'


def test_the_image_trunk_run_tap_by_tap_gives_encodes_columns_for_the_rows_kept(random_weights):
    from branching.models import trunks
    s = shape(random_weights)
    trunk = trunks.load_trunk(s, torch.device("cpu"))
    stages = ImageStages(trunk)
    pixels = np.random.default_rng(0).integers(0, 256, (5, 3 * 32 * 32), dtype=np.uint8)
    full = get_kind("pretrained").encode(s, pixels, torch.device("cpu"), progress=False, depth=9)
    cut = offsets(stages.widths, stages.pools)
    stages.start(pixels, np.arange(5))
    first = stages.advance(4)
    stages.keep(np.array([1, 4]))
    rest = stages.advance(9)
    np.testing.assert_array_equal(first, full[:, :cut[4]])
    np.testing.assert_array_equal(rest, full[[1, 4], cut[4]:cut[9]])


def test_the_text_trunk_run_layer_by_layer_gives_encodes_columns_and_flops_by_hand(tiny_bert):
    found = encoders.Encoder(str(tiny_bert), 32)
    texts = ["good film", "the plot was awful and very very dull", "fun", "a good and lovely film"]
    full, _ = found.encode(texts, 4, progress=False)
    stages = TextStages(found)
    cut = offsets(stages.widths, stages.pools)
    rows = stages.chunks(texts)[0]
    stages.start(texts, rows)
    first = stages.advance(2)
    stages.keep(np.array([0, 2]))
    rest = stages.advance(4)
    np.testing.assert_allclose(first, full[rows, :cut[2]], atol=1e-6)
    np.testing.assert_allclose(rest, full[rows[[0, 2]], cut[2]:cut[4]], atol=1e-6)
    # a BERT layer by hand: Q, K, V, O (4 d^2) and the feed-forward (2 d ff) a token, attention 2 L^2 d twice
    d, ff = 24, 48
    costs = get_kind("text").tap_costs({"model": str(tiny_bert), "max_length": 32}, texts)
    tokens = np.array([len(found.tokenize([t])[0][0]) for t in texts])
    layer = 2 * (4 * d * d + 2 * d * ff) * tokens + 4 * tokens ** 2 * d
    np.testing.assert_allclose(costs[:, 3] - costs[:, 0], 3 * layer)


def test_the_fitted_threshold_is_the_cheapest_that_scipys_binomial_passes():
    rng = np.random.default_rng(0)
    n, k = 400, 2
    labels = rng.integers(0, 3, n)
    confidence = rng.uniform(0.3, 1.0, (k, n))
    right = rng.random((k, n)) < confidence  # surer exits are right more often
    predicted = np.where(right, labels, (labels + 1) % 3)
    outputs = cascades.ExitOutputs(confidence, predicted, np.zeros((k, n, 3), np.float32))
    guess = np.where(rng.random(n) < 0.8, labels, (labels + 2) % 3)
    accepted = rng.random(n) < 0.9
    costs = cascades.Costs(np.tile([100.0, 200.0], (n, 1)), np.full(n, 300.0))
    spec = CascadeSpec(risk=0.2, delta=0.1)
    fitted = cascades.fit(spec, ("a", "b"), outputs, guess, accepted, labels, costs)
    passing = []
    for t in cascades.GRID:  # counted here by hand, and tested with scipy's binomial
        exited = np.full(n, -1)
        for j in (1, 0):
            exited[confidence[j] >= t] = j
        answer = np.where(exited >= 0, predicted[np.maximum(exited, 0), np.arange(n)], guess)
        answered = (exited >= 0) | accepted
        errors, m = int((answered & (answer != labels)).sum()), int(answered.sum())
        cost = np.where(exited >= 0, np.array([100.0, 200.0])[np.maximum(exited, 0)], 300.0).mean()
        if scipy.stats.binom.cdf(errors, m, spec.risk) <= spec.delta / len(cascades.GRID):
            passing.append((cost, None if t == float("inf") else t))
    assert passing and fitted.attained
    assert fitted.threshold == min(passing)[1]
    unreachable = cascades.fit(CascadeSpec(risk=0.01, delta=0.1), ("a", "b"), outputs, guess, accepted, labels, costs)
    assert unreachable.threshold is None and "the lowest bound reachable is" in unreachable.reason
    budget = cascades.fit(CascadeSpec(budget=250.0), ("a", "b"), outputs, guess, accepted, labels, costs)
    assert all(p["mflops"] * 1e6 <= 250.0 or p["threshold"] != budget.threshold for p in budget.curve)


@pytest.mark.parametrize("extra, message", [
    ('exits = ["block6", "head"]\n[parent.cascade]\nrisk = 0.1\n', r"\[parent\] exits: head is at or after the tap "
                                                                   r"of the parent's head \(head\); an exit answers"),
    ('exits = []\n[parent.cascade]\nrisk = 0.1\n', r"\[parent\] exits: must be a list of one or more of the parent's "
                                                  r'tap names; write e.g. exits = \["block1", "block3"\]'),
    ('exits = ["block6", "block6"]\n[parent.cascade]\nrisk = 0.1\n', r"'block6' is named twice"),
    ('exits = ["block6"]\n', r"exits need a \[parent.cascade\] table; write risk = 0.05"),
    ('exits = ["block6"]\n[parent.cascade]\nrisk = 0.1\nbudget = 5\n', r"give one of risk and budget"),
    ('[parent.cascade]\nrisk = 0.1\n', r"\[parent.cascade\] is for a parent with exits"),
    ('exits = ["block99"]\n[parent.cascade]\nrisk = 0.1\n', r"\[parent\] exits: 'block99' is not a tap of the parent \(the "
                                                            r"last is 'block15'\); its taps are stem, block0"),
])
def test_bad_exits_are_one_line_errors_before_any_work(random_weights, extra, message):
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config(tree(random_weights, extra_parent=extra), "t.toml")
    assert "\n" not in str(caught.value)


def test_exits_need_a_staged_trunk_and_no_branch_below_them(random_weights):
    mlp = '[parent]\nclasses = ["a", "b"]\nexits = ["hidden0"]\n[parent.cascade]\nrisk = 0.1\n'
    with pytest.raises(ConfigError, match=r'exits need a frozen trunk that runs tap by tap, which the parent '
                                          r'\(kind mlp\) is not; use kind = "pretrained" or "text"'):
        parse_config(mlp, "t.toml")
    below = tree(random_weights, extra_parent=EXITS) + '[branches.x]\nclasses = ["beaver", "whale"]\nfrom = "exit-block3"\n'
    with pytest.raises(ConfigError, match=r"\[branches.x\] from: 'exit-block3' is an exit"):
        parse_config(below, "t.toml")
    config = parse_config(tree(random_weights, extra_parent=EXITS), "t.toml")
    assert [e.name for e in config.exits()] == ["exit-block3", "exit-block6"]
    assert [n.name for n in config.routed().nodes()] == ["parent", "mammals"]  # routing never reaches an exit


@pytest.fixture(scope="module")
def exited(tmp_path_factory, random_weights, small_data_dir):
    root = tmp_path_factory.mktemp("exits-run")
    (root / "tree.toml").write_text(tree(random_weights, extra_parent=EXITS))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("BRANCHING_CACHE", str(root / "cache"))
        assert cli.main(["run", "--config", str(root / "tree.toml"), "--data", str(small_data_dir), "--out",
                         str(root / "out"), "--max-epochs", "3", "--quiet", "--no-download", "--no-report"]) == 0
    return root


def test_a_run_fits_the_cascade_on_held_out_rows_and_measures_it(exited):
    metrics = json.loads((exited / "out" / "metrics.json").read_text())
    m = metrics["cascade"]
    assert m["exits"] == ["exit-block3", "exit-block6"] and set(m["single_exit"]) == set(m["exits"])
    assert m["full_trunk"]["mflops"] >= m["cascade"]["mflops"] and sum(m["cascade"]["exits"]) <= 1
    assert len(m["test_curve"]) == len(m["calibration_curve"]) == len(cascades.GRID)
    _, models = load_folder(exited / "out")
    parent = models["parent"].meta
    calibration = set(parent.calibration_rows.tolist())
    assert m["calibration_samples"] == len(calibration) > 0
    for name, model in models.items():  # no node trained or validated on the calibration rows
        assert not calibration & set(model.meta.train_rows.tolist()), name
        assert not calibration & set(model.meta.val_rows.tolist()), name
    assert (exited / "out" / "models" / "cascade.json").is_file()


def test_the_cascade_answers_at_any_batch_size_as_one_at_a_time_and_as_the_simulation(exited, small_data_dir,
                                                                                       monkeypatch):
    from branching.data.tree_data import load_tree_data
    monkeypatch.setenv("BRANCHING_CACHE", str(exited / "cache"))
    config, models = load_folder(exited / "out")
    cascade = cascades.Cascade.load(exited / "out" / "models", models)
    cascade.threshold = float(np.quantile(cascades.exit_outputs(  # a threshold at which some leave at each exit
        models, cascade.exits, TreePredictor(config, models).root.normalizer.transform(
            np.asarray(load_tree_data(config, small_data_dir).test.images[:40], np.float32)),
        list(config.classes())).confidence, 0.6))
    cascade.save(exited / "out" / "models")
    tree = branching.load(exited / "out", "cpu")
    from branching.data.cifar import load_split
    pixels = load_split(small_data_dir, "test").images[:40]
    ran = []
    original = ImageStages.advance

    def counting(self, depth):  # which rows each block runs on
        ran.append((self.done, depth, len(self.x)))
        return original(self, depth)

    monkeypatch.setattr(ImageStages, "advance", counting)
    together = tree(pixels)
    left = [a.path[0] for a in together]
    assert {"exit-block3", "exit-block6", "parent"} <= set(left), left
    n3, n6 = left.count("exit-block3"), left.count("exit-block6")
    assert ran == [(0, 5, 40), (5, 8, 40 - n3), (8, config.parent.shape_dict["depth"], 40 - n3 - n6)]  # stem is tap 0
    one = [tree(pixels[i:i + 1])[0] for i in range(len(pixels))]
    # one at a time: the same answers, but where the full trunk itself answers otherwise in a batch and alone (random
    # weights at 32 px: standardising a nearly constant column turns the trunk's last bits into ~1e-3)
    full = branching.load(exited / "out", "cpu", exits=False)
    full_together, full_one = full(pixels), [full(pixels[i:i + 1])[0] for i in range(len(pixels))]
    noise = max(abs(a.score - b.score) for a, b in zip(full_together, full_one))
    same = [(a.label, a.path) == (b.label, b.path) for a, b in zip(together, one)]
    assert sum(same) >= 0.9 * len(same)  # the real weights' answers agree to 1e-5: benchmarks/bench_exits.py speed
    assert max(abs(a.score - b.score) for a, b, kept in zip(together, one, same) if kept) <= noise + 1e-6
    assert all(a.score == b.score for a, b in zip(together, full_together) if a.path == b.path)  # the same batch
    vectors = get_kind("pretrained").encode(config.parent.shape_dict, pixels, torch.device("cpu"), progress=False)
    simulated, _, _ = cascades.simulate(TreePredictor(config, models), models, cascade, vectors)
    assert [(simulated.chains[f][-1], simulated.rejected_level(i) or None) for i, f in enumerate(simulated.final_node)] \
        == [(a.node, a.rejected_at) for a in together]
    np.testing.assert_allclose(simulated.confidence, [a.score for a in together], atol=1e-5)
    assert all(a.path[0] == "parent" for a in full_together) and tree.nodes[-2:] == ("exit-block3", "exit-block6")
    with pytest.raises(ConfigError, match=r"answers at early exits \(exit-block3, exit-block6\).*so it does not export"):
        from branching.api.export import export
        export(tree, exited / "x.onnx")


def test_a_budget_below_the_first_exit_is_refused_before_any_work(random_weights, small_data_dir, tmp_path, capsys):
    (tmp_path / "tree.toml").write_text(tree(random_weights, extra_parent='exits = ["block6"]\n[parent.cascade]\n'
                                                                          'budget = 0.5\n'))
    assert cli.main(["run", "--config", str(tmp_path / "tree.toml"), "--data", str(small_data_dir), "--out",
                     str(tmp_path / "out"), "--quiet", "--no-download"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "budget: 0.5 MFLOPs is below the" in err[-1]
    assert "reach the first exit (exit-block6); raise the budget" in err[-1] and not (tmp_path / "out").exists()


def test_predict_on_the_runs_encodings_answers_as_the_run_measured_and_a_changed_tree_is_refused(exited, small_data_dir,
                                                                                                 tmp_path, capsys,
                                                                                                 monkeypatch):
    import shutil
    monkeypatch.setenv("BRANCHING_CACHE", str(exited / "cache"))
    out = tmp_path / "out"
    shutil.copytree(exited / "out", out)
    assert cli.main(["predict", "--models", str(out), "--data", str(small_data_dir), "--split", "test"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    config, models = load_folder(out)
    cascade = cascades.Cascade.load(out / "models", models, config.cascade)
    from branching.data.cifar import load_split
    vectors = get_kind("pretrained").encode(config.parent.shape_dict, load_split(small_data_dir, "test").images,
                                            torch.device("cpu"), progress=False)
    simulated, _, _ = cascades.simulate(TreePredictor(config, models), models, cascade, vectors)
    assert [line.split("path ")[1].split()[0] for line in lines] == [simulated.chains[f][0] for f in
                                                                     simulated.final_node]
    with pytest.raises(ConfigError, match=r"branch=exit-block3: an early exit, which routes nothing; pass "
                                          r"node=exit-block3 for it alone"):
        branching.load(out, "cpu", branch="exit-block3")
    from branching.errors import CheckpointError
    with pytest.raises(CheckpointError, match=r"was fitted for \{'risk': 0.6, 'delta': 0.2\}, and the config asks "
                                              r"\{'risk': 0.5, 'delta': 0.2\}"):
        branching.load(out, "cpu", config=parse_config(tree(models["parent"].shape["weights"], extra_parent=EXITS.replace(
            "risk = 0.6", "risk = 0.5")), "t.toml"))
    (out / "models" / "cascade.json").write_text((out / "models" / "cascade.json").read_text().replace(
        models["mammals"].fingerprint(), "0" * 16))
    with pytest.raises(CheckpointError, match=r"cascade.json was fitted on another 'mammals'.*exits=False"):
        branching.load(out, "cpu")
    assert branching.load(out, "cpu", exits=False).nodes == ("parent", "mammals")
    assert cli.main(["compare", "--config", str(exited / "tree.toml"), "--data", str(small_data_dir)]) == 2
    assert "compare does not take early exits (exit-block3, exit-block6)" in capsys.readouterr().err


def test_export_refuses_exits_and_writes_the_full_trunk_with_no_exits(exited, small_data_dir, tmp_path, capsys,
                                                                     monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("BRANCHING_CACHE", str(exited / "cache"))
    graph = tmp_path / "tree.onnx"
    assert cli.main(["export", "--models", str(exited / "out"), "--out", str(graph)]) == 2
    assert "or export it answering by its full trunk with --no-exits" in capsys.readouterr().err
    assert not graph.exists()
    assert cli.main(["export", "--models", str(exited / "out"), "--out", str(graph), "--no-exits"]) == 0
    from branching.data.cifar import load_split
    pixels = load_split(small_data_dir, "test").images[:20]
    ours = branching.load(exited / "out", "cpu", exits=False)(pixels)
    theirs = branching.load(graph)(pixels)
    same = sum((a.guess, a.path) == (b.guess, b.path) for a, b in zip(ours, theirs))
    assert same >= 18  # random weights at 32 px turn a graph's last bits into ~1e-3 (test_staged...: the same in torch)
