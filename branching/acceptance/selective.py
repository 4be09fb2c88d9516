"""Selective classification: acceptance rules fit on validation data, risk-coverage curves, intervals.

A prediction is accepted when its confidence (the max softmax probability after temperature scaling,
or any other real-valued score where higher means more confident: branching.confidence) is at least a
threshold. Nothing here assumes the score lies in [0, 1]: the rules only use its order. Three rules
choose the threshold, on validation data only:

- "threshold": a fixed threshold (the original study's 0.96);
- "coverage": accept the most confident fraction `coverage` of the validation images;
- "risk": the selection-with-guaranteed-risk (SGR) algorithm of Geifman & El-Yaniv (2017): a binary
  search over the validation confidences, each candidate tested with a one-sided binomial
  (Clopper-Pearson) upper bound on its selective risk at level delta / ceil(log2 m).

A rule that cannot be met gives threshold None (accept nothing) with the reason, never an error.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import beta

from branching.acceptance.stats import wilson_interval

RULES = ("threshold", "coverage", "risk")


# ---- the risk bound --------------------------------------------------------------------------

def risk_upper_bound(errors: int, n: int, delta: float) -> float:
    """The b with P(Binomial(n, b) <= errors) = delta: an upper bound on the true risk that holds with
    probability at least 1 - delta (Clopper-Pearson; the B* of Geifman & El-Yaniv). 1 when n == 0."""
    if n == 0 or errors >= n:
        return 1.0
    return float(beta.ppf(1 - delta, errors + 1, n - errors))


# ---- acceptance --------------------------------------------------------------------------------

def accept_mask(confidence, threshold: float | None) -> np.ndarray:
    """confidence >= threshold; a threshold of None accepts nothing (a rule that could not be met)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    if threshold is None:
        return np.zeros(len(confidence), dtype=bool)
    return confidence >= threshold


def _validation_view(confidence, correct, threshold) -> dict:
    accepted = accept_mask(confidence, threshold)
    n, k = len(confidence), int(accepted.sum())
    return {"samples": n, "accepted": k, "coverage": k / n if n else None,
            "risk": float(1 - correct[accepted].mean()) if k else None}


def fit_rule(rule: str, val_confidence, val_correct, threshold: float | None = None,
             coverage: float | None = None, risk: float | None = None, delta: float | None = None) -> dict:
    """Choose the threshold of `rule` on validation confidences and correctness (0/1).

    Returns {"rule", "asked", "threshold", "attained", "reason", "validation": {samples, accepted,
    coverage, risk}}, plus "risk_bound", "delta" and "tests" for the risk rule.
    """
    confidence = np.asarray(val_confidence, dtype=np.float64)
    correct = np.asarray(val_correct, dtype=bool)
    if rule == "threshold":
        asked = {"threshold": threshold}
        chosen, reason, extra = threshold, None, {}
    elif rule == "coverage":
        asked = {"coverage": coverage}
        chosen, reason = _coverage_threshold(confidence, coverage)
        extra = {}
    elif rule == "risk":
        asked = {"risk": risk, "delta": delta}
        chosen, reason, extra = _sgr_threshold(confidence, correct, risk, delta)
    else:
        raise ValueError(f"unknown acceptance rule {rule!r}; use one of {', '.join(RULES)}")
    return {"rule": rule, "asked": asked, "threshold": None if chosen is None else float(chosen),
            "attained": chosen is not None, "reason": reason,
            "validation": _validation_view(confidence, correct, chosen), **extra}


def _coverage_threshold(confidence: np.ndarray, coverage: float):
    """The confidence of the ceil(coverage * m)-th most confident validation image (ties may add more)."""
    m = len(confidence)
    if m == 0:
        return None, "no validation images to choose a threshold on"
    k = max(1, math.ceil(coverage * m - 1e-9))
    return float(np.sort(confidence)[::-1][k - 1]), None


