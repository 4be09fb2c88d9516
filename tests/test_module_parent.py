"""Bring your own parent (kind = "module"): a small module of the tests (tests/tiny_backbone.py) saved with
random weights; its taps against plain calls of its submodules, stopping early, run -> predict ->
probe-layers with and without its head, fingerprints tied to the weights file, and every bad input as a
one-line error before any work."""

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_backbone
import torch
import torch.nn.functional as F
from reference import WATER, node_probabilities, toml_table

from branching.cli import main as cli
from branching.config.parse import config_from_dict, parse_config
from branching.config.tree import dump_toml
from branching.data.tree_data import load_tree_data
from branching.errors import ConfigError
from branching.models import module_parent
from branching.models.forward import node_inputs
from branching.models.model import Model
from branching.train.nodes import parent_normalizer, train_parent
from branching.tree.checkpoint import load_folder
from branching.tree.routing import TreePredictor

pytestmark = pytest.mark.usefixtures("single_thread", "trusted")


@pytest.fixture
def trusted():
    """The tests' own module paths, as a config naming them would allow (module_parent.trust)."""
    for name in ("build", "build_needs_values", "TinyBackbone"):
        module_parent.trust(f"tiny_backbone:{name}")

CLASSES = '["beaver", "whale", "wolf", "sunflower"]'
MODULE = "tiny_backbone:build"


def save_weights(path, seed=0, **kwargs):
    torch.manual_seed(seed)
    net = tiny_backbone.build(**kwargs)
    with torch.no_grad():  # batch norm statistics that are not the identity
        net.layer1[1].running_mean.uniform_(-0.5, 0.5)
        net.layer1[1].running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), path)
    return path


def parent_table(weights, extra="") -> str:
    return f'[parent]\nclasses = {CLASSES}\nkind = "module"\nmodule = "{MODULE}"\nweights = "{weights}"\n{extra}\n'


TWO_LEVELS = toml_table("branches.mammals", classes=["beaver", "whale", "wolf"], layer="layer1", hidden=[6]) + WATER


def by_hand(net, x, input_size=32):
    """The reference: the module's submodules called one after the other on the (resized) images."""
    images = x.reshape(-1, 3, 32, 32)
    if input_size != 32:
        images = F.interpolate(images, size=(input_size, input_size), mode="bilinear", antialias=True)
    out = {"stem.0": net.stem[0](images)}
    out["stem"] = net.stem[1](out["stem.0"].clone())
    out["layer1"] = net.layer1(out["stem"])
    out["layer2"] = net.layer2(out["layer1"])
    out["pool"] = net.pool(out["layer2"])
    out["head"] = net.head(out["pool"])
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_weights(tmp_path_factory.mktemp("weights") / "tiny.pt")


def loaded_model(weights, **shape):
    model = Model([3072, 4], kind="module", shape={"module": MODULE, **shape}, seed=0)
    model.net.module.load_state_dict(torch.load(weights, weights_only=True))
    return model.freeze()


# ---- taps ------------------------------------------------------------------------------------

@pytest.mark.parametrize("input_size", [32, 20])
def test_taps_equal_plain_calls_of_the_submodules(weights, input_size):
    model = loaded_model(weights, input_size=input_size)
    reference = tiny_backbone.build()
    reference.load_state_dict(torch.load(weights, weights_only=True))
    reference.eval()
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 3072)).astype(np.float32))
    names = ["stem.0", "stem", "layer1", "layer2", "pool", "head"]  # stem.0 is followed by an in-place ReLU
    with torch.no_grad():
        expected = by_hand(reference, x, input_size)
        output, found = model.forward_intermediates(x, [(n, None) for n in names], stop_early=False)
    for name, tensor in zip(names, found):
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    torch.testing.assert_close(output, expected["head"], rtol=0, atol=0)
    shapes = {i["name"]: i["shape"] for i in model.feature_info}
    assert shapes["layer1"] == tuple(expected["layer1"].shape[1:]) and shapes["head"] == (4,)
    assert [i["name"] for i in model.feature_info].index("layer1") < [i["name"] for i in model.feature_info].index(
        "layer2")
    assert model.width("layer1") == 8 and model.width("layer2", pool="flat") == expected["layer2"][0].numel()


