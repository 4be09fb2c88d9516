"""Early exits: the config's checks, the trunk run tap by tap (the same columns as encode, rows dropped between
taps), the cascade's fit against scipy's binomial, a tree answering at its exits at any batch size as the
one-at-a-time run and the simulation on full encodings do, branches below an exit against the exit and its branches
run by hand, compare over seeds against run, and the exported graph against the PyTorch cascade."""

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
    outputs = cascades.ExitOutputs.empty(k, n, 3)
    outputs.gate[:], outputs.predicted[:] = confidence, predicted
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


def simulate(config, models, cascade, vectors):
    return cascades.simulate(TreePredictor(config, models), cascades.exit_routes(config, models, cascade.exits),
                             cascade, vectors)


BELOW = ('[branches.x]\nclasses = ["beaver", "whale"]\nfrom = "exit-block3"\nlayer = 0\nhidden = [8]\n'
         '[branches.x.accept]\nrule = "coverage"\ncoverage = 0.7\n')


def test_exits_need_a_staged_trunk_and_routing_keeps_an_exits_subtree_only_from_inside_it(random_weights):
    mlp = '[parent]\nclasses = ["a", "b"]\nexits = ["hidden0"]\n[parent.cascade]\nrisk = 0.1\n'
    with pytest.raises(ConfigError, match=r'exits need a frozen trunk that runs tap by tap, which the parent '
                                          r'\(kind mlp\) is not; use kind = "pretrained" or "text"'):
        parse_config(mlp, "t.toml")
    judged = tree(random_weights, extra_parent=EXITS) + BELOW + '[branches.x.selfeval]\nlayer = -1\n'
    with pytest.raises(ConfigError, match=r"\[branches.x.selfeval\]: 'x' is below an exit, which answers before"):
        parse_config(judged, "t.toml")
    scored = tree(random_weights, extra_parent='[parent.cascade]\nrisk = 0.1\n') + (
        '[branches.e]\nclasses = ["beaver", "whale"]\nlayer = "block3"\nexit = true\n[branches.e.accept]\n'
        'score = "margin"\n')  # the exit's own message, not the margin's missing threshold
    with pytest.raises(ConfigError, match=r"\[branches.e.accept\] score: the cascade's threshold reads an exit's "
                                          r"calibrated max softmax, not 'margin'; remove score"):
        parse_config(scored, "t.toml")
    fresh = tree(random_weights, extra_parent=EXITS) + BELOW.replace('"whale"]', '"otter"]\nnew_classes = true')
    with pytest.raises(ConfigError, match=r"\[branches.x\] new_classes: 'x' is below an exit, which answers with the "
                                          r"parent's classes"):
        parse_config(fresh, "t.toml")
    config = parse_config(tree(random_weights, extra_parent=EXITS) + BELOW, "t.toml")
    assert [e.name for e in config.exits()] == ["exit-block3", "exit-block6"]
    assert [n.name for n in config.routed().nodes()] == ["parent", "mammals"]  # routing never reaches an exit
    assert [n.name for n in config.routed("x").nodes()] == ["parent", "mammals", "exit-block3", "x"]
    assert [c.name for c in config.children("exit-block3")] == ["x"] and config.exit_of("x") == "exit-block3"
    assert config.exit_of("mammals") is None and [c.name for c in config.children("parent")] == ["mammals"]


def trained(root, toml: str, data):
    """`root`/out: the tree `toml` run for 3 epochs on `data` (its cache in `root`/cache)."""
    (root / "tree.toml").write_text(toml)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("BRANCHING_CACHE", str(root / "cache"))
        assert cli.main(["run", "--config", str(root / "tree.toml"), "--data", str(data), "--out",
                         str(root / "out"), "--max-epochs", "3", "--quiet", "--no-download", "--no-report"]) == 0
    return root


