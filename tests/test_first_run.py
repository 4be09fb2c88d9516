"""A first run explains itself: --help shows the defaults, --version, what a run will train and which files
to open, a node that accepts too little says how to change it, predict shows the threshold it compared with
and the path as far as the node that answered, "did you mean", and the small messages that say what is wrong."""

import csv
import re

import pytest
from PIL import Image
from reference import FOUR_CLASS_PARENT, MAMMALS, SMALL_TREE, WATER

from branching import __version__
from branching.cli.main import main
from branching.config.parse import parse_config
from branching.data.cifar import load_split
from branching.tree.checkpoint import load_folder

EPOCHS = ["--max-epochs", "1", "--quiet", "--no-download", "--seed", "0"]


def last_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, small_data_dir, small_tree_file):
    """The small tree, one epoch a node: with the recipe's threshold 0.96 its nodes accept almost nothing."""
    out = tmp_path_factory.mktemp("first-run") / "out"
    assert main(["run", "--config", str(small_tree_file), "--data", str(small_data_dir), "--out", str(out),
                 *EPOCHS]) == 0
    return out


def test_help_shows_every_default(capsys):
    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    for flag, default in (("--data DATA", "c10"), ("--out OUT", "runs/latest"), ("--device DEVICE", "auto"),
                          ("--recipe", "default")):
        shown = text.split(flag, 1)[1].split(" --", 1)[0]
        assert "default" in shown and default in shown, (flag, shown)
    assert main(["predict", "--help"]) == 0
    assert "(default test)" in " ".join(capsys.readouterr().out.split())


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert __version__ in out and "torch" in out
    assert main([]) == 2  # no command: a one-line error that lists them
    listed = last_error(capsys)
    assert listed.startswith("error: give a command:")
    assert all(command in listed for command in ("run", "predict", "compare", "probe-layers", "selfeval"))


def test_a_run_says_what_it_trains_and_what_to_open(tmp_path, small_data_dir, small_tree_file, capsys):
    out = tmp_path / "out"
    assert main(["run", "--config", str(small_tree_file), "--data", str(small_data_dir), "--out", str(out),
                 *EPOCHS]) == 0
    captured = capsys.readouterr()
    assert "training 3 nodes on cpu (seed 0, recipe default):" in captured.err
    assert re.search(r"parent: a mlp on 4 classes, up to 1 epoch\b", captured.err)
    assert "water: 2 classes, reading mammals at layer 0, up to 1 epoch" in captured.err
    assert f"open {out / 'report.html'}" in captured.out and str(out / "plots") in captured.out


def test_a_node_that_accepts_little_says_how_to_accept_more(small_run, small_tree_file, capsys):
    import json

    metrics = json.loads((small_run / "metrics.json").read_text())
    notes = metrics["notes"]
    config = parse_config(small_tree_file.read_text())
    for name, note in notes.items():  # each note's share is the node's own on its validation images
        node = metrics["parent"] if name == "parent" else metrics["branches"][name]
        rule = node.get("acceptance") or {}
        assert f"[{'parent' if name == 'parent' else 'branches.' + name}.accept]" in note
        if rule.get("rule"):
            share = rule["validation"]["coverage"] if rule["threshold"] is not None else 0.0
            assert f"only {100 * share:.1f}% of its {rule['validation']['samples']} validation images" in note
        assert 'rule = "coverage"' in note and "coverage = 0.8" in note
    low = [n for n in config.branches if metrics["branches"][n]["acceptance"]["validation"]["coverage"] < 0.25]
    assert low and set(low) <= set(notes)
    report = (small_run / "report.md").read_text()
    assert "## Needs attention" in report
    for name, note in notes.items():  # the prose, then the TOML lines as a block that pastes into the tree
        prose, *lines = note.split("\n")
        assert prose in report and "```toml\n" + "\n".join(line.strip() for line in lines) + "\n```" in report
        tree = FOUR_CLASS_PARENT + MAMMALS + WATER  # small_tree_file's tree, in tables a user adds to
        assert parse_config(tree).to_dict() == config.to_dict()
        fixed = parse_config(tree + "\n".join(line.strip() for line in lines) + "\n")
        node = fixed.parent if name == "parent" else fixed.branches[name]
        assert node.accept.rule == "coverage" and node.accept.coverage == 0.8


