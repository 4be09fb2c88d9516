"""Parents of every kind (MLP, CNN, ViT) through run, predict, routing, probe-layers and compare, on small
synthetic data; bad configs for them; and the per-kind pieces (normalisation, shifted crops)."""

import csv
import json

import numpy as np
import pytest
import torch
from api_check import assert_api_answers_as_predict
from reference import REPO_ROOT, node_probabilities

from branching.cli import main as cli
from branching.config.parse import parse_config
from branching.data.normalization import Normalizer
from branching.models.batches import DeviceInputs, shift
from branching.models.forward import augment_transform
from branching.models.model import Model
from branching.train import run as pipeline
from branching.train.nodes import parent_normalizer
from branching.tree.checkpoint import load_folder
from branching.tree.routing import TreePredictor

CLASSES = ["beaver", "whale", "wolf", "sunflower"]
PARENTS = {
    "cnn": 'parent = { classes = ["beaver", "whale", "wolf", "sunflower"], kind = "cnn", widths = [4, 8], depth = 1 }',
    "vit": 'parent = { classes = ["beaver", "whale", "wolf", "sunflower"], kind = "vit", dim = 8, depth = 2, '
           'heads = 2, patch = 8 }',
}
BRANCHES = """
branches.mammals = { classes = ["beaver", "whale", "wolf"], layer = -1, hidden = [6] }
branches.water = { from = "mammals", classes = ["beaver", "whale"], layer = 0, hidden = [3] }
"""


@pytest.fixture(scope="module", params=list(PARENTS))
def trained(request, tmp_path_factory, small_data_dir):
    """A two-level tree on a CNN or ViT parent, trained by `run` for one epoch per node."""
    root = tmp_path_factory.mktemp(request.param)
    (root / "tree.toml").write_text(PARENTS[request.param] + BRANCHES)
    argv = ["run", "--config", str(root / "tree.toml"), "--data", str(small_data_dir), "--out", str(root / "out"),
            "--max-epochs", "1", "--quiet", "--no-download"]
    assert cli.main(argv) == 0
    return request.param, root, small_data_dir


def test_run_writes_everything_and_checkpoints_record_the_kind(trained):
    kind, root, _ = trained
    out = root / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["branches"]) == {"mammals", "water"} and "tree" in metrics
    assert metrics["config"]["parent"]["kind"] == kind
    assert (out / "report.md").is_file() and (out / "plots" / "risk-coverage-water.png").is_file()
    config, models = load_folder(out)
    assert models["parent"].kind == kind and models["mammals"].kind == "mlp"
    last = models["parent"].feature_info[-1]
    assert models["mammals"].meta.pool == ("avg" if kind == "cnn" else "cls")
    assert models["mammals"].architecture[0] == last["shape"][0 if kind == "cnn" else -1]
    assert models["water"].meta.pool == "flat" and models["water"].meta.where == "pre"


def test_the_routed_tree_agrees_with_a_dense_reference(trained):
    kind, root, data_dir = trained
    config, models = load_folder(root / "out")
    images = np.load(data_dir / "test", allow_pickle=True, encoding="bytes")[b"data"]
    result = TreePredictor(config, models).predict(images, batch_size=7)
    X = parent_normalizer(models["parent"]).transform(images)
    # the reference: every node's softmax from its own input, the routing decided here by hand
    probs = node_probabilities(models, ("parent", "mammals", "water"), X)
    mammal_mass = probs["parent"][:, :3].sum(axis=1)
    to_mammals = mammal_mass >= probs["parent"][:, 3]  # ties: the first group, as argmax
    water_mass = probs["mammals"][:, :2].sum(axis=1)
    to_water = to_mammals & (water_mass >= probs["mammals"][:, 2])
    expected = np.where(to_water, probs["water"].argmax(axis=1),
                        np.where(to_mammals, 2, 3))
    assert (result.predicted == expected).mean() > 0.97  # float32 ties aside
    assert result.reached()["mammals"] == int(to_mammals.sum())


