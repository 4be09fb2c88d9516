"""The command line's own checks: flag values refused by argparse as one-line errors (exit 2, before
anything runs), help, the program name, and the installed `branching` entry point."""

import tomllib

import pytest
from reference import REPO_ROOT, run_command

from branching.cli import main as cli

# every command that takes --max-epochs / --seed, with what else it needs to get past argparse
COMMANDS = {
    "run": (cli.main, ["run"]),
    "compare": (cli.main, ["compare"]),
    "probe-layers": (cli.main, ["probe-layers"]),
    "parent_branch.py": (lambda argv: cli.train_script("parent", argv), []),
    "fish_branch.py": (lambda argv: cli.train_script("fish", argv), []),
}
SEEDED = ("run", "probe-layers", "parent_branch.py", "fish_branch.py")


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: "), captured.err
    return captured.err


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_max_epochs_below_one_is_a_usage_error(command, value, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main, words = COMMANDS[command]
    assert main([*words, "--max-epochs", value, "--data", "absent", "--no-download"]) == 2
    assert "argument --max-epochs: must be" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", SEEDED)
def test_negative_seed_is_a_usage_error(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main, words = COMMANDS[command]
    assert main([*words, "--seed", "-1", "--data", "absent", "--no-download"]) == 2
    err = one_line_error(capsys)
    assert "argument --seed: must be a whole number from 0 to 4294967295, got -1" in err and "--help" in err
    assert list(tmp_path.iterdir()) == []


def test_flags_are_not_abbreviated_and_seed_goes_without_seeds(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--max-ep", "1"]) == 2
    assert "unrecognized arguments: --max-ep" in capsys.readouterr().err
    assert cli.main(["run", "--seed", "3", "--seeds", "0,1", "--config", str(REPO_ROOT / "configs" / "original.toml")]) == 2
    assert "--seed and --seeds: give one" in capsys.readouterr().err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_is_a_usage_error_and_cpu_is_fine(capsys, tmp_path, monkeypatch):
    from branching.models.device import resolve_device

    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--device", "cuda", "--data", "absent"]) == 2
    err = one_line_error(capsys)
    assert "argument --device: no CUDA device here" in err and "use cpu or auto" in err
    assert cli.main(["run", "--device", "tpu", "--data", "absent"]) == 2
    assert "must be auto, cpu or cuda" in one_line_error(capsys)
    assert str(resolve_device("auto")) == "cpu"


def test_predict_batch_size_below_one_is_a_usage_error(capsys):
    assert cli.main(["predict", "--models", "absent", "x.png", "--batch-size", "0"]) == 2
    assert "argument --batch-size: must be at least 1, got 0; see branching predict --help" in one_line_error(capsys)


def test_usage_errors_name_the_command(capsys):
    assert cli.main(["run", "--recipe", "fancy"]) == 2
    assert "argument --recipe: invalid choice: 'fancy'" in (err := one_line_error(capsys))
    assert err.rstrip().endswith("see branching run --help")
    assert cli.main(["run", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in one_line_error(capsys)
    assert cli.main([]) == 2
    one_line_error(capsys)


def test_help_returns_zero_and_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: branching ")
    for command in ("run", "predict", "compare", "probe-layers"):
        assert command in out
    assert cli.main(["probe-layers", "--help"]) == 0
    out = capsys.readouterr().out
    assert "seed of the parent trained without --models" in out and "cap the epochs of that parent" in out


def test_every_command_dispatches_through_argparse():
    parser = cli.build_parser()
    for words, handler in ((["run"], "cmd_run"), (["compare"], "cmd_compare"),
                           (["probe-layers"], "cmd_probe_layers"), (["predict", "--models", "m"], "cmd_predict")):
        assert parser.parse_args(words).func.__name__ == handler


def test_python_dash_m_names_itself_so(tmp_path):
    result = run_command(["-m", "branching", "run", "--seed", "-1"], cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "see python -m branching run --help" in result.stderr
    assert run_command(["-m", "branching", "--help"], cwd=tmp_path, timeout=120).stdout.startswith(
        "usage: python -m branching ")


def test_the_installed_command_is_cli_main():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"branching": "branching.cli.main:main"}
    assert "torch>=2.1" in project["dependencies"] and any(d.startswith("tabulate") for d in project["dependencies"])
    requirements = (REPO_ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in requirements and requirements[-1] == "-e ."