def test_predict_shows_the_threshold_and_the_path_up_to_the_node_that_rejected(small_run, small_data_dir, tmp_path,
                                                                                capsys):
    out_csv = tmp_path / "p.csv"
    assert main(["predict", "--models", str(small_run), "--data", str(small_data_dir), "--out", str(out_csv)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    config, models = load_folder(small_run)
    thresholds = {}
    for name, model in models.items():
        acceptance = model.meta.acceptance
        thresholds[name] = acceptance["threshold"]
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == len(lines) == len(load_split(small_data_dir, "test").fine_labels)
    rejected = [r for r in rows if r["rejected_at"]]
    assert rejected
    for row, line in zip(rows, lines):
        path = row["path"].split(" > ")
        if row["rejected_at"]:
            assert path[-1] == row["rejected_at"]
            assert f"is below its threshold {thresholds[row['rejected_at']]:.4f}" in line
        assert float(row["threshold"]) == pytest.approx(thresholds[path[-1]])
        assert f"path {row['path']} " in line


def test_predict_reads_a_folder_of_images(small_run, small_data_dir, tmp_path, capsys):
    split = load_split(small_data_dir, "test")
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(split.images[i].reshape(3, 32, 32).transpose(1, 2, 0)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    assert main(["predict", "--models", str(small_run), str(tmp_path / "photos")]) == 0
    captured = capsys.readouterr()
    assert [line.split(":")[0] for line in captured.out.strip().splitlines()] == \
        [str(folder / f"{i}.png") for i in range(3)]
    assert "ignored 1 files" in captured.err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--models", str(small_run), str(empty)]) == 2
    assert "a folder with no PNG or JPEG images" in last_error(capsys)


def test_did_you_mean(small_run, capsys, tmp_path):
    assert main(["run", "--max-epoch", "1"]) == 2
    assert "(did you mean '--max-epochs'?)" in last_error(capsys)
    assert main(["predict", "--models", str(small_run), "--node", "mamals", "x.png"]) == 2
    assert "unknown node 'mamals' (did you mean 'mammals'?)" in last_error(capsys)
    bad = tmp_path / "bad.toml"
    bad.write_text(SMALL_TREE.replace('classes = ["beaver", "whale"]', 'classes = ["beaver", "whael"]'))
    assert main(["run", "--config", str(bad), "--data", "absent", *EPOCHS]) == 2
    assert "'whael' not among the classes of source 'mammals' (the source has 'whale': spell" in last_error(capsys)
    assert main(["run", "--max-epoch", "1", "--confg", "x"]) == 2  # every misspelt flag, from the command's own
    assert "(did you mean '--max-epochs' for '--max-epoch', '--config' for '--confg'?)" in last_error(capsys)
    assert main(["probe-layers", "--out", "x"]) == 2
    assert "(probe-layers has no flag --out); see branching probe-layers --help" in last_error(capsys)
    assert main(["prdict"]) == 2
    assert "(did you mean 'predict'?)" in last_error(capsys)
    assert main(["predict", "--models", str(small_run), "--branch", "mamals", "x.png"]) == 2
    assert "--branch mamals: no such branch (did you mean 'mammals'?)" in last_error(capsys)


def test_small_messages_say_what_is_wrong(small_run, small_data_dir, tmp_path, capsys):
    assert main(["predict", "--models", str(tmp_path / "nowhere"), "--data", str(small_data_dir)]) == 2
    assert f"--models {tmp_path / 'nowhere'} does not exist" in last_error(capsys)
    a_file = tmp_path / "data.bin"
    a_file.write_bytes(b"x")
    assert main(["run", "--data", str(a_file), "--out", str(tmp_path / "o"), *EPOCHS]) == 2
    assert f"--data {a_file} is a file, not a folder" in last_error(capsys)
    other = tmp_path / "other.toml"
    other.write_text(SMALL_TREE.replace('hidden = [6]', 'hidden = [7]').replace(
        'classes = ["beaver", "whale", "wolf"], layer', 'classes = ["whale", "beaver", "wolf"], layer'))
    assert main(["predict", "--models", str(small_run), "--config", str(other), "--data", str(small_data_dir)]) == 2
    assert "leave out --config to use the tree the models record" in last_error(capsys)
    bigger = tmp_path / "bigger.toml"  # a tree with a node the run never trained
    bigger.write_text(SMALL_TREE + 'branches.pair = { from = "water", classes = ["beaver", "whale"], layer = 0, hidden = [2] }\n')
    assert main(["predict", "--models", str(small_run), "--config", str(bigger), "--data", str(small_data_dir)]) == 2
    error = last_error(capsys)
    assert "no model for node 'pair'" in error and "leave out --config" in error
    asks_more = tmp_path / "asks-more.toml"  # the same tree, another rule: rules are fitted at training
    asks_more.write_text(FOUR_CLASS_PARENT + MAMMALS + WATER + '[parent.accept]\nrule = "coverage"\ncoverage = 0.5\n')
    assert main(["predict", "--models", str(small_run), "--config", str(asks_more), "--data", str(small_data_dir)]) == 2
    error = last_error(capsys)
    assert "fitted its acceptance for the recipe default, but the config asks" in error and "leave out --config" in error
    for command in (["predict", "--models", str(small_run), "--data", str(a_file)],
                    ["init", "--data", str(a_file), "--out", str(tmp_path / "t.toml")]):
        assert main(command) == 2
        assert f"--data {a_file} is a file, not a folder" in last_error(capsys)


def test_probe_layers_reads_the_tree_its_models_record(small_run, small_data_dir, capsys):
    assert main(["probe-layers", "--models", str(small_run), "--data", str(small_data_dir), "--quiet",
                 "--no-download"]) == 0
    out = capsys.readouterr().out
    assert "mammals" in out and "water" in out and "fish" not in out  # not the default config's tree
