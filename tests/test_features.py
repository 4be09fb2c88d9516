"""Multi-layer extraction and the activation cache (manifest checks, rebuilds, flips)."""

import json

import numpy as np
import pytest
import torch

from branching.data.cifar import N_PIXELS
from branching.data.normalization import Normalizer
from branching.models.batches import Augment, DeviceInputs
from branching.models.meta import NodeMeta
from branching.models.forward import extract, mirror_all
from branching.models.model import Model
from branching.train.features import FeatureCache, branch_inputs

DATA = {"dir": "/somewhere", "train_sha256": "aa", "test_sha256": "bb", "meta_sha256": "cc"}


def tiny_tree(seed=0):
    """parent [3072 -> 16 -> 8 -> 4]; "a" [8 -> 6 -> 5 -> 2] reads parent layer 1 (pre); "b", a's layer 0 (post)."""
    rng = np.random.default_rng(seed)
    norm = Normalizer(rng.uniform(100, 150, N_PIXELS), rng.uniform(40, 70, N_PIXELS))
    parent = Model([N_PIXELS, 16, 8, 4], dropout=0.3, seed=seed)
    parent.meta = NodeMeta("parent", "parent", normalization=norm.to_dict())
    a = Model([8, 6, 5, 2], seed=seed + 1)
    a.meta = NodeMeta("branch", "a", source="parent", layer=1, where="pre")
    b = Model([6, 3, 2], seed=seed + 2)
    b.meta = NodeMeta("branch", "b", source="a", layer=0, where="post")
    return {"parent": parent, "a": a, "b": b}, norm


def manual_hidden(model: Model, x: np.ndarray, layer: int, where: str) -> np.ndarray:
    """Hidden layer by hand from the weights (ReLU), independent of the library's forward code."""
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    h = x.astype(np.float64)
    for i, linear in enumerate(linears[:layer + 1]):
        h = h @ linear.weight.detach().numpy().T.astype(np.float64) + linear.bias.detach().numpy()
        if i < layer or where == "post":
            h = np.maximum(h, 0)
    return h


def test_extract_computes_several_layers_in_one_pass_like_a_manual_forward():
    models, norm = tiny_tree()
    X = norm.transform(np.random.default_rng(3).integers(0, 256, (50, N_PIXELS)))
    requests = [("parent", 0, "post"), ("parent", 1, "pre"), ("a", -2, "post"), ("a", 1, "pre")]
    got = extract(models, requests, X, batch_size=16)
    p1 = manual_hidden(models["parent"], X, 1, "pre")
    expected = [manual_hidden(models["parent"], X, 0, "post"), p1,
                manual_hidden(models["a"], p1, 0, "post"), manual_hidden(models["a"], p1, 1, "pre")]
    for g, e in zip(got, expected):
        assert g.dtype == np.float32 and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
    assert extract(models, requests, X[:0])[3].shape == (0, 5)


def test_cache_reuses_only_an_exact_match_and_rebuilds_otherwise(tmp_path):
    models, norm = tiny_tree()
    X = norm.transform(np.random.default_rng(4).integers(0, 256, (30, N_PIXELS)))
    rows = np.arange(100, 130)
    messages = []
    cache = FeatureCache(tmp_path, messages.append)
    first = cache.features(models, ("a", 0, "post"), X, rows, DATA, flips=True)
    assert messages[-1].endswith("built (30 inputs, plain, flipped)")
    expected = manual_hidden(models["a"], manual_hidden(models["parent"], X, 1, "pre"), 0, "post")
    np.testing.assert_allclose(first["plain"], expected, rtol=1e-4, atol=1e-4)
    entry = cache.entry(cache.manifest(models, ("a", 0, "post"), rows, DATA, ("plain", "flipped")))
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["chain"] == {"parent": models["parent"].fingerprint(), "a": models["a"].fingerprint()}
    assert manifest["where"] == "post" and manifest["dtype"] == "float32" and manifest["rows"]["count"] == 30

    again = cache.features(models, ("a", 0, "post"), X, rows, {**DATA, "dir": "/moved"}, flips=True)
    assert messages[-1].endswith("reusing")
    assert np.array_equal(again["plain"], first["plain"]) and np.array_equal(again["flipped"], first["flipped"])

    # anything the features depend on changes -> rebuilt (and the new values are right)
    other, _ = tiny_tree(seed=7)
    changed = {**models, "parent": other["parent"]}
    rebuilt = cache.features(changed, ("a", 0, "post"), X, rows, DATA, flips=True)
    assert "parent_fingerprint changed; rebuilding" in messages[-2] and "chain" in messages[-2]
    assert not np.allclose(rebuilt["plain"], first["plain"])
    cache.features(models, ("a", 0, "post"), X, rows, DATA, flips=True)
    assert "rebuilding" in messages[-2]
    cache.features(models, ("a", 0, "post"), X, rows, {**DATA, "train_sha256": "zz"}, flips=True)
    assert "data changed; rebuilding" in messages[-2]

    cache.features(models, ("a", 0, "post"), X, rows, DATA, flips=True)
    stored = json.loads((entry / "manifest.json").read_text())
    stored["dtype"] = "float16"
    (entry / "manifest.json").write_text(json.dumps(stored))
    cache.features(models, ("a", 0, "post"), X, rows, DATA, flips=True)
    assert "dtype changed; rebuilding" in messages[-2]

    data = bytearray((entry / "plain.npy").read_bytes())
    data[-1] ^= 0xFF
    (entry / "plain.npy").write_bytes(bytes(data))
    healed = cache.features(models, ("a", 0, "post"), X, rows, DATA, flips=True)
    assert "plain.npy is missing or altered; rebuilding" in messages[-2]
    np.testing.assert_array_equal(healed["plain"], first["plain"])

    (entry / "manifest.json").write_text("{not json")
    cache.features(models, ("a", 0, "post"), X, rows, DATA, flips=True)
    assert "unreadable manifest; rebuilding" in messages[-2]


