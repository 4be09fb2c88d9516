"""The original's six scripts, run in order as subprocesses on a synthetic `c10/` in the official
format, checked against an independent recomputation from the files they wrote (and one refusal,
in-process)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from reference import (FISH, FLOWER, ORIGINAL_CLASSES, branch_logits, file_mode_ok, forward, linear_layers,
                       load_checkpoint, normalise, parse_report, read_split, run_command, script, softmax, toml_table)
from sklearn.metrics import confusion_matrix
from synthetic import make_synthetic

from branching.cli import main as cli  # not `import test_script`: pytest would collect it as a test

TRAINING = ("parent_branch.py", "fish_branch.py", "flower_branch.py")
TESTING = ("parent_test.py", "fishtest.py", "flowertest.py")
MAX_EPOCHS = 2


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """A folder with c10/ in which the six scripts ran in order: (folder, {script: completed process})."""
    root = tmp_path_factory.mktemp("scripts")
    make_synthetic(root / "c10", ORIGINAL_CLASSES, n_train=50, n_test=20, seed=3)
    results = {}
    for name in TRAINING:
        results[name] = run_command([script(name), "--max-epochs", MAX_EPOCHS, "--quiet"], cwd=root)
        assert results[name].returncode == 0, f"{name} failed:\n{results[name].stderr}"
    for name in TESTING:  # as in the original: no arguments at all
        results[name] = run_command([script(name)], cwd=root)
        assert results[name].returncode == 0, f"{name} failed:\n{results[name].stderr}"
    return root, results


@pytest.fixture(scope="session")
def checkpoints(workdir):
    root, _ = workdir
    return {node: load_checkpoint(root / "models" / f) for node, f in
            (("parent", "parent_2.pt"), ("fish", "fishnet_2.pt"), ("flower", "flowernet_2.pt"))}


def normaliser_files(root):
    return np.load(root / "parent_X_mean.npy"), np.load(root / "parent_X_std.npy")


def test_scripts_write_the_original_files(workdir):
    root, results = workdir
    written = ["models/parent_2.pt", "models/fishnet_2.pt", "models/flowernet_2.pt", "parent_X_mean.npy",
               "parent_X_std.npy"]
    for name in written:
        assert (root / name).is_file(), name
        assert file_mode_ok(root / name), f"{name} has mode {oct((root / name).stat().st_mode & 0o777)}"
    assert sorted(p.name for p in (root / "models").iterdir()) == ["fishnet_2.pt", "flowernet_2.pt", "parent_2.pt"]
    for name in TRAINING:
        assert "Traceback" not in results[name].stderr
    mean, std = normaliser_files(root)
    assert mean.shape == std.shape == (3072,) and mean.dtype == std.dtype == np.float32


def test_checkpoints_are_self_describing(checkpoints, workdir):
    root, _ = workdir
    parent, fish, flower = checkpoints["parent"], checkpoints["fish"], checkpoints["flower"]
    assert parent["architecture"] == [3072, 1024, 512, 6]
    assert [w.shape for w, _ in linear_layers(parent)] == [(1024, 3072), (512, 1024), (6, 512)]
    assert parent["meta"]["kind"] == "parent" and parent["meta"]["classes"] == ORIGINAL_CLASSES
    for branch, classes in ((fish, FISH), (flower, FLOWER)):
        assert branch["architecture"] == [512, 256, 3]
        meta = branch["meta"]
        assert meta["kind"] == "branch" and meta["classes"] == classes
        assert (meta["source"], meta["layer"], meta["where"]) == ("parent", 1, "pre")
        assert meta["parent_fingerprint"] == parent["meta"]["fingerprint"]
        assert meta["acceptance"]["threshold"] == pytest.approx(0.96)
    for ckpt in checkpoints.values():
        meta = ckpt["meta"]
        assert meta["seed"] == 0 and meta["recipe"]["name"] == "default"
        # the training settings record the --max-epochs cap that was used
        assert meta["recipe"]["parent"]["epochs"] == meta["recipe"]["branch"]["epochs"] == MAX_EPOCHS
        assert 1 <= meta["history"]["epochs_run"] <= MAX_EPOCHS
        assert ckpt["dropout"] == {"parent": 0.3}.get(meta["kind"], 0.5)

    # normalisation: in the checkpoint, equal to the .npy files and to numpy over the parent's training rows
    mean, std = normaliser_files(root)
    np.testing.assert_array_equal(parent["meta"]["normalization"]["mean"].numpy(), mean)
    np.testing.assert_array_equal(parent["meta"]["normalization"]["std"].numpy(), std)
    images, labels, rows = read_split(root / "c10", "train", ORIGINAL_CLASSES)
    train_rows = parent["meta"]["train_rows"].numpy()
    training = images[np.searchsorted(rows, train_rows)].astype(np.float64)
    np.testing.assert_allclose(mean, training.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, training.std(axis=0), rtol=1e-5)


def test_default_recipe_validates_on_images_the_parent_never_trained_on(checkpoints, workdir):
    root, _ = workdir
    _, labels, rows = read_split(root / "c10", "train", ORIGINAL_CLASSES)
    parent = checkpoints["parent"]["meta"]
    parent_train, parent_val = set(parent["train_rows"].tolist()), set(parent["val_rows"].tolist())
    assert not parent_train & parent_val and parent_train | parent_val == set(rows.tolist())
    val_per_class = np.bincount(labels[np.isin(rows, list(parent_val))], minlength=6)
    assert np.all(np.abs(val_per_class - 0.15 * 50) <= 1)  # stratified 15%
    for name, classes in (("fish", FISH), ("flower", FLOWER)):
        meta = checkpoints[name]["meta"]
        branch_rows = set(read_split(root / "c10", "train", classes)[2].tolist())
        assert set(meta["val_rows"].tolist()) == parent_val & branch_rows
        assert set(meta["train_rows"].tolist()) == parent_train & branch_rows


def test_parent_test_prints_what_an_independent_forward_pass_gives(workdir, checkpoints):
    root, results = workdir
    report = parse_report(results["parent_test.py"].stdout, ORIGINAL_CLASSES)
    images, labels, _ = read_split(root / "c10", "test", ORIGINAL_CLASSES)
    mean, std = normaliser_files(root)
    predicted = forward(normalise(images, mean, std), linear_layers(checkpoints["parent"])).argmax(axis=1)
    assert report["samples"] == len(labels) == 120
    assert report["accuracy"] == pytest.approx(np.mean(predicted == labels), abs=5e-5)
    assert report["accuracy"] > 0.3  # well above chance (1/6) even after two epochs
    expected = confusion_matrix(labels, predicted, labels=range(6))
    np.testing.assert_array_equal(report["confusion_matrix"], expected)
    for i, name in enumerate(ORIGINAL_CLASSES):
        assert report["per_class"][name] == pytest.approx(expected[i, i] / expected[i].sum(), abs=5e-5)
    header = report["matrix_header"]  # columns: the class names (long ones shortened)
    assert len(header) == 6
    assert all(h == c or (len(h) >= 6 and c.startswith(h)) for c, h in zip(ORIGINAL_CLASSES, header))


@pytest.mark.parametrize("name, test_script, classes", [("fish", "fishtest.py", FISH),
                                                        ("flower", "flowertest.py", FLOWER)])
def test_branch_test_prints_what_an_independent_forward_pass_gives(workdir, checkpoints, name, test_script,
                                                                   classes):
    root, results = workdir
    report = parse_report(results[test_script].stdout, classes)
    images, labels, _ = read_split(root / "c10", "test", classes)
    mean, std = normaliser_files(root)
    logits = branch_logits(images, checkpoints["parent"], checkpoints[name], mean, std)
    acceptance = checkpoints[name]["meta"]["acceptance"]
    confidence = softmax(logits, acceptance["temperature"]).max(axis=1)
    predicted, accepted = logits.argmax(axis=1), confidence >= acceptance["threshold"]
    correct = predicted == labels
    assert report["samples"] == len(labels) == 60
    assert report["accuracy"] == pytest.approx(correct.mean(), abs=5e-5)
    assert report["accepted"] == accepted.sum()
    assert report["coverage"] == pytest.approx(accepted.mean(), abs=5e-4)
    if accepted.any():
        assert report["accepted_accuracy"] == pytest.approx(correct[accepted].mean(), abs=5e-5)
    else:
        assert report["accepted_accuracy"] is None
    expected = confusion_matrix(labels, predicted, labels=range(3))
    np.testing.assert_array_equal(report["confusion_matrix"], expected)
    for i, c in enumerate(classes):
        assert report["per_class"][c] == pytest.approx(expected[i, i] / expected[i].sum(), abs=5e-5)


def test_branch_with_another_parent_is_refused(workdir, tmp_path, monkeypatch, capsys):
    """In-process, through the scripts' entry points: a parent retrained with another seed, then fishtest.py."""
    root, _ = workdir
    (tmp_path / "models").mkdir()
    shutil.copy(root / "models" / "fishnet_2.pt", tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    data = ["--data", str(root / "c10")]
    assert cli.train_script("parent", [*data, "--seed", "1", "--max-epochs", "1", "--quiet"]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "models").iterdir()}
    status = cli.test_script("fish", data)
    result = capsys.readouterr()
    assert status == 2
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.err
    assert "retrain the branch" in lines[0] and "fish_branch.py" in lines[0]
    assert "Total Test Samples" not in result.out
    assert {p.name: p.read_bytes() for p in (tmp_path / "models").iterdir()} == before


