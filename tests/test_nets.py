"""Every kind of network: its taps against forward hooks and a plain forward pass, pooling against
hand computations, and its checkpoint."""

import numpy as np
import pytest
import torch

from branching.models import nets
from branching.models.model import Model

SMALL = {"mlp": dict(architecture=[3072, 12, 8, 4]),
         "cnn": dict(architecture=[3072, 4], kind="cnn", shape={"widths": [4, 6, 8], "depth": 2}),
         "vit": dict(architecture=[3072, 4], kind="vit", shape={"dim": 16, "depth": 3, "heads": 2, "patch": 8})}


pytestmark = pytest.mark.usefixtures("single_thread")


def images(n=5, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3072)).astype(np.float32))


@pytest.mark.parametrize("kind", list(SMALL))
def test_every_tap_equals_its_forward_hook_and_the_output_equals_a_plain_forward(kind):
    model = Model(**SMALL[kind], seed=0)
    x = images()
    caught = {}
    hooks = [model.net.get_submodule(i["module"]).register_forward_hook(
        lambda module, inputs, output, name=i["name"]: caught.__setitem__(name, output)) for i in model.feature_info]
    with torch.no_grad():
        plain = model.net(x)
    for h in hooks:
        h.remove()
    taps = [(i["name"], None) for i in model.feature_info]
    with torch.no_grad():
        out, found = model.forward_intermediates(x, taps, stop_early=False)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    np.testing.assert_allclose(model.logits(x.numpy()), plain.numpy(), rtol=1e-5, atol=1e-6)
    for info, tensor in zip(model.feature_info, found):
        assert tuple(tensor.shape[1:]) == tuple(info["shape"]), info["name"]
        torch.testing.assert_close(tensor, caught[info["name"]], rtol=0, atol=0)
        with torch.no_grad():  # stopping early at this tap gives the same tensor and no output
            early, [alone] = model.forward_intermediates(x, [(info["name"], None)])
        assert early is None
        torch.testing.assert_close(alone, tensor, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_taps_by_index_and_name_and_bad_taps(kind):
    model = Model(**SMALL[kind], seed=0)
    names = [i["name"] for i in model.feature_info]
    assert model.tap(-1)["name"] == names[-1] and model.tap(0)["name"] == names[0]
    assert model.tap(names[1]) is model.feature_info[1]
    with pytest.raises(ValueError, match="no tap named 'nope'"):
        model.tap("nope")
    with pytest.raises(ValueError, match="where is for MLP layers"):
        model.tap(0, "pre")
    with pytest.raises(ValueError, match="out of range"):
        model.tap(len(names))


def test_pooling_against_hand_computations():
    fmap = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    torch.testing.assert_close(nets.pool(fmap, "avg"), fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(nets.pool(fmap, "max"), fmap[:, :, -1, -1])
    grid = nets.pool(fmap, "avg2x2").reshape(2, 3, 2, 2)
    torch.testing.assert_close(grid[:, :, 0, 1], fmap[:, :, :2, 2:].mean(dim=(2, 3)))
    assert nets.pool(fmap, "flat").shape == (2, 48)
    tokens = torch.randn(2, 5, 7)
    torch.testing.assert_close(nets.pool(tokens, "cls"), tokens[:, 0])
    torch.testing.assert_close(nets.pool(tokens, "mean"), tokens[:, 1:].mean(dim=1))
    for shape, how, width in (((3, 4, 4), "avg", 3), ((3, 4, 4), "avg2x2", 12), ((3, 4, 4), "flat", 48),
                              ((5, 7), "cls", 7), ((5, 7), "mean", 7), ((5, 7), "flat", 35), ((9,), "flat", 9)):
        assert nets.pooled_width(shape, how) == width
    with pytest.raises(ValueError, match="pool 'cls' does not fit a feature map"):
        nets.check_pool((3, 4, 4), "cls")
    with pytest.raises(ValueError, match="pool 'avg' does not fit a vector"):
        nets.check_pool((9,), "avg")


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_get_activations_pools_and_width_agrees(kind):
    model = Model(**SMALL[kind], seed=1)
    x = images(7, seed=1)
    for info in model.feature_info:
        default = nets.default_pool(info["shape"])
        got = model.get_activations(x.numpy(), info["name"], batch_size=3)
        with torch.no_grad():
            want = nets.pool(model.hidden_forward(x, info["name"]), default).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert got.shape == (7, model.width(info["name"]))


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_checkpoints_record_kind_and_shape_and_lies_are_refused(kind, tmp_path):
    model = Model(**SMALL[kind], seed=2)
    model.save(tmp_path / "m.pt")
    back = Model.load(tmp_path / "m.pt")
    assert (back.kind, back.shape) == (kind, model.shape) and back.fingerprint() == model.fingerprint()
    np.testing.assert_allclose(back.logits(images().numpy()), model.logits(images().numpy()), rtol=0, atol=0)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["shape"] = {**payload["shape"], **({"widths": [400, 600, 800]} if kind == "cnn" else {"dim": 640})}
    torch.save(payload, tmp_path / "liar.pt")
    with pytest.raises(ValueError, match="do not match the declared architecture"):
        Model.load(tmp_path / "liar.pt")


def test_shape_keys_are_checked():
    with pytest.raises(ValueError, match="unknown cnn shape keys \\['dim'\\]"):
        Model([3072, 4], kind="cnn", shape={"dim": 3})
    with pytest.raises(ValueError, match="widths must be a list of positive integers"):
        Model([3072, 4], kind="cnn", shape={"widths": [4, 0]})
    with pytest.raises(ValueError, match="patch 5 must divide 32"):
        Model([3072, 4], kind="vit", shape={"patch": 5})
    with pytest.raises(ValueError, match="kind must be one of mlp, cnn, vit"):
        Model([3072, 4], kind="rnn")
