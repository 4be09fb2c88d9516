"""`compare --kshot`: the k images per class, shared by every method, and the curves' outputs."""

import json

import numpy as np
import pytest
from reference import read_split

from branching.cli import main as cli
from branching.config.parse import parse_config
from branching.config.recipes import get_recipe
from branching.data.tree_data import load_tree_data
from branching.errors import ConfigError
from branching.studies.kshot import kshot_mask, parse_kshot
from branching.train.nodes import held_out_rows, train_branch, train_parent

TREE = """
parent = { classes = ["beaver", "whale"], hidden = [16, 8] }
branches.newcomers = { classes = ["wolf", "sunflower"], new_classes = true, layer = 1, hidden = [6] }
"""


@pytest.mark.parametrize("text, expected", [("5,10,all", [5, 10, None]), ("all,3,3", [3, None]), ("7", [7])])
def test_parse_kshot(text, expected):
    assert parse_kshot(text) == expected


@pytest.mark.parametrize("text", ["0,5", "five", "5,,10", "", "-1", "all,x"])
def test_bad_kshot_lists_are_config_errors(text):
    with pytest.raises(ConfigError, match="--kshot must list"):
        parse_kshot(text)


@pytest.fixture(scope="module")
def parent_and_data(small_data_dir):
    config = parse_config(TREE)
    data = load_tree_data(config, small_data_dir)
    parent, meta, _ = train_parent(config, data, get_recipe("default", 1), seed=4, progress=False)
    parent.meta = meta
    return config, data, parent


def test_the_k_images_are_nested_per_seed_and_never_validation_images(parent_and_data, small_data_dir):
    config, data, parent = parent_and_data
    held = held_out_rows(parent)
    masks = {k: kshot_mask(config, data, held, seed=4, k=k) for k in (1, 3, 10)}
    for name in ("wolf", "sunflower"):
        _, _, rows = read_split(small_data_dir, "train", [name])
        training = np.setdiff1d(rows, held)
        assert len(training) == 34  # 40 images, 6 held out
        for k, mask in masks.items():
            assert mask[held].all()                       # validation images stay
            assert mask[training].sum() == k              # k training images of the class
        assert set(np.flatnonzero(masks[1])) <= set(np.flatnonzero(masks[3])) <= set(np.flatnonzero(masks[10]))
    for name in ("beaver", "whale"):  # no branch learns them: all their images stay
        _, _, rows = read_split(small_data_dir, "train", [name])
        assert masks[1][rows].all()
    assert not np.array_equal(masks[3], kshot_mask(config, data, held, seed=5, k=3))  # drawn per seed


def test_a_branch_trained_on_limited_data_sees_exactly_the_k_images(parent_and_data):
    config, data, parent = parent_and_data
    mask = kshot_mask(config, data, held_out_rows(parent), seed=4, k=3)
    model, meta = train_branch(config, "newcomers", {"parent": parent}, data.limited(mask), get_recipe("default", 1),
                               seed=4, progress=False)
    _, _, rows = read_split(data.data_dir, "train", ["wolf", "sunflower"])
    kept = set(rows[mask[rows]].tolist())
    assert set(meta.train_rows.tolist()) == kept - set(held_out_rows(parent).tolist())
    assert len(meta.train_rows) == 6 and len(meta.val_rows) == 12


def test_compare_kshot_writes_the_table_json_and_plot(tmp_path, small_data_dir, capsys):
    (tmp_path / "tree.toml").write_text(TREE)
    out = tmp_path / "cmp"
    assert cli.main(["compare", "--config", str(tmp_path / "tree.toml"), "--data", str(small_data_dir), "--out",
                     str(out), "--seeds", "0,1", "--max-epochs", "1", "--kshot", "2,all", "--quiet",
                     "--no-download"]) == 0
    capsys.readouterr()
    result = json.loads((out / "compare.json").read_text())
    kshot = result["kshot"]
    assert kshot["ks"] == ["2", "all"] and result["setup"]["kshot"] == ["2", "all"]
    rows = kshot["branches"]["newcomers"]
    assert "parent_head" not in rows and "branch_original" not in rows
    assert {"branch", "linear_probe", "taps_concat", "scratch", "finetune"} <= set(rows)
    for row in rows.values():
        assert row["points"]["2"]["images_per_class"] == 2 and row["points"]["all"]["images_per_class"] == 34
        assert [r["accuracy"] for r in row["points"]["all"]["per_seed"]] == row["points"]["all"]["accuracy"]["values"]
    # k = all is compare's own result on every training image
    summary = result["summary"]["branches"]["newcomers"]["branch"]["test_accuracy"]["values"]
    assert rows["branch"]["points"]["all"]["accuracy"]["values"] == summary
    assert "## k-shot curves" in (out / "compare.md").read_text()
    assert (out / "compare-kshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--kshot 2,all" in result["setup"]["command"]