# ---- any tree: --branch ------------------------------------------------------------------------
# Branches that are neither fish nor flower, one of them a branch of a branch, over the synthetic six
# classes; the scripts run in-process (cli.train_script / cli.test_script are what they call).
OTHER_TREE = (toml_table("parent", classes=ORIGINAL_CLASSES, hidden=[16, 8])
              + toml_table("branches.sea", classes=FISH, layer=1, hidden=[6])
              + toml_table("branches.blooms", classes=FLOWER, layer=1, hidden=[6])
              + toml_table("branches.fins", source="sea", classes=["aquarium_fish", "shark"], layer=0, hidden=[4]))


@pytest.fixture
def other_tree(tmp_path, monkeypatch, synthetic_c10):
    """tmp_path as the working folder, with tree.toml (OTHER_TREE); returns the shared arguments."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tree.toml").write_text(OTHER_TREE)
    return ["--config", "tree.toml", "--data", str(synthetic_c10)]


def test_branch_scripts_train_and_test_any_branch(other_tree, tmp_path, capsys):
    training = [*other_tree, "--max-epochs", "1", "--quiet", "--no-download"]
    assert cli.train_script("parent", training) == 0
    assert cli.train_script("fish", [*training, "--branch", "sea"]) == 0
    assert cli.train_script("flower", [*training, "--branch", "fins"]) == 0  # reads sea's layer 0
    assert cli.train_script("flower", [*training, "--branch", "blooms", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    for name in ("seanet_2.pt", "finsnet_2.pt", "bloomsnet_2.pt"):
        assert f"wrote {Path('models') / name}" in printed
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "bloomsnet_2.pt", "finsnet_2.pt", "parent_2.pt", "seanet_2.pt"]
    fins = load_checkpoint(tmp_path / "models" / "finsnet_2.pt")["meta"]
    assert (fins["kind"], fins["classes"], fins["source"], fins["layer"]) == (
        "branch", ["aquarium_fish", "shark"], "sea", 0)

    for script_default, branch, classes in (("fish", "fins", ["aquarium_fish", "shark"]),
                                            ("flower", "sea", ["crab", "aquarium_fish", "shark"])):
        assert cli.test_script(script_default, [*other_tree, "--branch", branch]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"== {branch} ({branch}net_2.pt) ==")
        report = parse_report(out, classes)
        assert report["samples"] == 20 * len(classes) and "accepted" in report


def test_missing_source_model_names_the_script_and_branch_to_train(other_tree, tmp_path, capsys):
    training = [*other_tree, "--max-epochs", "1", "--quiet", "--no-download"]
    assert cli.train_script("parent", training) == 0
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert cli.train_script("flower", [*training, "--branch", "fins"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no model for 'sea'"), err
    assert "seanet_2.pt" in err and "python flower_branch.py --branch sea --config tree.toml" in err
    assert cli.test_script("fish", [*other_tree, "--branch", "sea"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python fish_branch.py --branch sea --config tree.toml" in err
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == before


@pytest.mark.parametrize("run, default", [(cli.train_script, "fish"), (cli.train_script, "flower"),
                                          (cli.test_script, "fish"), (cli.test_script, "flower")])
def test_default_branch_missing_from_the_tree_says_which_exist(other_tree, tmp_path, capsys, run, default):
    assert run(default, [*other_tree, "--no-download"] if run is cli.train_script else other_tree) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert f"no branch '{default}'" in err and "sea, blooms, fins" in err and "--branch NAME" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree.toml"]


def test_unknown_branch_is_a_one_line_error(other_tree, capsys):
    assert cli.test_script("fish", [*other_tree, "--branch", "shells"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no branch 'shells'" in err and "sea, blooms, fins" in err
