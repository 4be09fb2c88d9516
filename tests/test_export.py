"""`branching export`: one ONNX graph of a tree, run by onnxruntime, answering as the PyTorch tree does at any batch
size; its outputs checked against each node run by hand; what does not export, and files that are not a tree's."""

import csv
import json

import numpy as np
import onnx
import onnxruntime
import pytest
from reference import node_probabilities

import branching
from branching.api.export import TOLERANCE
from branching.cli import main as cli
from branching.data.cifar import load_split
from branching.errors import CheckpointError, ConfigError
from branching.tree.checkpoint import load_folder

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_tree_file, small_data_dir):
    """The small tree (three epochs a node, seed 0) and its graph, written by the command."""
    root = tmp_path_factory.mktemp("export")
    assert cli.main(["run", "--config", str(small_tree_file), "--data", str(small_data_dir), "--out", str(root / "out"),
                     "--max-epochs", "3", "--quiet", "--no-report", "--no-download"]) == 0
    assert cli.main(["export", "--models", str(root / "out"), "--out", str(root / "tree.onnx")]) == 0
    return root / "out", root / "tree.onnx", load_split(small_data_dir, "test").images


def assert_same_answers(run, graph, images, batch_size=1024, tolerance=TOLERANCE):
    """The .onnx tree answers as the run's: the same class, acceptance, path and node; scores within TOLERANCE."""
    ours, theirs = branching.load(run, "cpu"), branching.load(graph)
    a, b = ours(images, batch_size), theirs(images, batch_size)
    assert len(a) == len(b) == len(images)
    for x, y in zip(a, b):
        assert (x.guess, x.accepted, x.path, x.node, x.threshold) == (y.guess, y.accepted, y.path, y.node, y.threshold)
        assert abs(x.score - y.score) <= tolerance
    assert np.abs(ours.predict_proba(images) - theirs.predict_proba(images, batch_size)).max() <= tolerance


def test_the_graph_answers_as_the_tree_does_at_any_batch_size(exported):
    run, graph, images = exported
    for batch_size in (1, 7, 1024):
        assert_same_answers(run, graph, images, batch_size)


def test_its_outputs_are_each_nodes_probabilities_computed_by_hand(exported):
    run, graph, images = exported
    config, models = load_folder(run)
    X = branching.load(run, "cpu").predictor.root.normalizer.transform(images.astype(np.float32))
    session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["probs.parent", "probs.mammals", "probs.water", "logits.parent", "logits.mammals", "logits.water"]
    found = session.run(None, {"pixels": images.astype(np.float32)})
    by_hand = node_probabilities(models, ["parent", "mammals", "water"], X)
    for name, value in zip(names[:3], found[:3]):
        np.testing.assert_allclose(value, by_hand[name.split(".")[1]], atol=1e-5)
    meta = json.loads({p.key: p.value for p in onnx.load(str(graph)).metadata_props}["branching.tree"])
    assert meta["classes"] == list(config.classes()) and "path" not in meta["config"]
    assert [n["threshold"] for n in meta["nodes"]] == [models[n].meta.acceptance["threshold"]
                                                       for n in ("parent", "mammals", "water")]


def test_files_that_are_not_an_exported_tree_are_refused(exported, tmp_path):
    _, graph, _ = exported
    plain = onnx.load(str(graph))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "other.onnx"))
    with pytest.raises(CheckpointError, match="is not a tree written by branching export"):
        branching.load(tmp_path / "other.onnx")
    (tmp_path / "cut.onnx").write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not an ONNX graph onnxruntime can load"):
        branching.load(tmp_path / "cut.onnx")
    with pytest.raises(CheckpointError, match="no such file"):
        branching.load(tmp_path / "none.onnx")
    with pytest.raises(ConfigError, match="answers as the whole routed tree"):
        branching.load(graph, node="mammals")


def test_predict_and_threads_read_the_graph_and_export_refuses_it(exported, small_data_dir, tmp_path, capsys):
    run, graph, images = exported
    assert cli.main(["predict", "--models", str(graph), "--data", str(small_data_dir), "--out", str(tmp_path / "g.csv")]) == 0
    assert cli.main(["predict", "--models", str(run), "--data", str(small_data_dir), "--out", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "g.csv").read_text().count("\n") == len(images) + 1
    for row_graph, row_run in zip(*(csv.DictReader((tmp_path / f).open()) for f in ("g.csv", "r.csv"))):
        assert row_graph["predicted_class"] == row_run["predicted_class"] and row_graph["path"] == row_run["path"]
    (tmp_path / "g.csv").unlink(), (tmp_path / "r.csv").unlink()
    from PIL import Image
    for i in range(3):
        Image.fromarray(images[i].reshape(3, 32, 32).transpose(1, 2, 0)).save(tmp_path / f"{i}.png")
    capsys.readouterr()
    assert cli.main(["predict", "--models", str(graph), str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = branching.load(run, "cpu")(sorted(tmp_path.glob("*.png")))
    assert len(lines) == 3 and all(f"path {' > '.join(a.path)}" in line for line, a in zip(lines, ours))
    assert cli.main(["export", "--models", str(graph), "--out", str(tmp_path / "again.onnx")]) == 2
    assert "an exported graph already; export from the run's folder" in capsys.readouterr().err
    tree = branching.load(graph)  # one session, threads at once: each its own answers
    from concurrent.futures import ThreadPoolExecutor
    parts = [images[i::4] for i in range(4)]
    alone = [tree.predict_proba(p) for p in parts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: tree.predict_proba(p, batch_size=3), parts * 3))
    assert all(np.allclose(t, alone[i % 4], atol=1e-6) for i, t in enumerate(together))


def test_export_usage_errors_leave_nothing(exported, tmp_path, capsys):
    run, _, _ = exported
    assert cli.main(["export", "--models", str(run), "--out", str(tmp_path / "tree.pt")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
    assert cli.main(["export", "--models", str(tmp_path / "none"), "--out", str(tmp_path / "t.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["export", "--models", str(run), "--out", str(tmp_path / "new" / "t.onnx")]) == 0  # its folder made
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["t.onnx"]


def test_a_judged_tree_does_not_export_and_says_why(tmp_path, small_data_dir, capsys):
    from test_selfeval import JUDGED_TREE

    (tmp_path / "tree.toml").write_text(JUDGED_TREE)
    assert cli.main(["run", "--config", str(tmp_path / "tree.toml"), "--data", str(small_data_dir), "--out",
                     str(tmp_path / "out"), "--max-epochs", "1", "--quiet", "--no-report", "--no-download"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--models", str(tmp_path / "out"), "--out", str(tmp_path / "t.onnx")]) == 2
    err = capsys.readouterr().err
    assert "water accept by a self-evaluation branch, which does not export" in err and len(err.splitlines()) == 2
    assert not (tmp_path / "t.onnx").exists()
