"""Bad input through `python -m branching run` and the scripts: exit status 2, one line on stderr
starting with "error:", no traceback, and nothing written.

Each case runs in-process through the entry point the command calls (branching.cli.main's main, train_script
or test_script); a few also run as real subprocesses, so that `python -m branching` and the script files
themselves are covered down to the exit status."""

import pickle
import shutil

import numpy as np
import pytest
from reference import ORIGINAL_CLASSES, REPO_ROOT, run_command, script

from branching.cli import main as cli  # not `import test_script`: pytest would collect it as a test
from branching.models.meta import NodeMeta
from branching.models.model import Model
from branching.tree.checkpoint import ModelStore

ORIGINAL_TOML = (REPO_ROOT / "configs" / "original.toml").read_text()


def edited_config(old, new):
    assert old in ORIGINAL_TOML
    return ORIGINAL_TOML.replace(old, new, 1)


def truncate_train(root):
    train = root / "c10" / "train"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])


def wrong_shape_train(root):
    images = np.zeros((10, 1024), dtype=np.uint8)  # one channel instead of three
    with open(root / "c10" / "train", "wb") as f:
        pickle.dump({b"data": images, b"fine_labels": [82] * 10, b"filenames": [b"x.png"] * 10}, f, protocol=4)


def parent_only(root):
    """A (tiny, untrained) parent in models/ as parent_branch.py names it, and no branch."""
    meta = NodeMeta("parent", "parent", ORIGINAL_CLASSES)
    ModelStore(root / "models", script_names=True).save("parent", Model([3072, 8, 8, 6], seed=0), meta)


# What runs each command in-process: `python -m branching run ...` is main(["run", ...]), a script
# is branching.cli.main's train_script or test_script for its node.
RUN = "-m branching run"
IN_PROCESS = {
    RUN: lambda argv: cli.main(["run", *argv]),
    "parent_branch.py": lambda argv: cli.train_script("parent", argv),
    "flower_branch.py": lambda argv: cli.train_script("flower", argv),
    "fishtest.py": lambda argv: cli.test_script("fish", argv),
}

# (id, command, extra arguments, config text or None, preparation of the folder, substrings of the message)
CASES = [
    ("missing-data-dir", RUN, ["--data", "absent"], None, None, ["no such folder", "absent"]),
    ("missing-data-dir-script", "parent_branch.py", ["--data", "absent"], None, None,
     ["no such folder", "absent"]),
    ("truncated-file", RUN, [], None, truncate_train, ["train", "truncated or corrupt"]),
    ("wrong-shapes", RUN, [], None, wrong_shape_train, ["train", "(10, 1024)", "(N, 3072)"]),
    ("unknown-class", RUN, [], ORIGINAL_TOML.replace('"sunflower"', '"sunflowr"'), None,
     ["'sunflowr'", "did you mean 'sunflower'"]),
    ("branch-outside-parent", RUN, [], edited_config('["crab", "aquarium_fish", "shark"]', '["crab", "lobster"]'),
     None, ["[branches.fish] classes", "'lobster'", "sunflower, poppy"]),
    ("threshold-above-one", RUN, [], ORIGINAL_TOML + "\n[branches.flower.accept]\nthreshold = 1.5\n", None,
     ["[branches.flower.accept] threshold", "(0, 1]"]),
    ("threshold-zero-script", "flower_branch.py", [],
     ORIGINAL_TOML + "\n[branches.flower.accept]\nthreshold = 0\n", None, ["threshold", "(0, 1]"]),
    ("unknown-config-key", RUN, [], edited_config("layer = 1", "layers = 1"), None,
     ["unknown key 'layers'", "[branches.fish]"]),
    ("missing-config", RUN, ["--config", "absent.toml"], None, None, ["config file not found", "absent.toml"]),
    ("unknown-recipe", RUN, ["--recipe", "fancy"], None, None, ["'fancy'", "original"]),
    ("unknown-recipe-script", "parent_branch.py", ["--recipe", "fancy"], None, None, ["'fancy'"]),
    ("missing-models", "fishtest.py", [], None, None, ["no model", "parent_2.pt", "parent_branch.py"]),
    ("missing-branch-model", "fishtest.py", [], None, parent_only,
     ["no model", "fishnet_2.pt", "fish_branch.py"]),
    ("missing-parent-for-branch", "flower_branch.py", [], None, None,
     ["no model", "parent_2.pt", "parent_branch.py"]),
]


def snapshot(folder):
    """Every file under folder with its bytes (what must not change)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# Also run as subprocesses: one through `python -m branching`, one through a script (an argparse error).
END_TO_END = ["missing-data-dir", "unknown-recipe-script"]


def set_up(folder, synthetic_c10, command, extra, config, prepare, expected):
    """Data, models and config in folder for one case; returns (the command's arguments, check), where
    check(exit status, stderr) asserts the one-line refusal and that nothing in folder changed."""
    shutil.copytree(synthetic_c10, folder / "c10")
    (folder / "models").mkdir()
    (folder / "models" / "earlier.pt").write_bytes(b"an earlier file that must stay as it is")
    if prepare is not None:
        prepare(folder)
    models_before = sorted(p.name for p in (folder / "models").iterdir())
    trains = command == RUN or command.endswith("_branch.py")
    args = [*(["--no-download"] if trains else []), *extra]  # test scripts never download
    if config is not None:
        (folder / "tree.toml").write_text(config)
        args += ["--config", "tree.toml"]
    if command == RUN:
        args += ["--out", "out", "--quiet"]
    before = snapshot(folder)

    def check(status, stderr):
        assert status == 2, stderr
        assert "Traceback" not in stderr
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr
        for part in expected:
            assert part in lines[0]
        assert snapshot(folder) == before
        assert sorted(p.name for p in folder.iterdir()) == sorted(["c10", "models", *(["tree.toml"] if config else [])])
        assert sorted(p.name for p in (folder / "models").iterdir()) == models_before

    return args, check


def exit_status(command, args) -> int:
    """Exit status of the command run in-process: what its entry point returns, or argparse's SystemExit code."""
    try:
        return IN_PROCESS[command](args)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("command, extra, config, prepare, expected",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, synthetic_c10, command,
                                                         extra, config, prepare, expected):
    args, check = set_up(tmp_path, synthetic_c10, command, extra, config, prepare, expected)
    monkeypatch.chdir(tmp_path)
    status = exit_status(command, args)
    check(status, capsys.readouterr().err)


@pytest.mark.parametrize("command, extra, config, prepare, expected",
                         [pytest.param(*case[1:], id=case[0]) for case in CASES if case[0] in END_TO_END])
def test_bad_input_through_the_real_entry_points(tmp_path, synthetic_c10, command, extra, config, prepare,
                                                 expected):
    args, check = set_up(tmp_path, synthetic_c10, command, extra, config, prepare, expected)
    program = ["-m", "branching", "run"] if command == RUN else [script(command)]
    result = run_command([*program, *args], cwd=tmp_path, timeout=120)
    check(result.returncode, result.stderr)
