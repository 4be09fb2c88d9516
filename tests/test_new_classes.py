"""Branches that learn classes their parent never saw: config, hold-out, run, routing and predict --node."""

import csv
import json

import numpy as np
import pytest
from reference import branch_logits, load_checkpoint, read_split, softmax

from branching.cli import main as cli
from branching.config.parse import config_from_dict, parse_config
from branching.errors import ConfigError
from branching.tree.checkpoint import load_folder

# small_data_dir has beaver, whale, wolf, sunflower; the parent sees two of them
TREE = """
parent = { classes = ["beaver", "whale"], hidden = [16, 8] }
branches.newcomers = { classes = ["wolf", "sunflower"], new_classes = true, layer = 1, hidden = [6] }
branches.mixed = { classes = ["whale", "wolf"], new_classes = true, layer = 0, hidden = [4] }
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data_dir):
    root = tmp_path_factory.mktemp("new-classes")
    (root / "tree.toml").write_text(TREE)
    argv = ["run", "--config", str(root / "tree.toml"), "--data", str(small_data_dir), "--out", str(root / "out"),
            "--max-epochs", "2", "--quiet", "--no-download", "--seed", "3"]
    assert cli.main(argv) == 0
    return root, small_data_dir


def test_new_class_branches_are_evaluated_alone_and_routing_leaves_them_out(trained):
    root, _ = trained
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    for name in ("newcomers", "mixed"):
        assert metrics["branches"][name]["test_samples"] == 20  # 10 test images of each of its two classes
        assert "parent_head" not in metrics["branches"][name]   # the parent has no head for a class it never saw
    assert set(metrics["tree"]["reached"]) == {"parent"}
    with open(root / "out" / "tree.csv") as f:
        assert {row["path"] for row in csv.DictReader(f)} == {"parent"}


def test_no_node_trains_on_an_image_any_node_validates_on(trained):
    root, data_dir = trained
    _, models = load_folder(root / "out")
    parent = models["parent"]
    held_new = set(parent.meta.new_class_val_rows.tolist())
    for name in ("wolf", "sunflower"):  # 15% of each new class's 40 training images, drawn with the seed
        _, _, rows = read_split(data_dir, "train", [name])
        assert len(held_new & set(rows.tolist())) == 6
    _, _, parent_rows = read_split(data_dir, "train", ["beaver", "whale"])
    assert set(parent.meta.train_rows.tolist()) | set(parent.meta.val_rows.tolist()) == set(parent_rows.tolist())
    validation = set(parent.meta.val_rows.tolist()) | held_new
    for name, model in models.items():
        assert not set(model.meta.train_rows.tolist()) & validation, name
    _, _, newcomer_rows = read_split(data_dir, "train", ["wolf", "sunflower"])
    assert set(models["newcomers"].meta.val_rows.tolist()) == held_new & set(newcomer_rows.tolist())
    _, _, whale = read_split(data_dir, "train", ["whale"])
    _, _, wolf = read_split(data_dir, "train", ["wolf"])
    expected = (set(parent.meta.val_rows.tolist()) & set(whale.tolist())) | (held_new & set(wolf.tolist()))
    assert set(models["mixed"].meta.val_rows.tolist()) == expected  # the same wolf images as newcomers'


def test_predict_node_answers_with_the_branch_alone_as_a_hand_forward_pass_does(trained, tmp_path, capsys):
    root, data_dir = trained
    out = tmp_path / "newcomers.csv"
    assert cli.main(["predict", "--models", str(root / "out"), "--data", str(data_dir), "--node", "newcomers",
                     "--out", str(out)]) == 0
    capsys.readouterr()
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and {r["predicted_class"] for r in rows} <= {"wolf", "sunflower"}
    assert {r["path"] for r in rows} == {"parent > newcomers"}
    parent = load_checkpoint(root / "out" / "models" / "parent.pt")
    branch = load_checkpoint(root / "out" / "models" / "newcomers.pt")
    images, _, _ = read_split(data_dir, "test", ["beaver", "whale", "wolf", "sunflower"])
    norm = parent["meta"]["normalization"]
    logits = branch_logits(images, parent, branch, np.asarray(norm["mean"]), np.asarray(norm["std"]))
    probabilities = softmax(logits, branch["meta"]["acceptance"]["temperature"])
    assert [r["predicted_class"] for r in rows] == [["wolf", "sunflower"][i] for i in probabilities.argmax(axis=1)]
    assert np.allclose([float(r["confidence"]) for r in rows], probabilities.max(axis=1), atol=1e-5)
    accepted = probabilities.max(axis=1) >= branch["meta"]["acceptance"]["threshold"]
    assert [int(r["accepted"]) for r in rows] == accepted.astype(int).tolist()


def test_predict_node_unknown_name_is_a_one_line_error(trained, capsys):
    root, data_dir = trained
    assert cli.main(["predict", "--models", str(root / "out"), "--data", str(data_dir), "--node", "nope"]) != 0
    err = capsys.readouterr().err.strip()
    assert "unknown node 'nope'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("text, expected", [
    ('branches.b = { classes = ["wolf", "sunflower"] }', "set new_classes = true"),
    ('branches.b = { classes = ["beaver", "whale"], new_classes = true }', "remove new_classes"),
    ('branches.b = { classes = ["wolf", "sunflower"], new_classes = "yes" }', "new_classes: must be true or false"),
])
def test_new_classes_must_be_declared_and_only_where_needed(text, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_config('parent = { classes = ["beaver", "whale"] }\n' + text)


@pytest.mark.parametrize("classes, expected", [
    ('["wolff", "sunflower"]', "unknown CIFAR-100 class 'wolff'; did you mean 'wolf'"),
    ('["wolf", "oak_tree"]', "has no images of 'oak_tree'"),
])
def test_a_new_class_missing_from_the_data_is_an_error_before_training(classes, expected, tmp_path, small_data_dir,
                                                                        capsys):
    (tmp_path / "tree.toml").write_text(f'parent = {{ classes = ["beaver", "whale"] }}\n'
                                        f'branches.b = {{ classes = {classes}, new_classes = true }}\n')
    code = cli.main(["run", "--config", str(tmp_path / "tree.toml"), "--data", str(small_data_dir), "--out",
                     str(tmp_path / "out"), "--no-download", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_siblings_may_share_classes_when_one_is_standalone_and_it_round_trips():
    config = parse_config(TREE)
    assert config.standalone("newcomers") and not config.standalone("parent")
    assert list(config.routed().branches) == []
    assert config.classes() == ("beaver", "whale", "wolf", "sunflower")
    assert config_from_dict(config.to_dict()).branches == config.branches


def test_predict_branch_routes_from_a_branch_of_new_classes(trained, tmp_path, capsys):
    root, data_dir = trained
    answers = {}
    for flag in ("--node", "--branch"):
        out = tmp_path / f"{flag[2:]}.csv"
        assert cli.main(["predict", "--models", str(root / "out"), "--data", str(data_dir), flag, "newcomers",
                         "--out", str(out)]) == 0
        with open(out) as f:
            answers[flag] = [(r["predicted_class"], r["path"], r["accepted"]) for r in csv.DictReader(f)]
    capsys.readouterr()
    assert answers["--branch"] == answers["--node"]  # newcomers has no branches: routing from it is it alone
    assert {path for _, path, _ in answers["--branch"]} == {"parent > newcomers"}


def test_routing_from_a_branch_below_a_branch_of_new_classes_keeps_its_chain(trained):
    config = parse_config(TREE + 'branches.wild = { from = "newcomers", classes = ["wolf", "sunflower"], '
                                 'layer = 0, hidden = [3] }\n')
    assert config.standalone("wild") and "wild" not in config.routed().branches
    assert config.routed("wild").chain("wild") == ["parent", "newcomers", "wild"]
    assert set(config.routed("newcomers").branches) == {"newcomers", "wild"}


def test_from_an_entry_branch_only_its_classes_count_as_answerable(trained):
    from branching.tree.routing import TreePredictor
    root, _ = trained
    assert TreePredictor.load(root / "out", entry="newcomers").answerable == ("wolf", "sunflower")
    assert TreePredictor.load(root / "out").answerable == ("beaver", "whale")
