"""Tests for torchly.Model, checked against independent references (numpy forward passes, scipy)."""
import os

import numpy as np
import pytest
import scipy.special
import torch

import torchly
from branching.models.checks import as_2d_float
from branching.models.meta import NodeMeta
from branching.models.model import Model

NUMPY_ACTIVATIONS = {
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "gelu": lambda z: 0.5 * z * (1.0 + scipy.special.erf(z / np.sqrt(2.0))),
    "sigmoid": scipy.special.expit,
    "leaky_relu": lambda z: np.where(z > 0, z, 0.01 * z),
}


pytestmark = pytest.mark.usefixtures("single_thread")


def numpy_hidden(model, X, layer, where):
    """Reference forward pass in float64 from the Linear weights alone."""
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    act = NUMPY_ACTIVATIONS[model.activation]
    h = np.asarray(X, dtype=np.float64)
    for i, linear in enumerate(linears[: layer + 1]):
        z = h @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
        if i == layer and where == "pre":
            return z
        h = act(z)
    return h


def blobs(n=240, dim=5, classes=3, seed=0, spread=0.3):
    """A separable synthetic problem: Gaussian blobs around well-separated centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 3.0
    y = rng.integers(0, classes, size=n)
    X = (centres[y] + spread * rng.normal(size=(n, dim))).astype(np.float32)
    return X, y


# ---- activations -------------------------------------------------------------------------------

@pytest.mark.parametrize("architecture, activation", [
    ([5, 7, 3], "relu"),
    ([6, 8, 5, 4], "tanh"),
    ([3, 4, 6, 5, 2], "gelu"),
    ([5, 9, 3], "sigmoid"),
    ([6, 8, 5, 4], "leaky_relu"),
])
def test_get_activations_match_numpy_forward(architecture, activation):
    model = Model(architecture, activation=activation, seed=1)
    X = np.random.default_rng(0).normal(size=(11, architecture[0])).astype(np.float32)
    for layer in range(model.n_hidden):
        for where in ("pre", "post"):
            got = model.get_activations(X, layer=layer, where=where, batch_size=4)
            assert got.dtype == np.float32 and got.shape == (11, architecture[layer + 1])
            np.testing.assert_allclose(got, numpy_hidden(model, X, layer, where), rtol=1e-5, atol=1e-6)
            negative = layer - model.n_hidden
            np.testing.assert_array_equal(model.get_activations(X, layer=negative, where=where, batch_size=4), got)
        assert model.width(layer) == architecture[layer + 1]


def test_get_activations_compute_only_needed_layers():
    model = Model([4, 6, 5, 3, 2], seed=0)
    linears = [m for m in model.net if isinstance(m, torch.nn.Linear)]
    called = []
    for i, linear in enumerate(linears):
        linear.register_forward_hook(lambda module, inputs, output, i=i: called.append(i))
    model.get_activations(np.zeros((3, 4)), layer=0, where="post")
    assert called == [0]
    called.clear()
    model.get_activations(np.zeros((3, 4)), layer=1, where="pre")
    assert called == [0, 1]


def test_get_activations_use_eval_mode_and_restore_previous_mode():
    model = Model([5, 16, 16, 3], dropout=0.9, seed=0)
    X = np.random.default_rng(1).normal(size=(20, 5))
    model.net.train()
    first = model.get_activations(X, layer=1)
    second = model.get_activations(X, layer=1)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, numpy_hidden(model, X, 1, "post"), rtol=1e-5, atol=1e-6)
    assert model.net.training  # documented: the previous mode is restored
    model.net.eval()
    model.get_activations(X)
    assert not model.net.training


def test_hidden_forward_keeps_gradients_and_mode():
    model = Model([4, 6, 3], seed=0)
    model.net.train()
    x = torch.randn(2, 4)
    out = model.hidden_forward(x, 0, where="pre")
    assert out.requires_grad and model.net.training
    np.testing.assert_allclose(out.detach().numpy(), numpy_hidden(model, x.numpy(), 0, "pre"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropout", [None, 0.2])
def test_feature_info_and_forward_intermediates_agree_with_hooks_and_a_plain_forward(dropout):
    model = Model([5, 7, 6, 4, 3], activation="tanh", dropout=dropout, seed=1)
    info = model.feature_info
    assert [(i["layer"], i["where"], i["shape"][0]) for i in info] == [
        (0, "pre", 7), (0, "post", 7), (1, "pre", 6), (1, "post", 6), (2, "pre", 4), (2, "post", 4)]
    assert len({i["name"] for i in info}) == len(info)
    x = torch.randn(8, 5)
    caught = {}
    hooks = [model.net.get_submodule(i["module"]).register_forward_hook(
        lambda module, inputs, output, name=i["name"]: caught.__setitem__(name, output)) for i in info]
    with torch.no_grad():
        logits = model.net(x)
    for h in hooks:
        h.remove()
    taps = [(i["layer"], i["where"]) for i in info]
    with torch.no_grad():
        out, found = model.forward_intermediates(x, taps, stop_early=False)
        assert torch.equal(out, logits)
        for i, tensor in zip(info, found):
            assert torch.equal(tensor, caught[i["name"]]), i["name"]
            np.testing.assert_allclose(tensor.numpy(), numpy_hidden(model, x.numpy(), i["layer"], i["where"]),
                                       rtol=1e-5, atol=1e-6)
        early, [only] = model.forward_intermediates(x, [(-2, "post")])  # negative layers count from the end
    assert early is None and torch.equal(only, caught["hidden1.post"])
    ran = []
    hook = model.net[-1].register_forward_hook(lambda *args: ran.append(1))
    model.forward_intermediates(x, [(0, "pre")])
    hook.remove()
    assert not ran  # stop_early: the layers after the deepest tap do not run


def test_layer_and_where_are_validated():
    model = Model([4, 6, 5, 3])
    with pytest.raises(ValueError, match=r"-2\.\.1"):
        model.get_activations(np.zeros((1, 4)), layer=2)
    with pytest.raises(ValueError, match=r"-2\.\.1"):
        model.get_activations(np.zeros((1, 4)), layer=-3)
    with pytest.raises(ValueError, match="'pre' or 'post'"):
        model.get_activations(np.zeros((1, 4)), where="mid")
    with pytest.raises(ValueError, match="no hidden layers"):
        Model([4, 3]).get_activations(np.zeros((1, 4)))


# ---- prediction --------------------------------------------------------------------------------

def test_predict_proba_predict_and_temperature():
    model = Model([6, 10, 4], seed=3)
    X = np.random.default_rng(2).normal(size=(30, 6)).astype(np.float32)
    logits = model.logits(X, batch_size=7)
    np.testing.assert_allclose(logits, numpy_hidden(model, X, 0, "post") @ model.net[-1].weight.detach().double().numpy().T
                               + model.net[-1].bias.detach().double().numpy(), rtol=1e-5, atol=1e-6)
    for temperature in (0.5, 1.0, 3.0):
        np.testing.assert_allclose(model.predict_proba(X, temperature=temperature),
                                   scipy.special.softmax(logits.astype(np.float64) / temperature, axis=1),
                                   rtol=1e-5, atol=1e-7)
    predicted = model.predict(X)
    assert predicted.dtype == np.int64
    np.testing.assert_array_equal(predicted, np.argmax(logits, axis=1))
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            model.predict_proba(X, temperature=bad)


def test_evaluate_matches_manual_cross_entropy():
    model = Model([5, 8, 3], seed=0)
    X, y = blobs(n=50)
    logits = model.logits(X).astype(np.float64)
    expected_loss = -np.mean(scipy.special.log_softmax(logits, axis=1)[np.arange(50), y])
    result = model.evaluate(X, y)
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert result["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))


def test_readme_snippet_shapes():
    parent = Model([3072, 32, 512, 100], seed=0)
    X_norm = np.random.default_rng(0).normal(size=(7, 3072)).astype(np.float32)
    image_norm = X_norm[0]
    # the original README's lines, as written
    activations = parent.get_activations([X_norm], layer=1)   # (N, 512)
    branch = Model([512, 256, 3], activation="relu", dropout=0.5)
    act = parent.get_activations([image_norm], layer=1)
    prediction = branch.predict([act])
    assert activations.shape == (7, 512)
    assert act.shape == (1, 512)
    np.testing.assert_allclose(act[0], activations[0], rtol=1e-5, atol=1e-6)
    assert prediction.shape == (1,) and 0 <= prediction[0] < 3


def test_input_convention():
    X = np.arange(12, dtype=np.float64).reshape(3, 4)
    for variant in (X, [X], (X,), torch.tensor(X), [torch.tensor(X)], X[None], X.tolist()):
        out = as_2d_float(variant, width=4)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, X)
    assert as_2d_float(X[0], width=4).shape == (1, 4)
    for bad in (np.zeros((3, 5)), np.zeros((2, 3, 4)), np.zeros((1, 2, 3, 4)), np.zeros(5)):
        with pytest.raises(ValueError, match=r"\(N, 4\)"):
            as_2d_float(bad, width=4)
    model = Model([4, 3, 2])
    for method in (model.logits, model.predict, model.predict_proba, model.get_activations):
        with pytest.raises(ValueError, match=r"\(N, 4\)"):
            method(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        model.evaluate(np.zeros((2, 3)), [0, 1])


# ---- construction ------------------------------------------------------------------------------

def test_structure_and_attributes():
    model = Model([5, 7, 6, 3], activation="tanh", dropout=0.2)
    kinds = [type(m).__name__ for m in model.net]
    assert kinds == ["Linear", "Tanh", "Dropout", "Linear", "Tanh", "Dropout", "Linear"]
    assert model.architecture == [5, 7, 6, 3] and model.n_hidden == 2
    assert model.activation == "tanh" and model.dropout == 0.2 and not model.frozen
    assert model.num_parameters == 5 * 7 + 7 + 7 * 6 + 6 + 6 * 3 + 3


@pytest.mark.parametrize("kwargs", [
    dict(architecture=[]), dict(architecture=[5]), dict(architecture=[5, 0]), dict(architecture=[5, 2.5]),
    dict(architecture="53"), dict(architecture=[5, True]), dict(architecture=[5, 3], activation="swish"),
    dict(architecture=[5, 3], dropout=1.0), dict(architecture=[5, 3], dropout=-0.1),
    dict(architecture=[5, 3], dropout="0.5"), dict(architecture=[5, 3], seed=-1),
])
def test_invalid_constructor_arguments(kwargs):
    with pytest.raises(ValueError) as info:
        Model(**kwargs)
    assert "\n" not in str(info.value)


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = Model([5, 8, 3], seed=7), Model([5, 8, 3], seed=7)
    assert torch.equal(state, torch.get_rng_state())
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != Model([5, 8, 3], seed=8).fingerprint()


def test_freeze():
    model = Model([5, 8, 3])
    model.net.train()
    assert model.freeze() is model
    assert not any(p.requires_grad for p in model.net.parameters())
    assert model.frozen and model.num_parameters == 0 and not model.net.training
    with pytest.raises(ValueError, match="frozen"):
        model.fit(*blobs(n=10), epochs=1, progress=False)


def test_fingerprint():
    a, b = Model([5, 8, 3], seed=0), Model([5, 8, 3], seed=0)
    fingerprint = a.fingerprint()
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert fingerprint == b.fingerprint()
    with torch.no_grad():
        b.net[2].bias[1] += 1e-6
    assert b.fingerprint() != fingerprint
    assert Model([5, 8, 3], activation="tanh", seed=0).fingerprint() != fingerprint


# ---- training ----------------------------------------------------------------------------------

def test_fit_learns_a_separable_problem():
    X_all, y_all = blobs(n=330)
    X, y, X_val, y_val = X_all[:240], y_all[:240], X_all[240:], y_all[240:]
    model = Model([5, 16, 3], seed=0)
    history = model.fit(X, y, validation_data=(X_val, y_val), epochs=8, batch_size=32, lr=1e-2,
                        seed=0, progress=False)
    assert model.evaluate(X_val, y_val)["accuracy"] > 0.9
    assert history["accuracy"][-1] > 0.9 and model.history is history
    assert set(history) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "epochs_run",
                            "best_epoch", "stopped_early", "seconds"}
    assert history["epochs_run"] == 8 and len(history["val_loss"]) == 8 and len(history["lr"]) == 8
    assert not model.net.training


def test_fit_without_validation():
    X, y = blobs(n=40)
    model = Model([5, 8, 3], dropout=0.5, seed=0)
    history = model.fit(X, y, epochs=3, early_stopping_patience=1, progress=False)
    assert history["val_loss"] == [] and history["val_accuracy"] == []
    assert history["epochs_run"] == 3 and history["best_epoch"] == 3 and not history["stopped_early"]
    assert not model.net.training


def flipped_validation():
    """Validation labels that disagree with training labels, so validation loss rises while training."""
    X, y = blobs(n=120)
    return X, y, (X, (y + 1) % 3)


def test_early_stopping_restores_best_weights():
    X, y, (X_val, y_val) = flipped_validation()
    model = Model([5, 16, 3], seed=0)
    history = model.fit(X, y, validation_data=(X_val, y_val), epochs=30, batch_size=16, lr=1e-2,
                        early_stopping_patience=2, seed=0, progress=False)
    assert history["stopped_early"] and history["epochs_run"] < 30
    assert history["epochs_run"] == history["best_epoch"] + 2
    assert history["val_loss"][history["best_epoch"] - 1] == min(history["val_loss"])
    assert model.evaluate(X_val, y_val)["loss"] == pytest.approx(min(history["val_loss"]), abs=1e-6)
    # Same seed and constant lr: training for best_epoch epochs reproduces the restored weights.
    reference = Model([5, 16, 3], seed=0)
    reference.fit(X, y, epochs=history["best_epoch"], batch_size=16, lr=1e-2, seed=0, progress=False)
    assert model.fingerprint() == reference.fingerprint()


@pytest.mark.parametrize("restore", [True, False])
def test_restore_best_weights_without_early_stopping(restore):
    X, y, (X_val, y_val) = flipped_validation()
    model = Model([5, 16, 3], seed=0)
    history = model.fit(X, y, validation_data=(X_val, y_val), epochs=4, batch_size=16, lr=1e-2,
                        monitor="val_accuracy", restore_best_weights=restore, seed=0, progress=False)
    assert history["epochs_run"] == 4 and not history["stopped_early"]
    assert history["val_accuracy"][history["best_epoch"] - 1] == max(history["val_accuracy"])
    expected = max(history["val_accuracy"]) if restore else history["val_accuracy"][-1]
    assert model.evaluate(X_val, y_val)["accuracy"] == pytest.approx(expected, abs=1e-9)


def test_same_seed_same_weights_and_augmentation_is_seeded():
    X, y = blobs(n=64)

    def noisy(xb, generator):
        return xb + 0.1 * torch.randn(xb.shape, generator=generator)

    def train(seed):
        model = Model([5, 8, 3], dropout=0.3, seed=0)
        model.fit(X, y, epochs=2, batch_size=16, train_transform=noisy, seed=seed, progress=False)
        return model.fingerprint()

    assert train(1) == train(1)
    assert train(1) != train(2)


def test_train_transform_changes_width():
    X, y = blobs(n=48, dim=5)
    calls = []

    def first_three(xb, generator):
        assert isinstance(generator, torch.Generator) and xb.dtype == torch.float32
        calls.append(len(xb))
        return xb[:, :3] * 2.0

    model = Model([3, 8, 3], seed=0)
    model.fit(X, y, validation_data=(X[:, :3] * 2.0, y), epochs=2, batch_size=20,
              train_transform=first_three, progress=False)
    assert calls == [20, 20, 8] * 2  # the last partial batch is kept
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        model.fit(X, y, epochs=1, progress=False)
    with pytest.raises(ValueError, match="train_transform"):
        model.fit(X, y, epochs=1, train_transform=lambda xb, g: xb, progress=False)


@pytest.mark.parametrize("optimizer, schedule", [("adam", "cosine"), ("adamw", "onecycle"), ("sgd", None)])
def test_optimizers_and_schedules_run(optimizer, schedule):
    X, y = blobs(n=40)
    model = Model([5, 8, 3], seed=0)
    history = model.fit(X, y, epochs=3, batch_size=16, lr=0.05, optimizer=optimizer, lr_schedule=schedule,
                        weight_decay=1e-4, label_smoothing=0.1, progress=False)
    assert len(history["lr"]) == 3 and np.all(np.isfinite(history["loss"]))
    if schedule == "cosine":
        assert history["lr"][-1] == pytest.approx(0.0, abs=1e-12)
    if schedule is None:
        assert history["lr"] == [0.05] * 3


def test_fit_validates_arguments():
    X, y = blobs(n=20)
    model = Model([5, 8, 3])
    bad_calls = [
        dict(y=np.full(20, 3)), dict(y=np.full(20, -1)), dict(y=y[:5]), dict(y=y.astype(float)),
        dict(optimizer="rmsprop"), dict(lr_schedule="step"), dict(monitor="loss"), dict(epochs=0),
        dict(batch_size=0), dict(lr=0), dict(validation_data=(X, np.full(20, 5))),
        dict(validation_data=X), dict(early_stopping_patience=-1),
    ]
    for bad in bad_calls:
        kwargs = dict(y=y, epochs=1, progress=False)
        kwargs.update(bad)
        with pytest.raises(ValueError):
            model.fit(X, **kwargs)


def test_progress_bar_on_stderr_only_when_asked(capsys):
    X, y = blobs(n=20)
    model = Model([5, 4, 3], seed=0)
    model.fit(X, y, validation_data=(X, y), epochs=2, desc="parent", progress=True)
    captured = capsys.readouterr()
    assert "parent" in captured.err and "val_loss" in captured.err and captured.out == ""
    model.fit(X, y, epochs=2, progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


# ---- save / load -------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    model = Model([5, 8, 6, 3], activation="gelu", dropout=0.25, seed=0)
    path = tmp_path / "model.pt"
    meta = NodeMeta("parent", "parent", ["a", "b", "c"], normalization={"mean": np.arange(3, dtype=np.float32)},
                    history={"score": np.float64(0.5), "nested": {"ok": True, "none": None, "t": torch.ones(2)}},
                    val_rows=[4, 1])
    model.save(path, meta=meta)
    assert os.listdir(tmp_path) == ["model.pt"]

    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "torchly/1" and raw["architecture"] == [5, 8, 6, 3]
    assert raw["activation"] == "gelu" and raw["dropout"] == 0.25

    loaded = Model.load(path)
    X = np.random.default_rng(0).normal(size=(9, 5))
    np.testing.assert_array_equal(loaded.logits(X), model.logits(X))
    assert loaded.fingerprint() == model.fingerprint() and not loaded.net.training
    assert loaded.dropout == 0.25 and loaded.activation == "gelu"
    assert isinstance(loaded.meta.normalization["mean"], torch.Tensor) and loaded.meta.path == str(path)
    np.testing.assert_array_equal(loaded.meta.normalization["mean"].numpy(), np.arange(3))
    assert loaded.meta.classes == ["a", "b", "c"] and loaded.meta.history["score"] == 0.5
    assert loaded.meta.val_rows.tolist() == [4, 1] and loaded.meta.val_rows.dtype == np.int64
    assert loaded.meta.history["nested"]["ok"] is True and torch.equal(loaded.meta.history["nested"]["t"], torch.ones(2))
    Model([2, 2]).save(path)
    assert Model.load(path).meta is None


def test_bad_meta_raises_type_error_naming_the_key(tmp_path):
    model = Model([3, 2])
    with pytest.raises(TypeError, match="weird"):
        model.save(tmp_path / "m.pt", meta=NodeMeta("parent", "p", history={"fine": 1, "deep": {"weird": {1, 2}}}))
    with pytest.raises(TypeError, match="strings"):
        model.save(tmp_path / "m.pt", meta=NodeMeta("parent", "p", history={"strings": np.array([object()])}))
    with pytest.raises(TypeError, match="meta must be a NodeMeta, a JudgeMeta or None; got dict"):
        model.save(tmp_path / "m.pt", meta={"name": "p"})
    assert os.listdir(tmp_path) == []


def test_failed_save_leaves_existing_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    original = Model([4, 5, 2], seed=0)
    original.save(path)

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        Model([4, 5, 2], seed=1).save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.pt"]
    assert Model.load(path).fingerprint() == original.fingerprint()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Model.load(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model at all")
    other = tmp_path / "other.pt"
    torch.save({"format": "something/9"}, other)
    broken = tmp_path / "broken.pt"
    torch.save({"format": torchly.FORMAT, "architecture": [4, 2], "activation": "relu", "dropout": None,
                "state_dict": {"0.weight": torch.zeros(3, 3)}, "meta": {}}, broken)
    for path in (garbage, other, broken):
        with pytest.raises(ValueError) as info:
            Model.load(path)
        assert "\n" not in str(info.value)
