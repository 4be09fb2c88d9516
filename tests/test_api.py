"""The Python API (branching.load, fit, Tree): answers as `branching predict` gives them, inputs of every form
prepared as image files are, probabilities against each node run by hand, one node alone, and bad inputs."""

import warnings

import numpy as np
import pytest
import torch
from api_check import assert_api_answers_as_predict
from PIL import Image
from reference import node_probabilities

import branching
from branching.data.cifar import load_split
from branching.errors import CheckpointError, ConfigError, DataError
from branching.tree.checkpoint import load_folder

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, small_tree_file, small_data_dir):
    """The small tree trained by branching.fit (three epochs a node, seed 0), and PNG files of its test split."""
    root = tmp_path_factory.mktemp("api")
    tree = branching.fit(small_tree_file, small_data_dir, root / "out", seed=0, max_epochs=3, device="cpu",
                         progress=False, report=False)
    test = load_split(small_data_dir, "test")
    pngs = root / "pngs"
    pngs.mkdir()
    for i, row in enumerate(test.images[:24]):
        Image.fromarray(row.reshape(3, 32, 32).transpose(1, 2, 0)).save(pngs / f"{i:02d}.png")
    return tree, root / "out", pngs, test


def test_fit_returns_the_tree_it_wrote(fitted):
    tree, out, _, _ = fitted
    assert (out / "metrics.json").is_file() and tree.nodes == ("parent", "mammals", "water")
    assert tree.classes == ("beaver", "whale", "wolf", "sunflower") and tree.image_size == 32
    assert "nodes=['parent', 'mammals', 'water']" in repr(tree)


def test_answers_equal_predicts_item_for_item_whatever_form_the_images_take(fitted, tmp_path, capsys):
    _, out, pngs, test = fitted
    files = sorted(pngs.glob("*.png"))
    hwc = [np.array(Image.open(f)) for f in files]
    forms = [files, [Image.open(f) for f in files], hwc, np.stack(hwc), [torch.from_numpy(a).permute(2, 0, 1) for a in hwc],
             [torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in hwc], test.images[:24]]
    answers = [assert_api_answers_as_predict(out, [pngs], form, tmp_path / f"{i}.json", capsys)
               for i, form in enumerate(forms)]
    assert all(a == answers[0] for a in answers)


def test_a_split_through_predict_data_and_its_pixel_rows_through_the_api(fitted, small_data_dir, tmp_path, capsys):
    _, out, _, test = fitted
    answers = assert_api_answers_as_predict(out, ["--data", small_data_dir], test.images, tmp_path / "split.json", capsys)
    assert len(answers) == len(test.images)


