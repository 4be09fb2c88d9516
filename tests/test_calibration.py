"""Calibration metrics against scikit-learn, scipy, PyTorch and hand-worked cases."""

import numpy as np
import pytest
import scipy.special
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss

from branching.acceptance import calibration


def random_logits(n=400, k=4, scale=2.0, seed=0, true_temperature=1.5):
    """Logits and labels drawn from softmax(logits / true_temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, scale, size=(n, k))
    p = scipy.special.softmax(logits / true_temperature, axis=1)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return logits, labels


def test_softmax_and_nll_match_scipy_and_sklearn():
    logits, labels = random_logits()
    for t in (0.3, 1.0, 2.5):
        p = scipy.special.softmax(logits / t, axis=1)
        np.testing.assert_allclose(calibration.softmax(logits, t), p, rtol=1e-12)
        assert calibration.nll(logits, labels, t) == pytest.approx(log_loss(labels, p, labels=range(4)), rel=1e-9)


def torch_nll(logits, labels, t):
    return torch.nn.functional.cross_entropy(torch.tensor(logits / t), torch.tensor(labels)).item()


def test_fitted_temperature_is_the_minimum_of_a_fine_grid():
    logits, labels = random_logits(scale=4.0, true_temperature=3.0)
    fitted = calibration.fit_temperature(logits, labels)
    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 4001))
    scaled = torch.tensor(logits)[None] / torch.tensor(grid)[:, None, None]  # (grid, N, K)
    losses = -torch.log_softmax(scaled, dim=2)[:, torch.arange(len(labels)), torch.tensor(labels)].mean(dim=1)
    losses = losses.numpy()
    best = grid[int(np.argmin(losses))]
    assert fitted == pytest.approx(best, rel=2e-3)
    assert torch_nll(logits, labels, fitted) <= losses.min() + 1e-9


def test_temperature_recovers_a_known_overconfidence():
    """Labels drawn from softmax(z / 2): the logits z are overconfident by a factor of 2."""
    z, labels = random_logits(n=20000, k=3, scale=3.0, seed=1, true_temperature=2.0)
    assert calibration.fit_temperature(z, labels) == pytest.approx(2.0, abs=0.08)


def test_brier_matches_sklearn_and_a_hand_case():
    logits, labels = random_logits(k=3)
    p = calibration.softmax(logits)
    assert calibration.brier(p, labels) == pytest.approx(brier_score_loss(labels, p, labels=[0, 1, 2]), rel=1e-12)
    # one-vs-rest: sum over classes of the binary Brier scores
    assert calibration.brier(p, labels) == pytest.approx(
        sum(brier_score_loss(labels == k, p[:, k]) for k in range(3)), rel=1e-12)
    hand = np.array([[1, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]])
    # (0) + (0.25 + 0.25 + 0) + (0.04 + 0.09 + 0.25) = 0.88, over 3 images
    assert calibration.brier(hand, [0, 0, 2]) == pytest.approx(0.88 / 3)


def test_ece_hand_case():
    # bins of width 1/15: 0.95 -> (14/15, 1], 0.55 -> (8/15, 9/15], 0.45 -> (6/15, 7/15]
    # |0.5 - 0.95| * 2/4 + |1 - 0.55| * 1/4 + |1 - 0.45| * 1/4 = 0.225 + 0.1125 + 0.1375
    assert calibration.ece([0.95, 0.95, 0.55, 0.45], [1, 0, 1, 1]) == pytest.approx(0.475)
    assert calibration.ece([], []) is None


def guo_ece(confidence, correct, n_bins=15):
    """The loop of Guo et al.'s reference code: bins (lower, upper]."""
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        inside = (confidence > lower) & (confidence <= upper)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return total


def test_ece_and_bins_match_guo_and_sklearn_on_random_data_and_bin_edges():
    rng = np.random.default_rng(2)
    confidence = np.concatenate([rng.uniform(1 / 3, 1, 500), np.linspace(0, 1, 16)[5:]])  # includes edges
    correct = rng.random(len(confidence)) < confidence
    assert calibration.ece(confidence, correct) == pytest.approx(guo_ece(confidence, correct), rel=1e-12)
    bins = calibration.reliability_bins(confidence, correct)
    accuracy, mean_conf = calibration_curve(correct, confidence, n_bins=15, strategy="uniform")
    np.testing.assert_allclose([a for a in bins["accuracy"] if a is not None], accuracy, rtol=1e-12)
    np.testing.assert_allclose([c for c in bins["confidence"] if c is not None], mean_conf, rtol=1e-12)
    assert sum(bins["count"]) == len(confidence)


def test_calibration_summary_raw_and_calibrated():
    logits, labels = random_logits(k=3, seed=3)
    s = calibration.calibration_summary(logits, labels, 2.0)
    p1, p2 = scipy.special.softmax(logits, axis=1), scipy.special.softmax(logits / 2, axis=1)
    assert s["nll_raw"] == pytest.approx(log_loss(labels, p1))
    assert s["nll"] == pytest.approx(log_loss(labels, p2))
    assert s["brier"] == pytest.approx(brier_score_loss(labels, p2, labels=[0, 1, 2]))
    assert s["ece"] == pytest.approx(guo_ece(p2.max(axis=1), p2.argmax(axis=1) == labels))
