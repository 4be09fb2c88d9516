"""An adversarial user, end to end: crafted model files, re-runs into the same folder, interrupted runs,
incomplete model folders, bad paths and values, odd images, tampered data, and SIGTERM.

Each case checks what the user sees (one `error:` line, the exit status) and what is left on disk.
"""

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from reference import REPO_ROOT, SMALL_TREE
from synthetic import make_synthetic, write_meta

from branching.cli import main as cli
from branching.data.cifar import load_label_names
from branching.data.download import ensure_cifar100
from branching.data.images import MAX_PIXELS, load_image
from branching.errors import DataError
from branching.models.model import FORMAT, Model
from branching.train import run as pipeline

OTHER_TREE = """
parent = { classes = ["beaver", "whale", "wolf", "sunflower"], hidden = [16, 8] }
branches.pair = { classes = ["beaver", "wolf"], layer = 0, hidden = [4] }
"""


@pytest.fixture
def workspace(tmp_path, small_data_dir):
    """A folder with the small tree's and another tree's configs; `data` is the shared synthetic data."""
    (tmp_path / "small.toml").write_text(SMALL_TREE)
    (tmp_path / "other.toml").write_text(OTHER_TREE)
    return tmp_path, small_data_dir


def run_argv(tmp_path, data, config="small.toml", out="OUT", *extra):
    return ["run", "--config", str(tmp_path / config), "--data", str(data), "--out", str(tmp_path / out),
            "--max-epochs", "1", "--quiet", "--no-report", "--no-download", *extra]