def test_cached_training_inputs_match_flipping_on_the_fly(tmp_path):
    models, norm = tiny_tree()
    pixels = np.random.default_rng(5).integers(0, 256, (40, N_PIXELS))
    X = norm.transform(pixels)
    rows, train_idx, val_idx = np.arange(40), np.arange(0, 40, 2), np.arange(1, 40, 2)
    train_X, transform, features_val = branch_inputs(FeatureCache(tmp_path), models, DATA, ("parent", 1, "pre"), X,
                                                     rows, train_idx, val_idx, flips=True)
    np.testing.assert_allclose(features_val, manual_hidden(models["parent"], X[val_idx], 1, "pre"), atol=1e-4)
    picked = torch.tensor([3, 0, 7, 7, 12])
    got = transform.batch(DeviceInputs(train_X, torch.device("cpu")), picked, torch.Generator().manual_seed(11))
    images = DeviceInputs(X[train_idx], torch.device("cpu"))
    with torch.no_grad():  # the same coins, the images mirrored, then the trunk
        on_the_fly = Augment(flip=True, normalizer=norm, then=lambda x: models["parent"].hidden_forward(x, 1, "pre"))
        on_the_fly = on_the_fly.batch(images, picked, torch.Generator().manual_seed(11))
    np.testing.assert_allclose(got.numpy(), on_the_fly.numpy(), rtol=1e-4, atol=1e-4)
    # mirror_all mirrors every image: twice is the identity
    np.testing.assert_allclose(mirror_all(mirror_all(X[:3], norm), norm), X[:3], atol=1e-4)
    mirrored = pixels[:2].reshape(2, 3, 32, 32)[..., ::-1].reshape(2, -1)  # columns reversed in each channel
    np.testing.assert_allclose(mirror_all(X[:2], norm), norm.transform(mirrored), atol=1e-4)
    no_flip_X, none, _ = branch_inputs(FeatureCache(tmp_path), models, DATA, ("parent", 1, "pre"), X, rows,
                                       train_idx, val_idx, flips=False)
    assert none is None and no_flip_X.shape == (20, 8)


@pytest.mark.parametrize("flip", [False, True])
def test_run_with_a_cache_reuses_it_on_the_same_parent(tmp_path, flip, monkeypatch):
    """Two branch trainings on the same parent: the second reuses the first's activations."""
    from dataclasses import replace

    from synthetic import make_synthetic

    from branching.config.parse import parse_config
    from branching.config.recipes import get_recipe
    from branching.data.tree_data import load_tree_data
    from branching.train.nodes import train_branch, train_parent

    data_dir = make_synthetic(tmp_path / "data", ["beaver", "whale", "wolf", "sunflower"], n_train=20, n_test=5)
    config = parse_config('[parent]\nclasses = ["beaver", "whale", "wolf", "sunflower"]\nhidden = [32, 16]\n'
                          '[branches.animals]\nclasses = ["beaver", "whale"]\nlayer = 1\nhidden = [8]\n')
    recipe = get_recipe("default", 1)
    recipe = replace(recipe, branch=replace(recipe.branch, flip=flip))
    data = load_tree_data(config, data_dir)
    parent, meta, _ = train_parent(config, data, recipe, 0, progress=False)
    parent.meta = meta
    logged = []
    monkeypatch.setattr("branching.train.nodes.log", logged.append)
    for _ in range(2):
        train_branch(config, "animals", {"parent": parent}, data, recipe, 0, progress=False, cache_dir=tmp_path / "c")
    cache_lines = [m for m in logged if m.startswith("feature cache")]
    assert cache_lines[0].endswith("built (40 inputs, plain" + (", flipped)" if flip else ")"))
    assert cache_lines[1].endswith("reusing")
