"""Selective classification against hand-worked cases, scipy.stats and brute force."""

import itertools
import math

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom, norm

from branching.acceptance import selective, stats

# ---- Wilson intervals and the binomial bound --------------------------------------------------

def test_wilson_interval_hand_value_and_defining_equation():
    lo, hi = stats.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # textbook value
    z = norm.ppf(0.975)
    for k, n in ((0, 20), (3, 20), (17, 20), (20, 20), (250, 300)):
        lo, hi = stats.wilson_interval(k, n)
        # the endpoints are the p in [0, 1] where |k/n - p| = z * sqrt(p (1 - p) / n)
        f = lambda p: (k / n - p) ** 2 - z * z * p * (1 - p) / n  # noqa: E731
        expected_lo = 0.0 if k == 0 else brentq(f, 1e-12, k / n - 1e-9, xtol=1e-14)
        expected_hi = 1.0 if k == n else brentq(f, k / n + 1e-9, 1 - 1e-12, xtol=1e-14)
        assert (lo, hi) == pytest.approx((expected_lo, expected_hi), abs=1e-9)
    assert stats.wilson_interval(0, 0) is None


def test_wilson_interval_equals_the_closed_form():
    """scipy's Wilson interval against the textbook formula, clamped to [0, 1], over every k of many n."""
    for level in (0.9, 0.95, 0.99):
        z = norm.ppf(0.5 + level / 2)
        for n in (*range(1, 61), 100, 299, 1000):
            for k in range(0, n + 1, max(1, n // 50)):
                p = k / n
                denominator = 1 + z * z / n
                centre = (p + z * z / (2 * n)) / denominator
                half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
                expected = (max(0.0, centre - half), min(1.0, centre + half))
                assert stats.wilson_interval(k, n, level) == pytest.approx(expected, abs=1e-14)


def test_risk_upper_bound_solves_the_binomial_tail_equation():
    for errors, n, delta in ((0, 50, 0.05), (3, 50, 0.05), (10, 200, 0.01), (49, 50, 0.1)):
        b = selective.risk_upper_bound(errors, n, delta)
        assert binom.cdf(errors, n, b) == pytest.approx(delta, rel=1e-8)
        assert b > errors / n
    assert selective.risk_upper_bound(0, 40, 0.05) == pytest.approx(1 - 0.05 ** (1 / 40))  # closed form
    assert selective.risk_upper_bound(5, 5, 0.05) == 1.0
    assert selective.risk_upper_bound(0, 0, 0.05) == 1.0


# ---- rules -----------------------------------------------------------------------------------

CONF = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5])
RIGHT = np.array([1, 1, 0, 1, 0, 1], dtype=bool)


def test_threshold_rule_reports_validation_coverage_and_risk():
    rule = selective.fit_rule("threshold", CONF, RIGHT, threshold=0.75)
    assert rule["threshold"] == 0.75 and rule["attained"] and rule["reason"] is None
    assert rule["validation"] == {"samples": 6, "accepted": 3, "coverage": 0.5, "risk": pytest.approx(1 / 3)}


@pytest.mark.parametrize("coverage, threshold, accepted", [(0.5, 0.8, 3), (0.34, 0.8, 3), (1 / 3, 0.9, 2),
                                                           (1.0, 0.5, 6), (0.01, 0.95, 1)])
def test_coverage_rule_accepts_the_most_confident_fraction(coverage, threshold, accepted):
    rule = selective.fit_rule("coverage", CONF, RIGHT, coverage=coverage)
    assert rule["threshold"] == threshold and rule["validation"]["accepted"] == accepted


def test_coverage_rule_with_ties_and_without_validation_data():
    rule = selective.fit_rule("coverage", [0.9, 0.8, 0.8, 0.5], [1, 1, 0, 1], coverage=0.5)
    assert rule["threshold"] == 0.8 and rule["validation"]["accepted"] == 3  # the tie comes along
    empty = selective.fit_rule("coverage", [], [], coverage=0.5)
    assert empty["threshold"] is None and not empty["attained"] and "no validation" in empty["reason"]


def sgr_reference(confidence, correct, target, delta):
    """Geifman & El-Yaniv (2017), Algorithm 1, written out with 1-based indices as in the paper; returns
    every tested (threshold, bound) pair."""
    order = np.argsort(confidence, kind="stable")
    kappa, right = confidence[order], correct[order]
    m = len(kappa)
    k = math.ceil(math.log2(m))
    z_min, z_max, tested = 1, m, []
    for _ in range(k):
        z = math.ceil((z_min + z_max) / 2)
        theta = kappa[z - 1]
        covered = kappa >= theta
        n, errors = covered.sum(), (~right[covered]).sum()
        bound = 1.0 if errors == n else brentq(lambda b: binom.cdf(errors, n, b) - delta / k, 1e-12, 1 - 1e-12)
        tested.append((theta, bound, n))
        if bound < target:
            z_max = z
        else:
            z_min = z
    return tested


