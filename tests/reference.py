"""Independent reference computations for the end-to-end tests.

Nothing here uses the project's code: CIFAR files are read with the plain pickle module (the test
data are trusted), checkpoints with torch.load(weights_only=True), and the forward pass is done by
hand in float64 numpy from the raw weight tensors.
"""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.special
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_CLASSES = ["sunflower", "poppy", "tulip", "crab", "aquarium_fish", "shark"]
FISH = ["crab", "aquarium_fish", "shark"]
FLOWER = ["sunflower", "poppy", "tulip"]


# ---- running commands ------------------------------------------------------------------------

def run_command(args, cwd, timeout=300) -> subprocess.CompletedProcess:
    """Run `python ARGS` in cwd with the repository importable; `args[0]` may be a script path or "-m"."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def script(name: str) -> Path:
    return REPO_ROOT / name


def file_mode_ok(path) -> bool:
    """Files the project writes get the usual permissions (0o666 minus the umask), not mkstemp's 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return (Path(path).stat().st_mode & 0o777) == (0o666 & ~umask)


# ---- data ------------------------------------------------------------------------------------

def read_pickle(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def read_split(data_dir, split, classes):
    """(uint8 images, labels as positions in `classes`, row numbers in the file) of the given classes."""
    data_dir = Path(data_dir)
    names = [n.decode() for n in read_pickle(data_dir / "meta")[b"fine_label_names"]]
    raw = read_pickle(data_dir / split)
    fine = np.asarray(raw[b"fine_labels"])
    wanted = {names.index(c): i for i, c in enumerate(classes)}
    rows = np.array([r for r, f in enumerate(fine.tolist()) if f in wanted], dtype=np.int64)
    labels = np.array([wanted[f] for f in fine[rows].tolist()], dtype=np.int64)
    return np.asarray(raw[b"data"])[rows], labels, rows


# ---- models ----------------------------------------------------------------------------------

def load_checkpoint(path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def linear_layers(checkpoint) -> list:
    """[(W, b)] of every Linear layer in order, as float64 arrays."""
    assert checkpoint["activation"] == "relu"
    state = checkpoint["state_dict"]
    indices = sorted({int(k.split(".")[0]) for k in state if k.endswith(".weight")})
    return [(state[f"{i}.weight"].double().numpy(), state[f"{i}.bias"].double().numpy()) for i in indices]


def forward(x, layers, stop_layer=None, where="post") -> np.ndarray:
    """Logits of the MLP `layers`, or hidden layer `stop_layer` before ("pre") or after ("post") its ReLU."""
    h = np.asarray(x, dtype=np.float64)
    for i, (W, b) in enumerate(layers):
        z = h @ W.T + b
        if i == len(layers) - 1 or (i == stop_layer and where == "pre"):
            return z
        h = np.maximum(z, 0.0)
        if i == stop_layer:
            return h
    raise AssertionError("unreachable")


def normalise(images, mean, std) -> np.ndarray:
    return (np.asarray(images, dtype=np.float64) - np.asarray(mean, dtype=np.float64)) / np.asarray(std, np.float64)


def branch_logits(images, parent_ckpt, branch_ckpt, mean, std) -> np.ndarray:
    """A branch reading the parent's hidden layer meta["layer"] at meta["where"]: logits by hand."""
    meta = branch_ckpt["meta"]
    features = forward(normalise(images, mean, std), linear_layers(parent_ckpt), meta["layer"], meta["where"])
    return forward(features, linear_layers(branch_ckpt))


def softmax(logits, temperature=1.0) -> np.ndarray:
    return scipy.special.softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


# ---- printed reports -------------------------------------------------------------------------

def _percent(text: str):
    return None if text == "n/a" else float(text.rstrip("%")) / 100


def parse_report(text: str, classes) -> dict:
    """The figures of one printed node report (Total Test Samples, Accepted Predictions, ...)."""
    def line(pattern):
        match = re.search(pattern, text, re.MULTILINE)
        return match and match.groups()

    out = {"samples": int(line(r"^Total Test Samples: (\d+)$")[0]),
           "accuracy": _percent(line(r"^Overall Accuracy: ([\d.]+%|n/a)$")[0])}
    accepted = line(r"^Accepted Predictions: (\d+) \(([\d.]+)%\)$")
    if accepted:
        out["accepted"], out["coverage"] = int(accepted[0]), float(accepted[1]) / 100
        out["accepted_accuracy"] = _percent(line(r"^Accuracy on Accepted: ([\d.]+%|n/a)$")[0])
    out["per_class"] = {c: _percent(line(rf"^\s+{re.escape(c)}\s+([\d.]+%|n/a)$")[0]) for c in classes}
    lines = text.splitlines()
    start = next(i for i, s in enumerate(lines) if s.startswith("Confusion matrix"))
    out["matrix_header"] = lines[start + 1].split()
    matrix = []
    for row_text, name in zip(lines[start + 2:start + 2 + len(classes)], classes):
        cells = row_text.split()
        assert cells[0] == name, f"confusion matrix row {row_text!r} is not labelled {name!r}"
        matrix.append([int(v) for v in cells[1:]])
    out["confusion_matrix"] = np.array(matrix)
    return out


# ---- trees shared by several test files -------------------------------------------------------
# Written in TOML's compact form, one node a line (an inline table each), to keep them short.

# Two levels (a branch of a branch): compare, probe-layers and the shared trained tree of conftest.py.
SMALL_TREE_CLASSES = ["beaver", "whale", "wolf", "sunflower"]
SMALL_TREE_N_TRAIN, SMALL_TREE_N_TEST = 40, 10  # images per class in conftest.py's small_data_dir
SMALL_TREE = """
parent = { classes = ["beaver", "whale", "wolf", "sunflower"], hidden = [16, 8] }
branches.mammals = { classes = ["beaver", "whale", "wolf"], layer = 1, hidden = [6] }
branches.water = { from = "mammals", classes = ["beaver", "whale"], layer = 0, hidden = [3] }
"""

# Three levels with mixed pre/post readings, and a class (oak_tree) that no branch takes: routing, the
# inference benchmark, and the trained end-to-end tree of test_deep_tree.py.
DEEP_TREE_CLASSES = ["beaver", "whale", "wolf", "sunflower", "forest", "oak_tree"]
DEEP_TREE = """
parent = { classes = ["beaver", "whale", "wolf", "sunflower", "forest", "oak_tree"], hidden = [32, 16] }
branches.animals = { classes = ["beaver", "whale", "wolf"], layer = 1, where = "pre", hidden = [12, 8] }
branches.water = { from = "animals", classes = ["beaver", "whale"], layer = 0, where = "post", hidden = [6] }
branches.plants = { classes = ["sunflower", "forest"], layer = 0, where = "post", hidden = [5] }
"""


def toml_table(header: str, **keys) -> str:
    """A TOML table of a test's tree: [header], then `key = value` lines (`source` is written as `from`)."""
    lines = [f"[{header}]"] + [f"{'from' if k == 'source' else k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n\n"


FOUR_CLASS_PARENT = toml_table("parent", classes=SMALL_TREE_CLASSES, hidden=[16, 8])
MAMMALS = toml_table("branches.mammals", classes=["beaver", "whale", "wolf"], layer=1, hidden=[6])
WATER = toml_table("branches.water", source="mammals", classes=["beaver", "whale"], layer=0, hidden=[3])


def node_probabilities(models: dict, names, X) -> dict:
    """Each named node's softmax at its fitted temperature, from its own input (the reference the routed
    tree's decisions are checked against)."""
    from branching.models.forward import node_inputs

    return {name: torch.softmax(torch.from_numpy(models[name].logits(node_inputs(models, name, X)))
                                / models[name].meta.acceptance["temperature"], dim=1).numpy() for name in names}