def test_predict_on_the_run_folder_matches_tree_csv(trained, capsys):
    _, root, data_dir = trained
    out = root / "predict.csv"
    assert cli.main(["predict", "--models", str(root / "out"), "--data", str(data_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    with open(out, newline="") as f:
        predicted = [row["predicted_class"] for row in csv.DictReader(f)]
    with open(root / "out" / "tree.csv", newline="") as f:
        assert predicted == [row["predicted_class"] for row in csv.DictReader(f)]


def test_the_python_api_answers_a_split_as_predict_does(trained, tmp_path, capsys):
    from branching.data.cifar import load_split
    _, root, data_dir = trained
    images = load_split(data_dir, "test").images
    assert_api_answers_as_predict(root / "out", ["--data", data_dir], images, tmp_path / "api.json", capsys)
    from test_export import assert_same_answers
    assert cli.main(["export", "--models", str(root / "out"), "--out", str(tmp_path / "tree.onnx")]) == 0
    assert_same_answers(root / "out", tmp_path / "tree.onnx", images, batch_size=5)


def test_probe_layers_lists_every_tap_of_the_parent(trained, capsys):
    kind, root, data_dir = trained
    argv = ["probe-layers", "--config", str(root / "tree.toml"), "--data", str(data_dir), "--models",
            str(root / "out"), "--quiet", "--no-download"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    taps = ["stage0", "stage1"] if kind == "cnn" else ["block0", "block1"]
    assert all(f"mammals   parent    {t}" in printed for t in taps), printed
    assert "<- recommended" in printed


def test_compare_runs_every_method_for_a_parent_of_another_kind(trained, capsys):
    kind, root, data_dir = trained
    argv = ["compare", "--config", str(root / "tree.toml"), "--data", str(data_dir), "--out", str(root / "cmp"),
            "--seeds", "0", "--max-epochs", "1", "--quiet", "--no-download"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    summary = json.loads((root / "cmp" / "compare.json").read_text())["summary"]["branches"]["mammals"]
    other = "stage0_avg" if kind == "cnn" else "block0_cls"
    assert {"branch", "parent_head", "linear_probe", other, "scratch", "finetune"} <= set(summary)


BAD = [
    ('parent = { classes = ["beaver", "whale"], kind = "rnn" }', "kind: is not a known choice"),
    (PARENTS["cnn"] + '\nbranches.m = { classes = ["beaver", "whale"], layer = "stage9" }', "has no tap 'stage9'"),
    (PARENTS["cnn"] + '\nbranches.m = { classes = ["beaver", "whale"], pool = "cls" }',
     "pool 'cls' does not fit a feature map"),
    (PARENTS["vit"] + '\nbranches.m = { classes = ["beaver", "whale"], pool = "avg2x2" }',
     "pool 'avg2x2' does not fit a token sequence"),
    (PARENTS["cnn"] + '\nbranches.m = { classes = ["beaver", "whale"], where = "post" }', "where: is for branches of MLPs"),
    ('parent = { classes = ["beaver", "whale"], kind = "vit", widths = [4] }', "widths: is a key of cnn parents"),
    ('parent = { classes = ["beaver", "whale"], kind = "cnn", hidden = [4] }', "hidden: is a key of mlp, text and pretrained parents"),
    ('parent = { classes = ["beaver", "whale"], kind = "vit", patch = 5 }', "patch 5 must divide 32"),
    ('parent = { classes = ["beaver", "whale"], kind = "cnn", widths = 64 }', "widths must be a list"),
    ('parent = { classes = ["beaver", "whale"], kind = "cnn", depth = [2] }', "depth must be a positive integer"),
    ('parent = { classes = ["beaver", "whale"], kind = "cnn", widths = [4, 4, 4, 4, 4, 4, 4] }', "at most 6 stages"),
]


@pytest.mark.parametrize("text, expected", BAD)
def test_bad_kinds_taps_pools_and_keys_are_config_errors(text, expected, tmp_path, small_data_dir, capsys,
                                                         monkeypatch):
    monkeypatch.setattr(pipeline, "train_parent", lambda *a, **k: pytest.fail("trained before the config was checked"))
    (tmp_path / "bad.toml").write_text(text + "\n")
    assert cli.main(["run", "--config", str(tmp_path / "bad.toml"), "--data", str(small_data_dir), "--out",
                     str(tmp_path / "out"), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err


def test_the_original_recipe_is_for_mlp_parents_only(tmp_path, small_data_dir, capsys, monkeypatch):
    import branching.studies.compare as compare

    monkeypatch.setattr(pipeline, "load_tree_data", lambda *a, **k: pytest.fail("data read before the check"))
    monkeypatch.setattr(compare, "load_tree_data", lambda *a, **k: pytest.fail("data read before the check"))
    (tmp_path / "cnn.toml").write_text(PARENTS["cnn"] + BRANCHES)
    for argv in (["run", "--out", str(tmp_path / "out")], []):
        command = cli.main if argv else (lambda a: cli.train_script("parent", a))
        assert command([*argv, "--config", str(tmp_path / "cnn.toml"), "--data", str(small_data_dir),
                        "--recipe", "original", "--no-download"]) == 2
        assert "trains MLP parents only" in capsys.readouterr().err
    assert cli.main(["compare", "--config", str(tmp_path / "cnn.toml"), "--data", str(small_data_dir), "--out",
                     str(tmp_path / "cmp"), "--original-parent", "--no-download"]) == 2
    assert "trains MLP parents only" in capsys.readouterr().err


def test_per_channel_normalisation_against_numpy():
    images = np.random.default_rng(0).integers(0, 256, (20, 3072)).astype(np.uint8)
    norm = Normalizer.fit(images, per_channel=True)
    channels = images.reshape(20, 3, 1024).astype(np.float64)
    for c in range(3):
        assert norm.mean[c * 1024:(c + 1) * 1024] == pytest.approx(channels[:, c].mean(), rel=1e-6)
        assert norm.std[c * 1024:(c + 1) * 1024] == pytest.approx(channels[:, c].std(), rel=1e-6)


def test_random_crops_are_shifted_windows_of_the_zero_padded_image():
    x = torch.arange(2 * 3072, dtype=torch.float32).reshape(2, 3072) + 1
    generator = torch.Generator().manual_seed(3)
    dy, dx = (torch.randint(0, 9, (2,), generator=generator) for _ in range(2))
    out = shift(x, dy, dx, 4).reshape(2, 3, 32, 32)
    padded = np.pad(x.reshape(2, 3, 32, 32).numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)))
    for i in range(2):
        np.testing.assert_array_equal(out[i].numpy(), padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32])
    norm = Normalizer(np.zeros(3072), np.ones(3072))
    same = augment_transform(norm, flip=False, crop=0).batch(DeviceInputs(x, torch.device("cpu")), torch.arange(2),
                                                              torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, x)


def test_a_cnn_parent_model_checks_its_config_shape(tmp_path):
    config = parse_config(PARENTS["cnn"] + BRANCHES)
    assert config.parent.kind == "cnn" and config.parent.shape_dict == {"widths": [4, 8], "depth": 1}
    model = Model([3072, 4], kind="cnn", shape=config.parent.shape_dict)
    assert [t["name"] for t in config.parent.taps()] == [t["name"] for t in model.feature_info]


def test_a_cnn_parent_on_the_real_six_classes_learns_in_a_few_epochs(real_data_dir, tmp_path, capsys):
    """Three epochs of the default CNN recipe (the full recipe's figures are in docs/kinds.md)."""
    config = REPO_ROOT / "configs" / "cifar100-6-cnn.toml"
    argv = ["run", "--config", str(config), "--data", str(real_data_dir), "--out", str(tmp_path / "out"),
            "--max-epochs", "3", "--quiet", "--no-report", "--no-download", "--device", "cpu"]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["parent"]["test_samples"] == 600 and metrics["device"] == "cpu"
    assert metrics["parent"]["test_accuracy"] > 0.5  # chance: 1/6
    for branch in metrics["branches"].values():
        assert branch["test_accuracy"] > 0.55  # chance: 1/3
    assert "== tree (routed, end to end) ==" in capsys.readouterr().out