def test_sgr_tests_the_papers_thresholds_and_keeps_the_widest_that_meets_the_target():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0, 1, 700)
    correct = rng.random(700) < confidence  # risk falls as confidence rises
    for target in (0.2, 0.3, 0.4):
        rule = selective.fit_rule("risk", confidence, correct, risk=target, delta=0.05)
        tested = sgr_reference(confidence, correct, target, 0.05)
        feasible = [(n, theta, bound) for theta, bound, n in tested if bound < target]
        n, theta, bound = max(feasible)
        assert rule["attained"] and rule["threshold"] == theta
        assert rule["risk_bound"] == pytest.approx(bound, rel=1e-7)
        assert rule["tests"] == math.ceil(math.log2(700))
        assert rule["validation"]["accepted"] == n and rule["validation"]["risk"] <= rule["risk_bound"] < target


def test_sgr_holds_its_guarantee_in_simulation():
    """Confidence c ~ U(0, 1) and P(correct | c) = c: the true selective risk at threshold t is (1 - t) / 2.
    The chosen threshold must have a true risk above the target in at most delta of the draws."""
    rng = np.random.default_rng(1)
    target, delta, draws, violations = 0.1, 0.1, 300, 0
    for _ in range(draws):
        confidence = rng.uniform(0, 1, 400)
        correct = rng.random(400) < confidence
        rule = selective.fit_rule("risk", confidence, correct, risk=target, delta=delta)
        violations += rule["attained"] and (1 - rule["threshold"]) / 2 > target
    assert violations / draws <= delta


def test_unattainable_risk_accepts_nothing_and_says_why():
    rule = selective.fit_rule("risk", CONF, RIGHT, risk=0.01, delta=0.05)
    assert rule["threshold"] is None and not rule["attained"]
    assert "0.01" in rule["reason"] and "6 validation images" in rule["reason"]
    assert rule["validation"]["accepted"] == 0
    assert not selective.accept_mask(CONF, None).any()


# ---- risk-coverage ---------------------------------------------------------------------------

def test_risk_coverage_curve_and_aurc_by_hand():
    coverage, risk, threshold = selective.risk_coverage_curve(CONF, RIGHT)
    np.testing.assert_allclose(coverage, np.arange(1, 7) / 6)
    np.testing.assert_allclose(risk, [0, 0, 1 / 3, 1 / 4, 2 / 5, 2 / 6])
    np.testing.assert_allclose(threshold, CONF)
    assert selective.aurc(CONF, RIGHT) == pytest.approx((0 + 0 + 1 / 3 + 1 / 4 + 2 / 5 + 2 / 6) / 6)
    # a perfect ranking of 4 right, 2 wrong: risks 0, 0, 0, 0, 1/5, 2/6
    assert selective.optimal_aurc(RIGHT) == pytest.approx((1 / 5 + 2 / 6) / 6)
    assert selective.eaurc(CONF, RIGHT) == pytest.approx(selective.aurc(CONF, RIGHT) - (1 / 5 + 2 / 6) / 6)
    assert selective.eaurc(RIGHT.astype(float), RIGHT) == pytest.approx(0.0)
    assert selective.risk_at_coverage(CONF, RIGHT, 0.5) == pytest.approx(1 / 3)
    assert selective.aurc([], []) is None


def test_aurc_with_ties_is_the_mean_over_all_orders_of_the_ties():
    confidence = np.array([0.9, 0.7, 0.7, 0.7, 0.4, 0.4])
    correct = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    values = []
    for p in itertools.permutations(range(3)):
        for q in itertools.permutations(range(2)):
            order = [0, *(1 + np.array(p)), *(4 + np.array(q))]
            wrong = ~correct[order]
            values.append(np.mean(np.cumsum(wrong) / np.arange(1, 7)))
    assert selective.aurc(confidence, correct) == pytest.approx(np.mean(values))
    coverage, risk, _ = selective.risk_coverage_curve(confidence, correct)  # one point per distinct threshold
    np.testing.assert_allclose(coverage, [1 / 6, 4 / 6, 1])
    np.testing.assert_allclose(risk, [0, 2 / 4, 3 / 6])


def test_selective_summary_by_hand():
    s = selective.selective_summary(RIGHT, CONF >= 0.75)
    assert (s["accepted"], s["coverage"], s["accepted_accuracy"]) == (3, 0.5, pytest.approx(2 / 3))
    assert s["selective_risk"] == pytest.approx(1 / 3)
    assert s["coverage_ci"] == pytest.approx(stats.wilson_interval(3, 6))
    none = selective.selective_summary(RIGHT, np.zeros(6, bool))
    assert none["coverage"] == 0 and none["accepted_accuracy"] is None and none["accepted_accuracy_ci"] is None