def snapshot(folder):
    """Every file under folder with its sha256: what a user would find there."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Any training from here on fails the test: the errors under test must come before any work."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the input was checked")
    monkeypatch.setattr(pipeline, "train_parent", refuse)
    monkeypatch.setattr(pipeline, "load_tree_data", refuse)


# ---- 1. crafted model files ------------------------------------------------------------------

def test_a_model_file_that_lies_about_its_size_is_refused_without_allocating(tmp_path):
    small = Model([512, 16, 3], seed=0)
    path = tmp_path / "liar.pt"
    torch.save({"format": FORMAT, "architecture": [512, 300000, 3], "activation": "relu", "dropout": None,
                "state_dict": dict(small.net.state_dict()), "meta": {}}, path)
    assert path.stat().st_size < 50_000
    probe = ("import resource, sys\nfrom torchly import Model\nbefore = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "try:\n    Model.load(sys.argv[1])\nexcept ValueError as e:\n    print('refused:', e)\n"
             "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)
    refused, grown_mib = done.stdout.strip().splitlines()
    assert "refused:" in refused and "do not match the declared architecture [512, 300000, 3]" in refused
    assert int(grown_mib) < 200  # building the declared network would take 0.6 GB


def test_a_pickle_that_runs_code_is_refused_without_advising_the_unsafe_load(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    models = tmp_path / "models"
    models.mkdir()
    torch.save({"format": FORMAT, "x": Payload()}, models / "parent.pt")
    assert cli.main(["predict", "--models", str(models), str(tmp_path / "x.png")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "refused" in line and "weights_only=False" not in line and not (tmp_path / "pwned").exists()


# ---- 2. an OUT folder is never mixed -----------------------------------------------------------

def test_a_rerun_with_another_tree_replaces_out_whole(workspace, capsys):
    tmp_path, data = workspace
    assert cli.main(run_argv(tmp_path, data)) == 0
    assert (tmp_path / "OUT" / "models" / "water.pt").exists()
    assert cli.main(run_argv(tmp_path, data, "other.toml")) == 0
    files = snapshot(tmp_path / "OUT")
    assert not any("water" in f or "mammals" in f for f in files), files
    assert {"models/pair.pt", "predictions/pair.csv", "metrics.json"} <= set(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT", "other.toml", "small.toml"]  # nothing stray
    assert cli.main(["predict", "--models", str(tmp_path / "OUT"), "--data", str(data)]) == 0


@pytest.mark.parametrize("command", ["run", "seeds", "compare"])
def test_an_interrupted_rerun_leaves_out_as_it_was(workspace, monkeypatch, capsys, command):
    tmp_path, data = workspace
    if command == "compare":
        argv = ["compare", "--config", str(tmp_path / "small.toml"), "--data", str(data), "--out",
                str(tmp_path / "OUT"), "--seeds", "0", "--max-epochs", "1", "--quiet", "--no-download"]
    else:
        argv = run_argv(tmp_path, data, "small.toml", "OUT", *(["--seeds", "0,1"] if command == "seeds" else []))
    assert cli.main(argv) == 0
    before = snapshot(tmp_path / "OUT")
    calls = []

    def interrupt_late(*args, **kwargs):  # the second seed's tree evaluation, or compare's last step
        calls.append(1)
        if command != "seeds" or len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    import branching.studies.compare as compare
    target = (compare, "write_outputs") if command == "compare" else (pipeline, "evaluate_tree")
    real = getattr(*target)
    monkeypatch.setattr(*target, interrupt_late)
    assert cli.main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert snapshot(tmp_path / "OUT") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT", "other.toml", "small.toml"]


def test_out_holding_other_files_is_refused_and_kept(workspace, capsys, no_training):
    tmp_path, data = workspace
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert cli.main(run_argv(tmp_path, data, out="mine")) == 2
    assert "not a run's output" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# ---- 3. a models folder missing one of its models ------------------------------------------------

def test_predict_refuses_a_models_folder_missing_a_node_of_its_tree(workspace, capsys):
    tmp_path, data = workspace
    assert cli.main(run_argv(tmp_path, data)) == 0
    (tmp_path / "OUT" / "models" / "water.pt").unlink()
    capsys.readouterr()
    assert cli.main(["predict", "--models", str(tmp_path / "OUT"), "--data", str(data)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no model for node 'water'" in line


# ---- 4. errors before work -----------------------------------------------------------------------

def bad_out_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    return ["--out", str(tmp_path / "taken")], "is a file"


def bad_out_under_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    return ["--out", str(tmp_path / "taken" / "OUT")], "cannot write in"


def bad_out_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    return ["--out", str(tmp_path / "link")], "is a symbolic link"


def bad_cache_file(tmp_path):
    (tmp_path / "cache").write_text("x")
    return ["--cache", str(tmp_path / "cache")], "is a file"


def bad_cache_inside_out(tmp_path):
    return ["--cache", str(tmp_path / "OUT" / "cache")], "inside --out"


@pytest.mark.parametrize("extra, expected", [
    (["--seed", "-1"], "must be a whole number from 0 to 4294967295"),
    (["--seed", str(2**32)], "must be a whole number from 0 to 4294967295"),
    (["--seeds", "0,4294967296"], "distinct integers from 0 to 4294967295"),
    (bad_out_file, None), (bad_out_under_file, None), (bad_out_symlink, None), (bad_cache_file, None),
    (bad_cache_inside_out, None),
])
def test_bad_paths_and_values_fail_before_any_work(workspace, capsys, no_training, extra, expected):
    tmp_path, data = workspace
    if callable(extra):
        extra, expected = extra(tmp_path)
    argv = run_argv(tmp_path, data)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert cli.main(argv) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "OUT").exists()


def test_layers_too_large_to_allocate_are_a_config_error(workspace, capsys, no_training):
    tmp_path, data = workspace
    (tmp_path / "huge.toml").write_text('parent = { classes = ["beaver", "whale"], hidden = [1000000000] }\n')
    assert cli.main(run_argv(tmp_path, data, "huge.toml")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "[parent] hidden" in line and "more than the limit" in line


def test_predict_out_that_is_a_folder_fails_before_loading_anything(tmp_path, capsys):
    (tmp_path / "rows.csv").mkdir()
    assert cli.main(["predict", "--models", str(tmp_path / "no-such-models"), "--out", str(tmp_path / "rows.csv"),
                     str(tmp_path / "x.png")]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)


# ---- 5. images -----------------------------------------------------------------------------------

def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, (48, 48)).astype(np.uint8)
    Image.fromarray(grey8).save(tmp_path / "eight.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # the same image, 16 bits
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    np.testing.assert_array_equal(load_image(tmp_path / "sixteen.png"), load_image(tmp_path / "eight.png"))


def test_exif_orientation_is_honoured(tmp_path):
    image = np.zeros((64, 128, 3), np.uint8)
    image[:, :64] = 255  # white on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(image).save(tmp_path / "camera.jpg", exif=exif, quality=95)
    upright = np.rot90(image, k=-1)  # what the camera meant: white on top
    Image.fromarray(np.ascontiguousarray(upright)).save(tmp_path / "upright.png")
    got, want = (load_image(tmp_path / n).reshape(3, 32, 32).astype(int) for n in ("camera.jpg", "upright.png"))
    assert np.abs(got - want).mean() < 3
    assert got[:, :16].mean() > 200 and got[:, 16:].mean() < 50


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS ** 0.5) + 1
    Image.new("L", (side, side)).save(tmp_path / "huge.png")  # compresses to a few kB
    with pytest.raises(DataError, match=r"more than the limit of 89,478,485.*downscale it first"):  # not decoded
        load_image(tmp_path / "huge.png")


# ---- 6. data -------------------------------------------------------------------------------------

def test_a_meta_file_with_permuted_class_names_is_refused(tmp_path):
    bad = make_synthetic(tmp_path / "permuted", ["beaver", "whale"], n_train=2, n_test=1)
    meta = pickle.loads((bad / "meta").read_bytes())
    names = meta[b"fine_label_names"]
    names[4], names[95] = names[95], names[4]  # beaver <-> whale: every beaver would be read as a whale
    (bad / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    with pytest.raises(DataError, match="names fine label 4 'whale', but the official CIFAR-100 name is 'beaver'"):
        load_label_names(bad)
    write_meta(bad / "meta")
    assert load_label_names(bad)[4] == "beaver"


def test_a_failed_download_leaves_nothing(tmp_path):
    url = "http://127.0.0.1:9/cifar-100-python.tar.gz"  # the discard port: nothing listens
    with pytest.raises(DataError, match="could not download"):
        ensure_cifar100(tmp_path / "deep" / "er" / "c10", url=url, progress=False)
    assert list(tmp_path.iterdir()) == []


# ---- 7. SIGTERM ----------------------------------------------------------------------------------

def test_sigterm_is_a_clean_exit_with_nothing_half_written(workspace):
    tmp_path, data = workspace
    argv = [sys.executable, "-m", "branching", *run_argv(tmp_path, data)]
    argv[argv.index("--max-epochs") + 1] = "500"  # long enough to be stopped while training
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    process = subprocess.Popen(argv, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 120
    while "training images" not in seen and time.monotonic() < deadline:  # the parent has started training
        seen += process.stderr.readline()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, seen + err
    assert "terminated" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.toml", "small.toml"]  # no OUT, no temporary folder