def test_stop_early_does_not_run_the_modules_after_the_deepest_tap(weights):
    model = loaded_model(weights)
    calls = []
    for name in ("layer1", "layer2", "head"):
        model.net.module.get_submodule(name).register_forward_pre_hook(lambda m, i, name=name: calls.append(name))
    x = torch.zeros(2, 3072)
    with torch.no_grad():
        output, [stem, layer1] = model.forward_intermediates(x, [("stem", None), ("layer1", None)])
    assert output is None and calls == ["layer1"] and layer1.shape == (2, 8, 16, 16)
    calls.clear()
    with torch.no_grad():
        model.forward_intermediates(x, [("layer1", None)], stop_early=False)
    assert calls == ["layer1", "layer2", "head"]


def test_a_module_that_cannot_run_on_the_meta_device_is_described_on_zeros(weights):
    from branching.models import module_parent

    with pytest.raises(Exception):
        with torch.device("meta"):
            tiny_backbone.build_needs_values()(torch.empty(1, 3, 32, 32))
    found = module_parent.describe("tiny_backbone:build_needs_values", {}, 24)
    assert found["output"] == (4,) and {"name": "layer1", "shape": (8, 12, 12)} in found["taps"]
    assert found["parameters"] == sum(p.numel() for p in tiny_backbone.build().parameters())