@pytest.fixture(scope="module")
def exited(tmp_path_factory, random_weights, small_data_dir):
    return trained(tmp_path_factory.mktemp("exits-run"), tree(random_weights, extra_parent=EXITS), small_data_dir)


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
        cascades.exit_routes(config, models, cascade.exits),
        np.asarray(load_tree_data(config, small_data_dir).test.images[:40], np.float32), list(config.classes())).gate,
        0.6))
    cascade.save(exited / "out" / "models")
    tree = branching.load(exited / "out", "cpu")
    from branching.data.cifar import load_split
    pixels = load_split(small_data_dir, "test").images[:40]
    ran = []
    original = ImageStages.advance

    def counting(self, depth):  # which rows each block runs on
        ran.append((self.done, depth, len(self.state)))
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
    simulated, _, _ = simulate(config, models, cascade, vectors)
    assert [(simulated.chains[f][-1], simulated.rejected_level(i) or None) for i, f in enumerate(simulated.final_node)] \
        == [(a.node, a.rejected_at) for a in together]
    np.testing.assert_allclose(simulated.confidence, [a.score for a in together], atol=1e-5)
    assert all(a.path[0] == "parent" for a in full_together) and tree.nodes[-2:] == ("exit-block3", "exit-block6")


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
    simulated, _, _ = simulate(config, models, cascade, vectors)
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
    assert "exit-block3" not in parse_config(tree(models["parent"].shape["weights"], extra_parent=EXITS) + BELOW,
                                             "t.toml").without_exits().branches


