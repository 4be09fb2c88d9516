"""Routing through a tree: a hand-built tree with known weights, and agreement with a dense reference."""

import math

import numpy as np
import pytest
import torch
from reference import DEEP_TREE

from branching.config.parse import parse_config
from branching.data.cifar import N_PIXELS
from branching.data.normalization import Normalizer
from branching.errors import ConfigError
from branching.models.meta import NodeMeta
from branching.models.model import Model
from branching.tree.checkpoint import load_folder, script_filename
from branching.tree.routing import TreePredictor

HAND_TREE = """
parent = { classes = ["beaver", "whale", "wolf", "sunflower"], hidden = [2] }
branches.animals = { classes = ["beaver", "whale"], layer = 0, where = "post", hidden = [] }
"""


def _set(model: Model, *layers):
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    for linear, (weight, bias) in zip(linears, layers):
        linear.weight.data = torch.tensor(weight, dtype=torch.float32)
        linear.bias.data = torch.tensor(bias, dtype=torch.float32)


def hand_tree():
    """parent: h = relu(0.01 * pixels 0 and 1); logits = [ln4, ln2, 0, ln3] + [0, 0, ln5 * h1, ln6 * h0].
    animals reads h: logits = [ln3, ln9 * h1]. Thresholds: parent 0.5, animals 0.7; temperatures 1."""
    config = parse_config(HAND_TREE)
    parent = Model([N_PIXELS, 2, 4], seed=0)
    first = np.zeros((2, N_PIXELS))
    first[0, 0] = first[1, 1] = 0.01
    ln = math.log
    _set(parent, (first, [0, 0]),
         ([[0, 0], [0, 0], [0, ln(5)], [ln(6), 0]], [ln(4), ln(2), 0, ln(3)]))
    identity = Normalizer(np.zeros(N_PIXELS), np.ones(N_PIXELS))
    parent.meta = NodeMeta("parent", "parent", list(config.parent.classes), normalization=identity.to_dict(),
                           acceptance={"rule": "threshold", "threshold": 0.5, "temperature": 1.0})
    animals = Model([2, 2], seed=0)
    _set(animals, ([[0, 0], [0, ln(9)]], [ln(3), 0]))
    animals.meta = NodeMeta("branch", "animals", ["beaver", "whale"], source="parent", layer=0, where="post",
                            acceptance={"rule": "threshold", "threshold": 0.7, "temperature": 1.0})
    return config, {"parent": parent, "animals": animals}


def image(p0, p1):
    x = np.zeros(N_PIXELS, np.uint8)
    x[0], x[1] = p0, p1
    return x


def test_hand_built_tree_routes_as_computed_by_hand():
    config, models = hand_tree()
    images = np.stack([image(0, 0), image(100, 0), image(0, 100), image(0, 25)])
    # A (h = 0, 0): parent p = [.4, .2, .1, .3]; animals mass .6 >= .5 -> animals: p = [.75, .25] -> beaver .75
    # B (h = 1, 0): parent p = [4, 2, 1, 18] / 25; sunflower .72 beats animals .24: answered by the parent
    # C (h = 0, 1): parent p = [4, 2, 5, 3] / 14; animals 6/14 < .5: rejected at the parent; animals p = [.25, .75]
    # D (h = 0, .25): parent p ~ [4, 2, 5^.25, 3]; animals 6 / (9 + 5^.25) >= .5; animals p = [3, 3^.5] / (3 + 3^.5)
    expected_class = ["beaver", "sunflower", "whale", "beaver"]
    expected_conf = [0.75, 0.72, 0.75, 3 / (3 + math.sqrt(3))]
    expected_path = ["parent > animals", "parent", "parent > animals", "parent > animals"]
    expected_rejected = ["", "", "parent", "animals"]
    expected_parent = ["beaver", "sunflower", "wolf", "beaver"]
    predictor = TreePredictor(config, models)
    for batch_size in (1, 4):
        result = predictor.predict(images, batch_size=batch_size)
        assert [result.classes[i] for i in result.predicted] == expected_class
        assert result.confidence == pytest.approx(expected_conf, abs=1e-6)
        assert [result.path(i) for i in range(4)] == expected_path
        assert [result.rejected_level(i) for i in range(4)] == expected_rejected
        # the confidence where each rejected image was stopped: C's animals mass 6/14, D's .634 at animals
        assert result.rejected_confidence[2:] == pytest.approx([6 / 14, 3 / (3 + math.sqrt(3))], abs=1e-6)
        assert np.isnan(result.rejected_confidence[:2]).all()
        assert result.accepted.tolist() == [True, True, False, False]
        assert [result.classes[i] for i in result.parent_predicted] == expected_parent
        assert result.reached() == {"parent": 4, "animals": 3}


def test_threshold_none_accepts_nothing_and_bad_shapes_are_errors():
    config, models = hand_tree()
    models["animals"].meta.acceptance["threshold"] = None
    result = TreePredictor(config, models).predict(np.stack([image(0, 0), image(100, 0)]))
    assert result.rejected_level(0) == "animals" and result.accepted[1]
    with pytest.raises(ConfigError, match="shape"):
        TreePredictor(config, models).predict(np.zeros((2, 10)))