def test_a_module_parent_is_never_trained_and_has_no_logits_without_its_head(weights):
    model = loaded_model(weights)
    assert model.frozen and not model.has_head
    with pytest.raises(ValueError, match="never trained"):
        model.fit(np.zeros((2, 3072), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="has no head"):
        model.logits(np.zeros((2, 3072), np.float32))
    assert loaded_model(weights, head=True).logits(np.zeros((2, 3072), np.float32)).shape == (2, 4)


# ---- run, predict, probe-layers --------------------------------------------------------------

def run_tree(root, data_dir, text) -> int:
    (root / "tree.toml").write_text(text)
    return cli.main(["run", "--config", str(root / "tree.toml"), "--data", str(data_dir), "--out",
                     str(root / "out"), "--max-epochs", "1", "--quiet", "--no-download"])


@pytest.fixture(scope="module")
def headless(tmp_path_factory, small_data_dir, weights):
    root = tmp_path_factory.mktemp("headless")
    assert run_tree(root, small_data_dir, parent_table(weights, "input_size = 20") + TWO_LEVELS) == 0
    return root, small_data_dir


def test_run_keeps_the_weights_and_records_the_module(headless, weights):
    root, _ = headless
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    assert metrics["parent"] is None and metrics["tree"] is None and set(metrics["branches"]) == {"mammals", "water"}
    assert "parent_head" not in metrics["branches"]["mammals"]
    config, models = load_folder(root / "out")
    parent = models["parent"]
    assert parent.kind == "module" and parent.shape["module"] == MODULE and parent.shape["input_size"] == 20
    meta = parent.meta
    assert meta.files["weights"] == str(weights) and meta.history["epochs_run"] == 0
    import hashlib
    assert parent.shape["weights_sha256"] == meta.files["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    stored = torch.load(weights, weights_only=True)
    for key, tensor in stored.items():  # frozen: the file's weights, untouched
        torch.testing.assert_close(parent.net.module.state_dict()[key], tensor, rtol=0, atol=0)
    assert (root / "out" / "report.md").is_file() and not (root / "out" / "tree.csv").exists()


def test_the_branch_reads_the_module_at_its_tap(headless, weights):
    root, data_dir = headless
    config, models = load_folder(root / "out")
    images = np.load(data_dir / "test", allow_pickle=True, encoding="bytes")[b"data"][:12]
    X = parent_normalizer(models["parent"]).transform(images)
    channels = images.reshape(len(images), 3, -1).astype(np.float64)
    train = np.load(data_dir / "train", allow_pickle=True, encoding="bytes")
    rows = models["parent"].meta.train_rows
    fitted = train[b"data"][rows].reshape(len(rows), 3, -1).astype(np.float64)
    mean, std = fitted.mean(axis=(0, 2)), fitted.std(axis=(0, 2))  # the parent's training images, per channel
    x = torch.from_numpy(((channels - mean[:, None]) / std[:, None]).reshape(len(images), -1).astype(np.float32))
    reference = tiny_backbone.build()
    reference.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        expected = by_hand(reference.eval(), x, 20)["layer1"].mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(node_inputs(models, "mammals", X), expected, rtol=1e-4, atol=1e-4)


def test_predict_goes_to_the_only_branch_of_a_parent_without_a_head(headless, capsys):
    root, data_dir = headless
    out = root / "predict.json"
    assert cli.main(["predict", "--models", str(root / "out"), "--data", str(data_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    rows = json.loads(out.read_text())["predictions"]
    assert rows and all(r["path"].startswith("parent > mammals") for r in rows)
    assert {r["predicted_class"] for r in rows} <= {"beaver", "whale", "wolf"}
    config, models = load_folder(root / "out")
    images = np.load(data_dir / "test", allow_pickle=True, encoding="bytes")[b"data"]
    result = TreePredictor(config, models).predict(images, batch_size=7)
    probs = node_probabilities(models, ("mammals", "water"), parent_normalizer(models["parent"]).transform(images))
    to_water = probs["mammals"][:, :2].sum(axis=1) >= probs["mammals"][:, 2]
    expected = np.where(to_water, probs["water"].argmax(axis=1), 2)
    assert (result.predicted == expected).mean() > 0.97
    assert (result.parent_predicted == -1).all()


def test_probe_layers_lists_the_module_taps(headless, capsys):
    root, data_dir = headless
    argv = ["probe-layers", "--config", str(root / "tree.toml"), "--data", str(data_dir), "--models",
            str(root / "out"), "--quiet", "--no-download"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert all(f"mammals   parent    {t} " in printed for t in ("stem", "layer1", "layer2", "head")), printed
    assert "(configured)" in printed and "<- recommended" in printed
    assert cli.main(argv[:5] + ["--quiet", "--no-download"]) == 0  # without --models: the parent is loaded here
    assert f"the module {MODULE} as the parent, loaded here (frozen)" in capsys.readouterr().out


def test_check_torchvision_exits_cleanly_without_torchvision(tmp_path):
    try:
        import torchvision  # noqa: F401
        pytest.skip("torchvision is installed here: the script would run in earnest")
    except Exception:  # noqa: BLE001
        pass
    from reference import REPO_ROOT, run_command
    done = run_command([REPO_ROOT / "benchmarks" / "check_torchvision.py", "--data", tmp_path], cwd=tmp_path)
    assert done.returncode == 0 and "torchvision is not importable here" in done.stdout


def test_with_its_head_the_parent_is_evaluated_and_routes(tmp_path, small_data_dir, weights, capsys):
    text = parent_table(weights, "head = true") + TWO_LEVELS.replace('layer = "layer1"', 'layer = "pool"')
    assert run_tree(tmp_path, small_data_dir, text) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    config, models = load_folder(tmp_path / "out")
    images = np.load(small_data_dir / "test", allow_pickle=True, encoding="bytes")[b"data"]
    labels = np.load(small_data_dir / "test", allow_pickle=True, encoding="bytes")[b"fine_labels"]
    names = ["beaver", "whale", "wolf", "sunflower"]
    meta = np.load(small_data_dir / "meta", allow_pickle=True, encoding="bytes")
    ids = [[n.decode() for n in meta[b"fine_label_names"]].index(c) for c in names]
    y = np.array([ids.index(label) for label in labels])
    X = parent_normalizer(models["parent"]).transform(images)
    reference = tiny_backbone.build()
    reference.load_state_dict(torch.load(weights, weights_only=True))
    with torch.no_grad():
        predicted = reference.eval()(torch.from_numpy(X).reshape(-1, 3, 32, 32)).argmax(dim=1).numpy()
    assert metrics["parent"]["test_accuracy"] == pytest.approx((predicted == y).mean())
    assert metrics["tree"] is not None and "parent_head" in metrics["branches"]["mammals"]
    result = TreePredictor(config, models).predict(images)
    np.testing.assert_array_equal(result.parent_predicted, predicted)


def test_the_python_api_answers_a_headless_parents_tree_as_predict_does(headless, tmp_path, capsys):
    from api_check import assert_api_answers_as_predict
    from branching.data.cifar import load_split
    root, data_dir = headless
    images = load_split(data_dir, "test").images
    assert_api_answers_as_predict(root / "out", ["--data", data_dir], images, tmp_path / "api.json", capsys)
    from test_export import assert_same_answers
    assert cli.main(["export", "--models", str(root / "out"), "--out", str(tmp_path / "tree.onnx")]) == 0
    assert_same_answers(root / "out", tmp_path / "tree.onnx", images, batch_size=5)


def test_several_branches_without_a_head_need_predict_branch(tmp_path, small_data_dir, weights, capsys):
    text = parent_table(weights) + """
[branches.mammals]
classes = ["beaver", "whale"]
layer = "layer2"
hidden = [4]

[branches.plants]
classes = ["sunflower", "wolf"]
layer = "stem"
hidden = []
"""
    assert run_tree(tmp_path, small_data_dir, text) == 0
    capsys.readouterr()
    argv = ["predict", "--models", str(tmp_path / "out"), "--data", str(small_data_dir)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot route between its branches mammals, plants; pass --branch NAME" in err and err.count("\n") == 1
    assert cli.main([*argv, "--node", "parent"]) == 2
    assert "has no head, so no classes to answer with" in capsys.readouterr().err
    assert cli.main([*argv, "--node", "mammals"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("path parent > mammals" in line for line in lines)
    assert cli.main([*argv, "--branch", "plants"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("path parent > plants" in line for line in lines)
    assert cli.main([*argv, "--branch", "nope"]) == 2
    assert "--branch nope: no such branch" in capsys.readouterr().err


def test_changed_weights_change_the_fingerprint_and_predict_refuses_them(tmp_path, small_data_dir, capsys):
    weights = save_weights(tmp_path / "w.pt")
    text = parent_table(weights) + TWO_LEVELS.split("[branches.water]")[0]
    assert run_tree(tmp_path, small_data_dir, text) == 0
    capsys.readouterr()
    before = load_folder(tmp_path / "out")[1]["parent"].fingerprint()
    save_weights(weights, seed=1)  # same shapes, other values
    argv = ["predict", "--models", str(tmp_path / "out"), "--data", str(small_data_dir)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "was built from the weights file" in err and "restore them" in err and err.count("\n") == 1
    other = Model([3072, 4], kind="module", seed=0, shape={
        "module": MODULE, "weights_sha256": parse_config(text).parent.shape_dict["weights_sha256"]})
    other.net.module.load_state_dict(torch.load(weights, weights_only=True))
    assert other.fingerprint() != before
    hashes = [Model([3072, 4], kind="module", seed=0, shape={"module": MODULE, "weights_sha256": h}).fingerprint()
              for h in ("a" * 64, "b" * 64)]  # the same tensors: the recorded hash alone changes the fingerprint
    assert hashes[0] != hashes[1]
    moved = Model([3072, 4], kind="module", seed=0, shape={"module": "tiny_backbone:TinyBackbone"})
    assert moved.fingerprint() != Model([3072, 4], kind="module", seed=0, shape={"module": MODULE}).fingerprint()


def test_the_config_round_trips(weights):
    config = parse_config(parent_table(weights, 'input_size = 24\nmean = [0.5, 0.4, 0.3]\nstd = [0.2, 0.2, 0.25]\n'
                                                'kwargs = { width = 4 }') + TWO_LEVELS)
    assert config_from_dict(config.to_dict()) == config
    assert parse_config(dump_toml(config)) == config
    shape = config.parent.shape_dict
    assert shape["mean"] == [0.5, 0.4, 0.3] and shape["kwargs"] == {"width": 4} and shape["input_size"] == 24


def test_given_mean_and_std_are_the_normalisation(tmp_path, small_data_dir, weights):
    text = parent_table(weights, "mean = [0.5, 0.25, 0.75]\nstd = [0.5, 0.125, 0.25]") + TWO_LEVELS
    config = parse_config(text)
    data = load_tree_data(config, small_data_dir)
    from branching.config.recipes import get_recipe
    model, meta, normalizer = train_parent(config, data, get_recipe("default", 1), seed=0)
    pixels = np.full((1, 3072), 255, np.uint8)
    np.testing.assert_allclose(normalizer.transform(pixels)[0, [0, 1024, 2048]], [1.0, 6.0, 1.0], rtol=1e-6)
    assert len(meta.val_rows) == round(0.15 * 160)  # the held-out share branches validate on


def test_given_mean_and_std_fit_images_of_any_size(weights):
    """Images of 20 pixels (a photo folder's [data] image_size): the given statistics are repeated over their
    pixels, not over 32-pixel images' (once "expected images of shape (N, 3072)")."""
    from branching.config.recipes import get_recipe
    from branching.data.cifar import Split
    from branching.data.tree_data import TreeData
    config = parse_config("[data]\nimage_size = 20\n" + parent_table(weights, "mean = [0.5, 0.25, 0.75]\n"
                                                                       "std = [0.5, 0.125, 0.25]") + TWO_LEVELS)
    rng = np.random.default_rng(0)
    split = lambda n: Split(rng.integers(0, 256, (4 * n, 3 * 20 * 20), dtype=np.uint8),  # noqa: E731
                            np.repeat(np.arange(4), n), [f"{i}.png" for i in range(4 * n)])
    data = TreeData(Path("photos"), ["beaver", "sunflower", "whale", "wolf"], split(20), split(5))
    model, meta, normalizer = train_parent(config, data, get_recipe("default", 1), seed=0)
    assert normalizer.mean.size == 3 * 20 * 20
    np.testing.assert_allclose(normalizer.transform(np.full((1, 1200), 255, np.uint8))[0, [0, 400, 800]],
                               [1.0, 6.0, 1.0], rtol=1e-6)


def test_images_enlarged_by_the_module_go_through_it_in_smaller_batches(weights):
    small, large = loaded_model(weights), loaded_model(weights, input_size=224)
    assert small.net.batch_rows(4096) == 4096  # 32-pixel images as they are: batches unchanged
    assert large.net.batch_rows(4096) == module_parent.BATCH_BYTES // (4 * 3 * 224 * 224)  # 111
    seen = []
    large.net.module.stem.register_forward_hook(lambda m, a, o: seen.append(len(o)))
    large.get_activations(np.zeros((300, 3072), np.float32), layer="stem")
    assert seen == [111, 111, 78]


# ---- bad input: one line, before any work ----------------------------------------------------

def bad_inputs(tmp_path, weights):
    wrong = save_weights(tmp_path / "wrong.pt", width=5)
    pickled = tmp_path / "pickled.pt"
    torch.save({"net": tiny_backbone.build()}, pickled)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    good = parent_table(weights)
    branch = '\n[branches.m]\nclasses = ["beaver", "whale"]\n'
    return [
        (good.replace(MODULE, "tiny_backbone.build"), 'module must be "package.module:callable"'),
        (good.replace(MODULE, "no_such_package_xyz:build"), "cannot import 'no_such_package_xyz'"),
        (good.replace(MODULE, "tiny_backbone:nothing"), "has no attribute 'nothing'"),
        (good.replace(MODULE, "tiny_backbone:not_a_module"), "returned a dict, not a torch.nn.Module"),
        (good + "kwargs = 3", "kwargs: must be a table"),
        (good + "kwargs = { depth = 3 }", "calling it with kwargs"),
        (good.replace(str(weights), str(tmp_path / "missing.pt")), "weights: is not a file"),
        (good.replace(str(weights), str(tmp_path)), "weights: is not a file"),
        (good.replace(str(weights), str(wrong)), "does not match the module (head.weight: file (4, 10), module "
                                                 "(4, 8); layer1.0.bias"),
        (good.replace(str(weights), str(pickled)), "holds objects other than tensors"),
        (good.replace(str(weights), str(listed)), "is not a state_dict"),
        (good.replace(str(weights), str(garbage)), "is not a readable torch file"),
        (good + "kwargs = { width = 6000 }", "has 1,944,264,004 parameters, more than the limit of 250,000,000"),
        (good + "input_size = 4", "input_size: must be an integer in 8..1024"),
        (good + "input_size = 4000", "input_size: must be an integer in 8..1024"),
        (good + "mean = [0.5, 0.5]\nstd = [0.2, 0.2, 0.2]", "mean: must be 3 numbers"),
        (good + "mean = [0.5, 0.5, 0.5]\nstd = [0.2, 0.0, 0.2]", "std: must be 3 numbers, one per colour channel"),
        (good + "mean = [0.5, 0.5, 0.5]", "std: is required with mean"),
        (good + 'head = true\nkwargs = { num_classes = 3 }', "head: the module's output is (3,), not (4,)"),
        (good + "[parent.accept]\nthreshold = 0.9", "accept: needs the parent's head"),
        (good + "widths = [4]", "widths: is a key of cnn parents"),
        (good + "dropout = 0.1", "dropout: is not used by a module parent"),
        (good + branch + 'layer = "layer9"', "has no tap 'layer9'; its taps are stem.0, stem.1, stem, layer1.0"),
        (good + branch + 'layer = "layer1"\npool = "cls"', "pool 'cls' does not fit a feature map"),
        (good + branch + 'layer = "layer1"\nwhere = "pre"', "where: is for branches of MLPs"),
    ]


def test_every_bad_input_is_one_line_before_any_work(tmp_path, weights, small_data_dir, capsys):
    for text, expected in bad_inputs(tmp_path, weights):
        with pytest.raises(ConfigError) as caught:
            parse_config(text)
        message = str(caught.value)
        assert expected in message, (expected, message)
        assert "\n" not in message
    # through the command line: exit status 2, one line, no output folder
    (tmp_path / "bad.toml").write_text(bad_inputs(tmp_path, weights)[8][0])
    argv = ["run", "--config", str(tmp_path / "bad.toml"), "--data", str(small_data_dir), "--out",
            str(tmp_path / "out"), "--quiet", "--no-download"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_compare_and_the_original_recipe_refuse_a_module_parent(tmp_path, weights, small_data_dir, capsys):
    (tmp_path / "tree.toml").write_text(parent_table(weights) + TWO_LEVELS)
    base = ["--config", str(tmp_path / "tree.toml"), "--data", str(small_data_dir), "--out", str(tmp_path / "o"),
            "--quiet", "--no-download"]
    assert cli.main(["compare", *base, "--seeds", "0"]) == 2
    assert "compare is not built for a module parent" in capsys.readouterr().err
    assert cli.main(["run", *base, "--recipe", "original"]) == 2
    assert "needs --recipe default" in capsys.readouterr().err


def test_several_seeds_with_a_parent_without_a_head(tmp_path, small_data_dir, weights, capsys):
    (tmp_path / "tree.toml").write_text(parent_table(weights) + TWO_LEVELS.split("[branches.water]")[0])
    argv = ["run", "--config", str(tmp_path / "tree.toml"), "--data", str(small_data_dir), "--out",
            str(tmp_path / "out"), "--seeds", "0,1", "--max-epochs", "1", "--quiet", "--no-download"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["parent"] == {} and metrics["branches"]["mammals"]["test_accuracy"]["n"] == 2
    assert (tmp_path / "out" / "report.md").is_file()


def test_a_branch_refuses_a_tap_index_that_now_names_another_module(tmp_path, small_data_dir, weights, capsys,
                                                                   monkeypatch):
    from branching.errors import CheckpointError
    from branching.models import module_parent

    text = parent_table(weights) + '[branches.mammals]\nclasses = ["beaver", "whale", "wolf"]\nlayer = "layer1.0"\n'
    assert run_tree(tmp_path, small_data_dir, text) == 0
    assert load_folder(tmp_path / "out")[1]["mammals"].meta.tap == "layer1.0"
    monkeypatch.setattr(module_parent, "TAP_DEPTH", 1)  # as if the module's code had changed: its tap 3 is "pool",
    module_parent._described.cache_clear()              # of the same width (8) as layer1.0 averaged
    try:
        with pytest.raises(CheckpointError, match="trained on tap 'layer1.0' of its source, which is now tap 'pool'"):
            load_folder(tmp_path / "out")
    finally:
        module_parent._described.cache_clear()


def test_the_size_limit_is_torchlys():
    import torchly
    from branching.models import module_parent

    assert module_parent.MAX_PARAMETERS == torchly.MAX_PARAMETERS


def test_a_branch_of_new_classes_on_a_module_parent(tmp_path, small_data_dir, weights, capsys):
    text = parent_table(weights).replace(CLASSES, '["beaver", "whale", "wolf"]') + """
[branches.mammals]
classes = ["beaver", "whale"]
layer = "layer1"

[branches.newcomers]
classes = ["sunflower", "wolf"]
new_classes = true
layer = "layer2"
"""
    assert run_tree(tmp_path, small_data_dir, text) == 0
    parent = load_folder(tmp_path / "out")[1]["parent"]
    assert len(parent.meta.new_class_val_rows) > 0
    capsys.readouterr()
    argv = ["predict", "--models", str(tmp_path / "out"), "--data", str(small_data_dir)]
    assert cli.main(argv) == 0  # routing leaves the new classes out: the only routed branch is mammals
    assert all("path parent > mammals" in line for line in capsys.readouterr().out.splitlines())
    assert cli.main([*argv, "--node", "newcomers"]) == 0
    assert all("path parent > newcomers" in line for line in capsys.readouterr().out.splitlines())


def test_a_model_folder_alone_never_imports_the_module_it_names(headless, tmp_path, monkeypatch, capsys):
    """Loading a module parent runs its code: only a config the user passes may name it, never a model file."""
    root, data_dir = headless
    monkeypatch.setattr(module_parent, "_TRUSTED", set())  # a fresh process: no config read yet
    argv = ["predict", "--models", str(root / "out"), "--data", str(data_dir)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "named by a model file" in err and "pass --config" in err and len(err.splitlines()) == 1
    assert cli.main(argv + ["--config", str(root / "tree.toml"), "--out", str(tmp_path / "p.csv")]) == 0
    capsys.readouterr()
    # a crafted file naming other code: refused before anything is imported or called
    monkeypatch.setattr(module_parent, "_TRUSTED", set())
    payload = torch.load(root / "out" / "models" / "parent.pt", weights_only=True)
    payload["shape"] = {**payload["shape"], "module": "os:system", "kwargs": {"command": f"touch {tmp_path}/ran"}}
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    torch.save(payload, crafted / "parent.pt")
    with pytest.raises(Exception, match="named by a model file"):
        Model.load(crafted / "parent.pt")
    assert not (tmp_path / "ran").exists()