def _sgr_threshold(confidence: np.ndarray, correct: np.ndarray, target: float, delta: float):
    """Selection with guaranteed risk (Geifman & El-Yaniv, 2017, Algorithm 1).

    Binary search over the sorted validation confidences; each tested threshold gets a binomial upper
    bound on its risk at level delta / k, k = ceil(log2 m), so all k bounds hold together with
    probability >= 1 - delta (union bound). Of the tested thresholds whose bound is below the target,
    the one with the largest coverage is returned (the paper returns the last tested one, which
    need not meet the target).
    """
    m = len(confidence)
    if m == 0:
        return None, "no validation images to choose a threshold on", {"risk_bound": None, "delta": delta, "tests": 0}
    order = np.argsort(confidence, kind="stable")
    kappa, wrong = confidence[order], ~correct[order]
    tests = max(1, math.ceil(math.log2(m)))
    level = delta / tests
    lo, hi = 0, m - 1
    best = None  # (coverage count, threshold, bound)
    tightest = None  # (bound, threshold, accepted) of the candidate with the smallest bound
    for _ in range(tests):
        z = math.ceil((lo + hi) / 2)
        theta = kappa[z]
        accepted = kappa >= theta
        n, errors = int(accepted.sum()), int(wrong[accepted].sum())
        bound = risk_upper_bound(errors, n, level)
        if tightest is None or bound < tightest[0]:
            tightest = (bound, theta, n)
        if bound < target:
            hi = z
            if best is None or n > best[0]:
                best = (n, float(theta), bound)
        else:
            lo = z
    extra = {"delta": delta, "tests": tests}
    if best is None:
        bound, theta, n = tightest
        reason = (f"no threshold meets risk {target:g} with confidence {1 - delta:g} on {m} validation images: "
                  f"the best tested (accepting {n}) has a risk bound of {bound:.4f}")
        return None, reason, {**extra, "risk_bound": float(bound)}
    return best[1], None, {**extra, "risk_bound": float(best[2])}


# ---- risk-coverage -----------------------------------------------------------------------------

def risk_coverage_curve(confidence, correct) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(coverage, selective risk, threshold) at every distinct confidence, from the most confident down."""
    confidence = np.asarray(confidence, dtype=np.float64)
    wrong = ~np.asarray(correct, dtype=bool)
    n = len(confidence)
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(-confidence, kind="stable")
    conf_sorted, errors = confidence[order], np.cumsum(wrong[order])
    last_of_tie = np.r_[conf_sorted[1:] != conf_sorted[:-1], True]
    count = np.arange(1, n + 1)[last_of_tie]
    return count / n, errors[last_of_tie] / count, conf_sorted[last_of_tie]


def _expected_errors(confidence, correct) -> np.ndarray:
    """Expected number of errors among the k most confident images, k = 1..n, with tied confidences
    ordered at random: each image of a tie counts the tie's mean error."""
    confidence = np.asarray(confidence, dtype=np.float64)
    wrong = (~np.asarray(correct, dtype=bool)).astype(np.float64)
    order = np.argsort(-confidence, kind="stable")
    _, group, sizes = np.unique(confidence[order], return_inverse=True, return_counts=True)
    tie_mean = np.bincount(group, weights=wrong[order]) / sizes
    return np.cumsum(tie_mean[group])


def aurc(confidence, correct) -> float | None:
    """Area under the risk-coverage curve (Geifman et al., ICLR 2019): the mean over k = 1..n of the
    selective risk of the k most confident images (ties in expectation, see _expected_errors)."""
    n = len(confidence)
    if n == 0:
        return None
    return float(np.mean(_expected_errors(confidence, correct) / np.arange(1, n + 1)))


def optimal_aurc(correct) -> float | None:
    """AURC of a perfect ranking (every correct prediction before every error) at the same accuracy."""
    correct = np.asarray(correct, dtype=bool)
    n = len(correct)
    if n == 0:
        return None
    k = np.arange(1, n + 1)
    return float(np.mean(np.maximum(0, k - correct.sum()) / k))


def eaurc(confidence, correct) -> float | None:
    """Excess AURC: AURC minus that of a perfect ranking of the same predictions."""
    value = aurc(confidence, correct)
    return None if value is None else value - optimal_aurc(correct)


def risk_at_coverage(confidence, correct, coverage: float) -> float | None:
    """Selective risk of the ceil(coverage * n) most confident images (ties in expectation)."""
    k = math.ceil(coverage * len(confidence) - 1e-9)
    if k <= 0:
        return None
    return float(_expected_errors(confidence, correct)[k - 1] / k)


def selective_summary(correct, accepted) -> dict:
    """Coverage and accepted accuracy with 95% Wilson intervals, and the selective risk."""
    correct, accepted = np.asarray(correct, dtype=bool), np.asarray(accepted, dtype=bool)
    n, k = len(correct), int(accepted.sum())
    right = int(correct[accepted].sum())
    return {"accepted": k, "coverage": k / n if n else None, "coverage_ci": wilson_interval(k, n),
            "accepted_accuracy": right / k if k else None, "accepted_accuracy_ci": wilson_interval(right, k),
            "selective_risk": 1 - right / k if k else None}