def test_export_writes_a_graph_that_stops_its_trunk_where_an_exit_answers_and_no_exits_the_full_trunk(
        exited, below, small_data_dir, tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    import onnx
    monkeypatch.setenv("BRANCHING_CACHE", str(exited / "cache"))
    from branching.data.cifar import load_split
    pixels = load_split(small_data_dir, "test").images[:40]
    graph = tmp_path / "tree.onnx"
    config, models = load_folder(exited / "out")
    cascade = cascades.Cascade.load(exited / "out" / "models", models)
    cascade.threshold = float(np.quantile(cascades.exit_outputs(  # a threshold at which some leave at each exit
        cascades.exit_routes(config, models, cascade.exits), get_kind("pretrained").encode(
            config.parent.shape_dict, pixels, torch.device("cpu"), progress=False), list(config.classes())).gate, 0.6))
    cascade.save(exited / "out" / "models")
    assert cli.main(["export", "--models", str(exited / "out"), "--out", str(graph)]) == 0
    assert "outputs rows.<exit> and logits.<exit> for exit-block3, exit-block6" in capsys.readouterr().out
    ops = {node.op_type for node in onnx.load(str(graph)).graph.node}
    assert {"NonZero", "Gather"} <= ops  # the rows that go on are gathered in the graph
    ours = branching.load(exited / "out", "cpu")(pixels)
    theirs = branching.load(graph)
    assert theirs.nodes == ("parent", "mammals", "exit-block3", "exit-block6")
    assert theirs.cascade == branching.load(exited / "out", "cpu").cascade == {
        "exits": ["exit-block3", "exit-block6"], "threshold": cascade.threshold, "rule": cascade.describe()}
    assert branching.load(exited / "out", "cpu", exits=False).cascade is None
    paths = {a.path for a in ours}
    assert {("exit-block3",), ("exit-block6",)} <= paths and any(p[0] == "parent" for p in paths)
    for size in (40, 7, 1):  # every batch size answers as the PyTorch cascade (random weights: but at its threshold)
        found = [b for i in range(0, 40, size) for b in theirs(pixels[i:i + size])]
        assert sum((a.label, a.path) == (b.label, b.path) for a, b in zip(ours, found)) >= 38
    full = tmp_path / "full.onnx"
    assert cli.main(["export", "--models", str(exited / "out"), "--out", str(full), "--no-exits"]) == 0
    by_trunk = branching.load(exited / "out", "cpu", exits=False)(pixels[:20])
    same = sum((a.guess, a.path) == (b.guess, b.path) for a, b in zip(by_trunk, branching.load(full)(pixels[:20])))
    assert same >= 18  # random weights at 32 px turn a graph's last bits into ~1e-3 (test_staged...: the same in torch)
    refused = tmp_path / "below.onnx"
    monkeypatch.setenv("BRANCHING_CACHE", str(below / "cache"))
    _, below_models = load_folder(below / "out")
    answering = cascades.Cascade.load(below / "out" / "models", below_models)
    answering.threshold = 0.5  # exits that answer (with none, the graph is the full trunk's)
    answering.save(below / "out" / "models")
    assert cli.main(["export", "--models", str(below / "out"), "--out", str(refused)]) == 2
    assert "exit-block3 routes to branches below it, whose answers decide whether it answers" in capsys.readouterr().err and not refused.exists()


@pytest.fixture(scope="module")
def below(tmp_path_factory, random_weights, small_data_dir):
    y = BELOW.replace("es.x", "es.y").replace('"beaver", "whale"', '"wolf", "sunflower"')
    return trained(tmp_path_factory.mktemp("exits-below"), tree(random_weights, extra_parent=EXITS) + BELOW + y,
                   small_data_dir)


def _softmax(z):
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_branches_below_an_exit_answer_with_it_and_what_they_reject_goes_on_along_the_trunk(below, small_data_dir,
                                                                                             monkeypatch):
    from branching.acceptance.rule import Acceptance
    from branching.data.cifar import load_split
    from branching.data.tree_data import load_tree_data
    from branching.models.forward import node_input
    monkeypatch.setenv("BRANCHING_CACHE", str(below / "cache"))
    config, models = load_folder(below / "out")
    classes = list(config.classes())
    data = load_tree_data(config, small_data_dir)
    vectors = np.concatenate([np.asarray(data.train.images, np.float32), np.asarray(data.test.images, np.float32)])
    exits = cascades.exit_routes(config, models, ("exit-block3", "exit-block6"))
    # by hand: the exit's probabilities at its temperature massed into x's and y's groups, and their answers
    X = torch.from_numpy(exits[0].predictor.root.normalizer.transform(vectors))

    def probabilities(name):
        m = models[name]
        return _softmax(m.logits(node_input(models, name, X).detach().numpy()) / Acceptance.of(m.meta).temperature)

    e, kids = models["exit-block3"], [models["x"], models["y"]]
    p = probabilities("exit-block3")
    mass = np.column_stack([p[:, [e.meta.classes.index(c) for c in k.meta.classes]].sum(axis=1) for k in kids])
    to = mass.argmax(axis=1)
    q = [probabilities("x"), probabilities("y")]
    sure = np.where(to == 0, q[0].max(axis=1), q[1].max(axis=1))
    assert 0 < to.sum() < len(to)
    thresholds = np.array([np.median(sure[to == g]) for g in (0, 1)], np.float32)
    for name, t in zip(("x", "y"), thresholds):
        next(n for n in exits[0].predictor.nodes if n.name == name).threshold = t
    out = cascades.exit_outputs(exits, vectors, classes)
    rejected = sure < thresholds[to]
    np.testing.assert_allclose(out.gate[0], np.where(rejected, -np.inf, mass.max(axis=1)), rtol=1e-5)
    answer = [classes.index(kids[g].meta.classes[int(q[g][i].argmax())]) for i, g in enumerate(to)]
    assert out.predicted[0].tolist() == answer
    assert [out.chains[f] for f in out.final[0]] == [("exit-block3", "xy"[g]) for g in to]
    flops = [2 * sum(a * b for a, b in zip(m.architecture, m.architecture[1:])) for m in (e, *kids, models["exit-block6"])]
    np.testing.assert_array_equal(out.below[0], np.array(flops[1:3])[to])
    assert (out.below[1] == 0).all() and np.isfinite(out.gate[1]).all()  # exit-block6 has no branch below
    costs = cascades.input_costs(models, out, ("exit-block3", "exit-block6"), np.zeros((1, 20)), 16,
                                 [("parent",)] * len(to))
    np.testing.assert_allclose(costs.at_exit[:, 0], flops[0] + out.below[0])
    np.testing.assert_allclose(costs.heads, flops[0] + flops[3] + out.below[0])
    # the staged tree answers as the simulation, and through x where x accepts
    cascade = cascades.Cascade.load(below / "out" / "models", models)
    cascade.threshold = float(np.quantile(out.gate[0][np.isfinite(out.gate[0])], 0.3))
    cascade.save(below / "out" / "models")
    pixels = load_split(small_data_dir, "test").images[:80]
    answers = branching.load(below / "out", "cpu")(pixels)
    encoded = get_kind("pretrained").encode(config.parent.shape_dict, pixels, torch.device("cpu"), progress=False)
    simulated, _, _ = simulate(config, models, cascade, encoded)
    assert [(simulated.chains[f][-1], simulated.rejected_level(i) or None) for i, f in enumerate(simulated.final_node)] \
        == [(a.node, a.rejected_at) for a in answers]
    np.testing.assert_allclose(simulated.confidence, [a.score for a in answers], atol=1e-5)
    assert {("exit-block3", "x"), ("exit-block3", "y")} <= {a.path for a in answers}


def test_compare_measures_the_cascade_against_the_full_trunk_and_each_exit_alone_over_seeds(random_weights,
                                                                                          small_data_dir, tmp_path,
                                                                                          capsys, monkeypatch):
    monkeypatch.setenv("BRANCHING_CACHE", str(tmp_path / "cache"))
    (tmp_path / "tree.toml").write_text(tree(random_weights, extra_parent=EXITS).split("[branches.mammals]")[0])
    common = ["--config", str(tmp_path / "tree.toml"), "--data", str(small_data_dir), "--max-epochs", "2", "--quiet",
              "--no-download"]
    assert cli.main(["compare", *common, "--out", str(tmp_path / "k"), "--kshot", "5"]) == 2
    assert "--kshot trains the branches' methods" in capsys.readouterr().err and not (tmp_path / "k").exists()
    assert cli.main(["compare", *common, "--out", str(tmp_path / "cmp"), "--seeds", "0,1"]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    rows = result["exits"]["rows"]
    assert list(rows) == ["cascade", "full_trunk", "exit-block3", "exit-block6"] and result["summary"]["branches"] == {}
    assert cli.main(["run", *common, "--out", str(tmp_path / "run"), "--seed", "1", "--no-report"]) == 0
    alone = json.loads((tmp_path / "run" / "metrics.json").read_text())["cascade"]  # the same tree trained by run
    assert rows["cascade"]["accuracy"]["values"][1] == alone["cascade"]["accuracy"]
    assert rows["exit-block6"]["mflops"]["values"][1] == alone["single_exit"]["exit-block6"]["mflops"]
    full = rows["full_trunk"]["accuracy"]["values"]
    assert rows["cascade"]["accuracy_vs_full"]["values"] == [a - b for a, b in zip(rows["cascade"]["accuracy"]["values"],
                                                                                   full)]
    assert rows["cascade"]["accuracy"]["mean"] == pytest.approx(np.mean(rows["cascade"]["accuracy"]["values"]))
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## Early exits" in md and "exit-block3 alone" in md and (tmp_path / "cmp" / "compare.png").stat().st_size


def test_a_text_tree_answers_at_its_exits_as_the_simulation_and_its_exported_graph_at_any_batch_size(tiny_bert,
                                                                                                   tmp_path,
                                                                                                   monkeypatch):
    pytest.importorskip("onnxruntime")
    from test_text import tree as text_tree
    from test_text import write_texts
    from branching.api.export import export
    monkeypatch.setenv("BRANCHING_CACHE", str(tmp_path / "cache"))
    data = write_texts(tmp_path / "texts")
    (tmp_path / "tree.toml").write_text(text_tree(tiny_bert, parent_extra='classes = ["negative", "positive"]\n'
                                                  'exits = ["embeddings", "layer1"]\n[parent.cascade]\nrisk = 0.6\n'))
    assert cli.main(["run", "--config", str(tmp_path / "tree.toml"), "--data", str(data), "--out", str(tmp_path / "out"),
                     "--quiet", "--max-epochs", "5", "--no-report"]) == 0
    config, models = load_folder(tmp_path / "out")
    texts = [row.split('",')[0].strip('"') for row in (data / "test.csv").read_text().splitlines()[1:]]
    vectors = get_kind("text").encode(config.parent.shape_dict, texts, torch.device("cpu"), progress=False)
    from branching.api.cascade_graph import CascadeGraph
    from branching.api.export import DenseTree
    predictor = branching.load(tmp_path / "out", "cpu").predictor
    graph = CascadeGraph(predictor, DenseTree(predictor, None))  # what export traces, on export's example inputs
    example = graph.stages.run(graph.stages.begin(torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long)),
                               0, graph.taps[0] + 1)[1]
    scaled = graph._exit_logits(graph.exits[0], graph._vectors([example])) * graph.inverse_temperature[0]
    traced = float(torch.softmax(scaled, dim=1).amax(dim=1).min().detach())
    for quantile in (0.5, 0.0, None):  # some leave at each exit; all at the first; the trace's example at the first
        cascade = cascades.Cascade.load(tmp_path / "out" / "models", models)
        gates = np.unique(cascades.exit_outputs(cascades.exit_routes(config, models, cascade.exits), vectors,
                                                list(config.classes())).gate)
        i = int((quantile or 0) * len(gates))  # a threshold between two gates: no input sits at it
        cascade.threshold = float((gates[i - 1] + gates[i]) / 2) if i else 0.0
        if quantile is None:  # the example leaves whole at the first exit while texts go on past the second
            cascade.threshold = float((gates[gates < traced].max() + traced) / 2)
        cascade.save(tmp_path / "out" / "models")
        ours = branching.load(tmp_path / "out", "cpu")
        found = ours(texts)
        simulated, _, _ = simulate(config, models, cascade, vectors)
        assert [a.path[0] for a in found] == [simulated.chains[f][0] for f in simulated.final_node]
        np.testing.assert_allclose([a.score for a in found], simulated.confidence, atol=1e-5)
        graph = tmp_path / f"tree-{quantile}.onnx"
        export(ours, graph)
        theirs = branching.load(graph)
        for size in (len(texts), 3, 1):  # a batch that leaves whole at the first exit: the stand-in row
            answers = [b for i in range(0, len(texts), size) for b in theirs(texts[i:i + size])]
            assert [(a.label, a.path) for a in answers] == [(a.label, a.path) for a in found]
        left = {a.path[0] for a in found}
        assert left == {"exit-embeddings"} if quantile == 0.0 else len(left) >= 2
        assert quantile is not None or "parent" in left  # some texts go on past both exits


@pytest.mark.parametrize("name, exits", [
    ("cifar100-6-exits.toml", ["exit-block5", "exit-block10"]),
    ("cifar100-6-exits-early.toml", ["exit-block3", "exit-block5", "exit-block10"]),
    ("cifar100-6-exits-below.toml", ["exit-block5", "exit-block10"]),
    ("rt-exits.toml", ["exit-layer1", "exit-layer3"]),
    ("rt-exits-selective.toml", ["exit-layer1", "exit-layer3"]),
])
def test_the_shipped_exit_configs_load(name, exits):
    from pathlib import Path

    from branching.config.parse import load_config
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert [e.name for e in config.exits()] == exits and config.cascade is not None
    below = [c.name for c in config.children("exit-block10")] if "exit-block10" in exits else []
    assert below == (["early-mammals", "early-plants"] if "below" in name else [])
