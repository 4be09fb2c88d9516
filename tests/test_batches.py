"""The device-side data path (branching.models.batches) against numpy references: normalisation, mirror images
and shifts for the same random draws, their distribution, batches, and training through it."""

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chisquare

from branching.data.normalization import Normalizer
from branching.models.batches import Augment, DeviceInputs, device_batches
from branching.models.checks import BATCH_BYTES
from branching.models.model import Model

CPU = torch.device("cpu")


def numpy_augment(pixels, normalizer, side, generator, n, flip, crop):
    """The augmentation in numpy, image by image, with the draws Augment.draw takes from `generator`: a coin per
    image, then the rows' offsets, then the columns'."""
    coins = (torch.rand(n, generator=generator) < 0.5).numpy() if flip else np.zeros(n, bool)
    if crop:
        dy, dx = (torch.randint(0, 2 * crop + 1, (n,), generator=generator).numpy() for _ in range(2))
    out = []
    for i, image in enumerate(pixels.reshape(n, 3, side, side).astype(np.float32)):
        if coins[i]:
            image = image[:, :, ::-1]
        values = (image.reshape(-1) - normalizer.mean) / normalizer.std
        if crop:
            padded = np.pad(values.reshape(3, side, side), ((0, 0), (crop, crop), (crop, crop)))
            values = padded[:, dy[i]:dy[i] + side, dx[i]:dx[i] + side].reshape(-1)
        out.append(values)
    return np.stack(out)


@pytest.mark.parametrize("side,per_channel,crop", [(32, True, 4), (32, False, 0), (12, True, 2), (12, False, 3)])
def test_mirror_images_and_shifts_match_numpy_for_the_same_draws(side, per_channel, crop):
    pixels = np.random.default_rng(side + crop).integers(0, 256, (24, 3 * side * side), dtype=np.uint8)
    normalizer = Normalizer.fit(pixels, per_channel=per_channel)
    want = numpy_augment(pixels, normalizer, side, torch.Generator().manual_seed(7), 24, flip=True, crop=crop)
    augment = Augment(flip=True, crop=crop, normalizer=normalizer)
    # stored uint8 images: mirrored as pixels, then normalised, then shifted
    got = augment.batch(DeviceInputs(normalizer.lazy(pixels), CPU), torch.arange(24), torch.Generator().manual_seed(7))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    # images given already normalised: mirrored through the normaliser (float rounding only)
    floats = DeviceInputs(normalizer.transform(pixels), CPU)
    got = augment.batch(floats, torch.arange(24), torch.Generator().manual_seed(7))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-4)


def test_the_draws_are_fair_coins_and_uniform_shifts():
    augment = Augment(flip=True, crop=4)
    generator = torch.Generator().manual_seed(0)
    flips, dy, dx = zip(*(augment.draw(256, generator) for _ in range(40)))
    flips, dy, dx = torch.cat(flips).numpy(), torch.cat(dy).numpy(), torch.cat(dx).numpy()
    assert binomtest(int(flips.sum()), len(flips), 0.5).pvalue > 1e-3
    for offsets in (dy, dx):
        assert offsets.min() == 0 and offsets.max() == 8
        assert chisquare(np.bincount(offsets, minlength=9)).pvalue > 1e-3
    assert abs(np.corrcoef(dy, dx)[0, 1]) < 0.05  # rows and columns drawn independently


def test_a_shifted_image_is_the_window_of_its_zero_padded_normalised_image_at_the_drawn_offset():
    pixels = np.random.default_rng(1).integers(0, 256, (5, 3 * 8 * 8), dtype=np.uint8)
    normalizer = Normalizer.fit(pixels, per_channel=True)
    got = Augment(flip=False, crop=2).batch(DeviceInputs(normalizer.lazy(pixels), CPU), torch.arange(5),
                                            torch.Generator().manual_seed(3)).numpy()
    generator = torch.Generator().manual_seed(3)
    dy, dx = (torch.randint(0, 5, (5,), generator=generator).numpy() for _ in range(2))
    for i in range(5):
        image = normalizer.transform(pixels[i:i + 1]).reshape(3, 8, 8)
        window = np.zeros((3, 8, 8), np.float32)  # the image placed at (2 - dy, 2 - dx), zeros elsewhere
        top, left = 2 - dy[i], 2 - dx[i]
        src = image[:, max(0, -top):8 - max(0, top), max(0, -left):8 - max(0, left)]
        window[:, max(0, top):max(0, top) + src.shape[1], max(0, left):max(0, left) + src.shape[2]] = src
        np.testing.assert_array_equal(got[i].reshape(3, 8, 8), window)


