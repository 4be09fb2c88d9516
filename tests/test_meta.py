"""The model files' schema (branching.models.meta): what a file holds on disk, read back typed; files of the
schema before it are read, files of a later one and damaged ones refused in one line before any work."""

import re

import numpy as np
import pytest
import torch

from branching.cli.main import main
from branching.config.recipes import get_recipe
from branching.errors import CheckpointError
from branching.models.meta import META_SCHEMA, JudgeMeta, NodeMeta, meta_to_dict
from branching.models.model import Model
from branching.train.run import run
from branching.tree.checkpoint import ModelStore, load_folder

FIELDS = {"parent": {"kind", "name", "classes", "hidden", "seed", "recipe", "history", "acceptance",
                     "acceptance_note", "augmentation", "tree", "train_rows", "val_rows", "fingerprint",
                     "normalization"},
          "branch": {"kind", "name", "classes", "hidden", "seed", "recipe", "history", "acceptance",
                     "acceptance_note", "augmentation", "tree", "train_rows", "val_rows", "fingerprint", "source",
                     "layer", "where", "pool", "tap", "source_fingerprint", "parent_fingerprint", "validation"}}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, small_config, small_data_dir):
    """The small tree run for one epoch a node, seed 0."""
    out = tmp_path_factory.mktemp("meta") / "run"
    metrics = run(small_config, small_data_dir, out, get_recipe("default", 1), seed=0, progress=False, report=False,
                  echo=lambda *a: None)
    return out, metrics


def test_a_trained_tree_writes_its_meta_as_plain_data_of_this_schema(small_run):
    out, _ = small_run
    for name, node in (("parent", "parent"), ("mammals", "branch")):
        raw = torch.load(out / "models" / f"{name}.pt", weights_only=True)  # what any reader of the file sees
        assert raw["meta_schema"] == META_SCHEMA
        assert set(raw["meta"]) >= FIELDS[node] - {"acceptance_note"} and "path" not in raw["meta"]
        assert isinstance(raw["meta"]["train_rows"], torch.Tensor) and raw["meta"]["train_rows"].dtype == torch.int64
    _, models = load_folder(out / "models")
    meta = models["mammals"].meta
    assert isinstance(meta, NodeMeta) and meta.is_branch and meta.read[0] == "parent"
    assert meta.path == str(out / "models" / "mammals.pt") and meta.train_rows.dtype == np.int64
    assert meta.parent_fingerprint == models["parent"].fingerprint() == models["parent"].meta.fingerprint


def _rewrite(path, change):
    """A copy of a model file with its payload changed by `change` (the fingerprint stays valid: weights untouched)."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def _copy_models(out, tmp_path):
    copy = tmp_path / "models"
    copy.mkdir()
    for p in (out / "models").glob("*.pt"):
        (copy / p.name).write_bytes(p.read_bytes())
    return copy


def test_a_file_of_the_schema_before_it_had_a_number_is_read(small_run, tmp_path):
    """Schema 1: no meta_schema; the temperature apart in "calibration"; a frozen parent's files flat."""
    out, _ = small_run
    copy = _copy_models(out, tmp_path)
    _, models = load_folder(copy)
    acceptance = models["mammals"].meta.acceptance

    def as_schema_1(payload):
        del payload["meta_schema"]
        meta = payload["meta"]
        a = meta["acceptance"]
        meta["calibration"] = {"temperature": a.pop("temperature"), "calibrated": a.pop("calibrated"),
                               **a.pop("calibration")}
        meta["weights"], meta["weights_sha256"] = "w.pt", "ab" * 32

    _rewrite(copy / "mammals.pt", as_schema_1)
    _, old = load_folder(copy)
    assert old["mammals"].meta.acceptance == acceptance
    assert old["mammals"].meta.files == {"weights": "w.pt", "weights_sha256": "ab" * 32}


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(meta_schema=META_SCHEMA + 1),
     rf"written by a newer branching \(model-file schema {META_SCHEMA + 1}; this one reads up to {META_SCHEMA}\); "
     r"update branching"),
    (lambda p: p.update(meta_schema="2"), r"its meta_schema '2' is not a schema version"),
    (lambda p: p["meta"].update(colour="blue"), r"holds keys this schema \(version \d+\) does not know: colour"),
    (lambda p: p["meta"].pop("source"), r"its branch meta lacks source"),
    (lambda p: p["meta"].update(kind="leaf"), r"records kind 'leaf', not 'parent', 'branch' or 'selfeval'"),
    (lambda p: p["meta"].update(val_rows="many"), r"its branch meta is malformed"),
])
def test_a_file_this_schema_cannot_read_is_refused_in_one_line(small_run, tmp_path, capsys, change, message):
    out, _ = small_run
    copy = _copy_models(out, tmp_path)
    _rewrite(copy / "mammals.pt", change)
    with pytest.raises(CheckpointError, match=message) as caught:
        load_folder(copy)
    assert "\n" not in str(caught.value) and str(copy / "mammals.pt") in str(caught.value)
    images = tmp_path / "x.npy"
    np.save(images, np.zeros((1, 3072), np.uint8))
    assert main(["predict", "--models", str(copy), str(images)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err)


def test_meta_to_dict_keeps_the_fields_and_refuses_anything_else():
    judge = JudgeMeta("mammals", [("parent", 1, "pre", "flat")], True, np.zeros(3), np.ones(3), [3])
    d = meta_to_dict(judge)
    assert d["reads"] == [["parent", 1, "pre", "flat"]] and d["kind"] == "selfeval" and "path" not in d
    assert meta_to_dict(None) == {}
    with pytest.raises(TypeError, match="got dict"):
        meta_to_dict({"kind": "parent"})
    with pytest.raises(ValueError, match="kind must be 'parent' or 'branch'"):
        NodeMeta("judge", "x")


def test_a_model_store_records_the_fingerprint_of_what_it_saves(tmp_path):
    model = Model([4, 3, 2], seed=0)
    meta = NodeMeta("parent", "parent", ["a", "b"], normalization={"mean": np.zeros(4), "std": np.ones(4)})
    ModelStore(tmp_path).save("parent", model, meta)
    assert meta.fingerprint is None  # the caller's record is left as it was
    assert ModelStore(tmp_path).load("parent").meta.fingerprint == model.fingerprint()
