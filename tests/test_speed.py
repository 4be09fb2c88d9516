"""The inference benchmark's building blocks: its modes agree with torchly, FLOPs and memory by hand."""

import sys

import numpy as np
import pytest
from reference import DEEP_TREE

from branching.config.parse import parse_config
from branching.data.cifar import N_PIXELS
from branching.data.normalization import Normalizer
from branching.models.forward import node_inputs
from branching.tree.routing import TreePredictor
from branching.tree.speed import (batched_extraction, chain_flops, chain_models, original_style, peak_memory,
                                  random_tree, routed_shapes)

CONFIG = parse_config(DEEP_TREE)  # water reads animals layer 0 post, animals reads parent layer 1 pre


def test_original_style_and_batched_extraction_give_torchly_answers():
    models = random_tree(CONFIG)
    norm = Normalizer.from_dict(models["parent"].meta.normalization)
    images = np.random.default_rng(0).integers(0, 256, (25, N_PIXELS), dtype=np.uint8)
    chain = chain_models(models, "water")
    assert [m.meta.name for m in chain] == ["parent", "animals", "water"]
    reference = models["water"].predict_proba(node_inputs(models, "water", norm.transform(images)))
    for predicted, confidence in (original_style(chain, norm, images), batched_extraction(chain, norm, images, 8)):
        assert np.array_equal(predicted, reference.argmax(axis=1))
        np.testing.assert_allclose(confidence, reference.max(axis=1), atol=1e-5)


def test_flops_and_matmul_shapes_by_hand():
    models = random_tree(CONFIG)
    chain = chain_models(models, "water")
    parent = 2 * (3072 * 32 + 32 * 16 + 16 * 6)
    animals = 2 * (16 * 12 + 12 * 8 + 8 * 3)
    water = 2 * (12 * 6 + 6 * 2)
    plants = 2 * (32 * 5 + 5 * 2)
    assert chain_flops(chain, full=True) == parent + animals + water
    assert chain_flops(chain, full=False) == 2 * (3072 * 32 + 32 * 16) + 2 * (16 * 12) + water
    predictor = TreePredictor(CONFIG, models)
    reached = {"parent": 100, "animals": 50, "water": 25, "plants": 75}
    assert predictor.flops_per_image(reached, 100) == pytest.approx(parent + animals / 2 + water / 4 + plants * 3 / 4)
    assert routed_shapes(predictor, reached, 100, 64) == [
        (64, 3072, 32), (64, 32, 16), (64, 16, 6), (32, 16, 12), (32, 12, 8), (32, 8, 3), (16, 12, 6), (16, 6, 2),
        (48, 32, 5), (48, 5, 2)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_sees_a_known_allocation():
    size = 64 * 2**20
    result, extra, process = peak_memory(lambda: int(np.ones(size, np.uint8).sum()))
    assert result == size
    if extra is not None:  # None where the kernel does not let the high-water mark be reset
        assert 60 <= extra < 200
    assert process >= extra if extra is not None else process > 0
