"""Confidence scores against hand computations, and the right-versus-wrong metrics against brute force
and scipy."""

import math

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from branching.acceptance import confidence

LOGITS = np.array([[2.0, 1.0, 0.0], [0.5, 0.5, 3.0], [1.0, 1.0, 1.0]])


def test_scores_match_hand_computations():
    e = math.exp
    z = e(2) + e(1) + 1
    p = [e(2) / z, e(1) / z, 1 / z]
    g = sum(q * q for q in p)
    assert confidence.msp(LOGITS)[0] == pytest.approx(p[0], rel=1e-12)
    assert confidence.doctor(LOGITS)[0] == pytest.approx(-(1 - g) / g, rel=1e-12)
    assert confidence.energy(LOGITS)[0] == pytest.approx(math.log(z), rel=1e-12)
    assert confidence.margin(LOGITS).tolist() == [1.0, 2.5, 0.0]
    # a uniform answer: g = 1/3, D_alpha = 2, msp = 1/3, energy = 1 + ln 3
    assert confidence.doctor(LOGITS)[2] == pytest.approx(-2.0)
    assert confidence.msp(LOGITS)[2] == pytest.approx(1 / 3)
    assert confidence.energy(LOGITS)[2] == pytest.approx(1 + math.log(3))


def test_temperature_enters_msp_doctor_and_energy():
    t = 2.0
    row = LOGITS[0] / t
    z = np.exp(row).sum()
    assert confidence.msp(LOGITS, t)[0] == pytest.approx(np.exp(row[0]) / z)
    assert confidence.energy(LOGITS, t)[0] == pytest.approx(t * math.log(z))
    p = np.exp(row) / z
    g = float((p ** 2).sum())
    assert confidence.doctor(LOGITS, t)[0] == pytest.approx(-(1 - g) / g)
    assert confidence.score("margin", LOGITS, t).tolist() == [1.0, 2.5, 0.0]  # no temperature


def test_score_dispatch_and_selfeval_needs_the_judge():
    judge = np.array([0.1, 0.9, 0.5])
    assert np.array_equal(confidence.score("selfeval", LOGITS, judge=judge), judge)
    with pytest.raises(ValueError, match="judge"):
        confidence.score("selfeval", LOGITS)
    with pytest.raises(ValueError, match="one probability per image"):
        confidence.score("selfeval", LOGITS, judge=judge[:2])
    with pytest.raises(ValueError, match="unknown confidence score"):
        confidence.score("entropy", LOGITS)


def brute_fpr_at_tpr(score, correct, target=0.95):
    """Try every threshold from the highest down: the first that accepts >= target of the right answers."""
    for t in sorted(set(score), reverse=True):
        accepted = score >= t
        if accepted[correct].mean() >= target:
            return accepted[~correct].mean()
    return 1.0


def test_fpr_at_95_tpr_by_hand_and_by_brute_force():
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 0, 1, 1, 0], dtype=bool)
    assert confidence.fpr_at_tpr(score, correct) == 0.5  # all 3 right ones need t = 0.6, which takes 0.8 in
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(5, 60))
        score = np.round(rng.normal(size=n), 1)  # ties
        correct = rng.random(n) < 0.7
        if correct.all() or not correct.any():
            continue
        assert confidence.fpr_at_tpr(score, correct) == pytest.approx(brute_fpr_at_tpr(score, correct))


def test_auroc_is_the_mann_whitney_statistic():
    rng = np.random.default_rng(1)
    score = np.round(rng.normal(size=200), 1)
    correct = rng.random(200) < score.clip(-2, 2) / 4 + 0.5
    u = mannwhitneyu(score[correct], score[~correct]).statistic
    assert confidence.auroc(score, correct) == pytest.approx(u / (correct.sum() * (~correct).sum()))
    assert confidence.auroc(score, np.ones(200, bool)) is None
    assert confidence.fpr_at_tpr(score, np.zeros(200, bool)) is None


def test_separation_of_a_perfect_score():
    correct = np.array([1, 1, 0, 1, 0], dtype=bool)
    metrics = confidence.separation(correct.astype(float), correct)
    assert metrics["auroc"] == 1.0 and metrics["fpr95"] == 0.0 and metrics["eaurc"] == pytest.approx(0.0)