def test_read_only_and_strided_inputs_give_the_same_answers():
    config, models = hand_tree()
    images = np.stack([image(0, 0), image(100, 0), image(0, 100), image(0, 25)])
    predictor = TreePredictor(config, models)
    expected = predictor.predict(images).predicted
    frozen = images.copy()
    frozen.flags.writeable = False
    assert np.array_equal(predictor.predict(frozen, batch_size=3).predicted, expected)
    assert np.array_equal(predictor.predict(images[::-1].astype(np.float64), batch_size=2).predicted, expected[::-1])


def _random_deep_tree(tmp_path):
    """A three-level tree with random weights, mixed pre/post taps and fitted-looking rules, saved to disk."""
    from branching.tree.checkpoint import ModelStore

    config = parse_config(DEEP_TREE)
    rng = np.random.default_rng(0)
    norm = Normalizer(rng.uniform(100, 150, N_PIXELS), rng.uniform(40, 70, N_PIXELS))
    store = ModelStore(tmp_path)
    models = {}
    for i, spec in enumerate(config.nodes()):
        width = N_PIXELS if spec.source is None else models[spec.source].width(spec.layer)
        model = Model([width, *spec.hidden, len(spec.classes)], dropout=0.2, seed=i)
        for p in model.net.parameters():
            p.data.mul_(3.0)  # confident enough that routing varies
        if spec.source is None:
            meta = NodeMeta("parent", spec.name, list(spec.classes), list(spec.hidden), normalization=norm.to_dict(),
                            acceptance={"rule": None, "threshold": 0.96, "temperature": 1.3})
        else:
            meta = NodeMeta("branch", spec.name, list(spec.classes), list(spec.hidden), source=spec.source,
                        layer=spec.layer, where=spec.where,
                        source_fingerprint=models[spec.source].fingerprint(),
                        parent_fingerprint=models["parent"].fingerprint(),
                        acceptance={"rule": "threshold", "threshold": 0.6 + 0.1 * i, "temperature": 0.5 + i / 4})
        store.save(spec.name, model, meta)
        models[spec.name] = store.load(spec.name)
    return config, models, norm


def _reference(config, models, norm, images):
    """Dense, image by image: every node's softmax through torchly, routing decided in numpy."""
    from branching.models.forward import node_inputs

    X = norm.transform(images)
    probs = {}
    for spec in config.nodes():
        meta = models[spec.name].meta
        t = meta.acceptance["temperature"]
        probs[spec.name] = models[spec.name].predict_proba(node_inputs(models, spec.name, X), temperature=t)
    thresholds = {s.name: (models[s.name].meta.acceptance or {}).get("threshold", 0.96) for s in config.nodes()}
    out = []
    for i in range(len(images)):
        node, path, rejected = "parent", ["parent"], ""
        while True:
            spec, p = config.node(node), probs[node][i].astype(np.float64)
            options = [(sum(p[spec.classes.index(c)] for c in child.classes), child.name)
                       for child in config.children(node)]
            covered = {c for child in config.children(node) for c in child.classes}
            options += [(p[k], c) for k, c in enumerate(spec.classes) if c not in covered]
            mass, choice = max(options, key=lambda o: o[0])
            if not rejected and mass < thresholds[node]:
                rejected = node
            if choice in config.branches and config.node(choice).source == node:
                node = choice
                path.append(node)
                continue
            out.append((choice, mass, " > ".join(path), rejected))
            break
    return out


def test_deep_tree_matches_a_dense_reference_and_loads_from_its_folder(tmp_path):
    config, models, norm = _random_deep_tree(tmp_path)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (300, N_PIXELS), dtype=np.uint8)
    expected = _reference(config, models, norm, images)
    paths = {e[2] for e in expected}
    assert {"parent > animals > water", "parent > plants"} <= paths  # the tree is exercised
    loaded_config, _ = load_folder(tmp_path)  # the tree rebuilt from the files alone
    assert {n.name: n for n in loaded_config.nodes()} == {n.name: n for n in config.nodes()}
    scripts = tmp_path / "scripts" / "models"  # the original scripts' file names, found from a run-like folder
    scripts.mkdir(parents=True)
    for name in ("parent", "animals", "water", "plants"):
        (scripts / script_filename(name)).write_bytes((tmp_path / f"{name}.pt").read_bytes())
    assert {n.name for n in load_folder(scripts.parent)[0].nodes()} == {"parent", "animals", "water", "plants"}
    for predictor in (TreePredictor(config, models), TreePredictor.load(tmp_path)):
        for batch_size in (1, 7, 1024):
            result = predictor.predict(images, batch_size=batch_size)
            got = [(result.classes[p], result.path(i), result.rejected_level(i))
                   for i, p in enumerate(result.predicted)]
            assert got == [(c, path, r) for c, _, path, r in expected]
            assert result.confidence == pytest.approx([e[1] for e in expected], abs=1e-4)