def test_an_image_of_any_size_and_mode_is_prepared_as_its_file_is(fitted, tmp_path):
    tree = fitted[0]
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (50, 70, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (90, 41), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    by_file = tree.predict_proba([tmp_path / "rgba.png", tmp_path / "grey.png"])
    for form in ([Image.fromarray(rgba), Image.fromarray(grey)], [rgba, grey],
                 [torch.from_numpy(rgba).permute(2, 0, 1), torch.from_numpy(grey)[None]]):
        np.testing.assert_array_equal(tree.predict_proba(form), by_file)
    # 32-bit integer grey (mode "I"): its 8-bit values as they are, 16-bit ones scaled by 257
    eight, sixteen = Image.fromarray(grey.astype(np.int32)), Image.fromarray(grey.astype(np.int32) * 257)
    assert eight.mode == sixteen.mode == "I"
    np.testing.assert_array_equal(tree.predict_proba([eight, sixteen]), by_file[[1, 1]])


def test_predict_proba_is_the_answering_nodes_softmax_computed_by_hand(fitted):
    tree, out, _, test = fitted
    proba = tree.predict_proba(test.images)
    answers = tree(test.images)
    _, models = load_folder(out)
    X = tree.predictor.root.normalizer.transform(test.images.astype(np.float32))
    by_hand = node_probabilities(models, tree.nodes, X)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    for i, answer in enumerate(answers):
        columns = [tree.classes.index(c) for c in tree.predictor.config.node(answer.node).classes]
        np.testing.assert_allclose(proba[i, columns], by_hand[answer.node][i], atol=1e-5)
        assert tree.classes[int(proba[i].argmax())] == answer.guess
    for name in ("parent", "mammals"):  # one node alone: its own softmax over its own classes
        np.testing.assert_allclose(tree.node(name).predict_proba(test.images), by_hand[name], atol=1e-5)


def test_one_node_alone_and_routing_from_a_branch_answer_as_predict_does(fitted, tmp_path, capsys):
    tree, out, pngs, _ = fitted
    alone = assert_api_answers_as_predict(out, ["--node", "mammals", pngs], sorted(pngs.glob("*.png")),
                                          tmp_path / "node.json", capsys, node="mammals")
    assert tree.node("mammals").predict(sorted(pngs.glob("*.png"))) == [a.label for a in alone]
    assert tree.node("mammals").classes == ("beaver", "whale", "wolf")
    routed = assert_api_answers_as_predict(out, ["--branch", "mammals", pngs], sorted(pngs.glob("*.png")),
                                           tmp_path / "branch.json", capsys, branch="mammals")
    assert {a.path[:2] for a in routed} == {("parent", "mammals")}
    assert branching.load(out, branch="mammals").nodes == ("mammals", "water") and tree.nodes == ("parent", "mammals",
                                                                                                   "water")


def test_an_unreadable_input_is_named_and_the_others_are_answered(fitted, tmp_path):
    tree, _, pngs, _ = fitted
    (tmp_path / "broken.png").write_bytes(b"not a png")
    good = sorted(pngs.glob("*.png"))[:2]
    with pytest.warns(UserWarning) as caught:
        answers = tree([good[0], tmp_path / "broken.png", "a review of a film", good[1]])
    messages = [str(w.message) for w in caught]
    assert any("broken.png: not an image" in m for m in messages)
    assert any("a review of a film: no such file, and this tree reads images" in m for m in messages)
    assert [a.error is None for a in answers] == [True, False, False, True]
    assert answers[1].label is None and not answers[1].accepted and answers[1].path == ()
    with pytest.warns(UserWarning):
        proba = tree.predict_proba([good[0], tmp_path / "broken.png"])
    assert np.isnan(proba[1]).all() and not np.isnan(proba[0]).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tree([]) == [] and tree.predict_proba([]).shape == (0, 4)


@pytest.mark.parametrize("item, message", [
    (np.full((8, 8, 3), 2.0), "float pixels outside 0..1"),
    (np.full((8, 8, 3), 300), "integer pixels outside 0..255"),
    (np.zeros((8, 8, 5), np.uint8), "an array of shape (8, 8, 5)"),
    (np.zeros(10, np.uint8), "a vector of 10 values"),
    ({"pixels": 1}, "an object of type dict; pass image paths"),
])
def test_a_bad_array_says_what_is_wrong_and_how_to_fix_it(fitted, item, message):
    with pytest.warns(UserWarning, match=message.replace("(", r"\(").replace(")", r"\)")):
        assert fitted[0].predict([item]) == [None]


def test_bad_loads_are_one_line_errors(fitted, tmp_path):
    out = fitted[1]
    with pytest.raises(CheckpointError, match="nowhere does not exist; pass the folder of a run .* or an exported .onnx"):
        branching.load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="not both"):
        branching.load(out, node="mammals", branch="mammals")
    with pytest.raises(ConfigError, match=r"^node=mamals: unknown node 'mamals' \(did you mean 'mammals'\?\)"):
        branching.load(out, node="mamals")  # named as Python names it, not as the command line's --node
    with pytest.raises(ConfigError, match=r"^branch=mamals: no such branch \(did you mean 'mammals'\?\)"):
        branching.load(out, branch="mamals")
    with pytest.raises(DataError, match="inputs of type int"):
        fitted[0].predict(3)
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda"):
        branching.load(out, device="tpu")


def test_a_run_folder_with_an_edited_model_file_is_refused(fitted, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(fitted[1] / "models", copy)
    (copy / "mammals.pt").write_bytes((copy / "mammals.pt").read_bytes()[:200])
    with pytest.raises(CheckpointError) as caught:
        branching.load(copy)
    assert "mammals.pt" in str(caught.value) and "\n" not in str(caught.value)
    (copy / "mammals.pt").unlink()
    with pytest.raises(CheckpointError) as caught:
        branching.load(copy)
    assert "mammals" in str(caught.value) and "\n" not in str(caught.value)