def test_known_mirror_inputs_are_picked_by_the_same_coins():
    plain = np.random.default_rng(2).normal(size=(30, 7)).astype(np.float32)
    mirrored = -plain
    index = torch.tensor([4, 9, 9, 0, 29, 13])
    got = Augment(mirrored=mirrored).batch(DeviceInputs(plain, CPU), index, torch.Generator().manual_seed(5))
    coins = (torch.rand(6, generator=torch.Generator().manual_seed(5)) < 0.5).numpy()
    want = np.where(coins[:, None], mirrored[index.numpy()], plain[index.numpy()])
    np.testing.assert_array_equal(got.numpy(), want)
    assert 0 < coins.sum() < 6


def test_device_rows_are_the_normalisers_figures_to_the_bit():
    pixels = np.random.default_rng(3).integers(0, 256, (50, 3072), dtype=np.uint8)
    normalizer = Normalizer.fit(pixels[:30], per_channel=False)
    lazy = normalizer.lazy(pixels)[np.arange(10, 50)]
    index = torch.tensor([0, 39, 5, 5])
    np.testing.assert_array_equal(DeviceInputs(lazy, CPU).rows(index).numpy(),
                                  normalizer.transform(pixels[10:50][index.numpy()]))
    batches = list(device_batches(lazy, 16, CPU))
    assert [len(b) for b in batches] == [16, 16, 8]
    np.testing.assert_array_equal(torch.cat(batches).numpy(), normalizer.transform(pixels[10:50]))
    wide = np.zeros((3, BATCH_BYTES // 4 // 2 + 1), np.float32)  # two rows would pass BATCH_BYTES
    assert [len(b) for b in device_batches(wide, 4096, CPU)] == [1, 1, 1]


def test_training_through_the_device_path_matches_training_on_numpy_augmented_batches():
    """Model.fit on stored images with Augment against fit on floats whose transform is the numpy reference
    (the same generator, so the same draws): the same weights."""
    pixels = np.random.default_rng(4).integers(0, 256, (64, 3 * 8 * 8), dtype=np.uint8)
    labels = np.arange(64) % 3
    normalizer = Normalizer.fit(pixels, per_channel=True)

    def reference(xb, generator):  # xb: normalised float rows; back to pixels, then numpy's augmentation
        rows = np.rint(xb.numpy() * normalizer.std + normalizer.mean).astype(np.uint8)
        return torch.from_numpy(numpy_augment(rows, normalizer, 8, generator, len(xb), flip=True, crop=2))

    weights = []
    for X, transform in ((normalizer.lazy(pixels), Augment(flip=True, crop=2)), (normalizer.transform(pixels), reference)):
        model = Model([192, 3], kind="cnn", shape={"widths": [4, 8], "depth": 1}, seed=0)
        model.fit(X, labels, epochs=2, batch_size=16, train_transform=transform, seed=0, progress=False)
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.net.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)
    untrained = Model([192, 3], kind="cnn", shape={"widths": [4, 8], "depth": 1}, seed=0)
    assert not torch.allclose(weights[0], torch.cat([p.detach().reshape(-1) for p in untrained.net.parameters()]))


def test_a_cnn_runs_channels_last_with_the_figures_of_the_contiguous_layout():
    model = Model([3 * 16 * 16, 4], kind="cnn", shape={"widths": [4, 8], "depth": 1}, seed=0)
    conv = model.net.stages[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = torch.from_numpy(np.random.default_rng(5).normal(size=(6, 3 * 16 * 16)).astype(np.float32))
    with torch.no_grad():
        got = model.net(x)
        plain = model.net.to(memory_format=torch.contiguous_format)
        want = torch.nn.Sequential(*plain.stages, plain.head)(x.reshape(6, 3, 16, 16))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compile_where_it_cannot_run_is_a_one_line_error_before_any_work(monkeypatch, tmp_path, capsys):
    from branching.cli import main as cli
    monkeypatch.setattr("shutil.which", lambda name: None)  # no C++ compiler for inductor on the CPU
    code = cli.main(["run", "--compile", "--device", "cpu", "--data", str(tmp_path / "nothing-here"), "--no-download",
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compile on the CPU needs a C++ compiler" in err[0]
    assert not (tmp_path / "out").exists()


def test_a_recipe_trains_at_its_gpu_batch_size_and_rate_on_cuda_only():
    from dataclasses import replace

    from branching.config.recipes import get_recipe
    from branching.train.nodes import fit_kwargs
    node = replace(get_recipe("default").parent_for("cnn"), gpu_batch_size=512, gpu_lr=6e-3, gpu_epochs=36)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert (node.on(cuda).batch_size, node.on(cuda).lr, node.on(cuda).epochs) == (512, 6e-3, 36)
    assert get_recipe("default", max_epochs=2).parent_for("cnn").on(cuda).epochs == 2  # --max-epochs caps it too
    assert node.on(cpu) is node and replace(node, gpu_batch_size=None).on(cuda).batch_size == node.batch_size
    assert fit_kwargs(node, 0, False, "parent", cuda)["batch_size"] == 512
    assert fit_kwargs(node, 0, False, "parent", cpu)["batch_size"] == node.batch_size
