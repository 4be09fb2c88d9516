"""Calibration: temperature scaling (Guo et al., 2017), NLL, Brier score, expected calibration error.

One temperature per model, fit by minimising the NLL of held-out validation logits (never the test
set). Everything works on logits in float64.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as scipy_softmax

MIN_LOG_T, MAX_LOG_T = np.log(0.05), np.log(20.0)
ECE_BINS = 15


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) in float64, (N, K)."""
    return scipy_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature)."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits, labels) -> float:
    """The temperature in [0.05, 20] that minimises the NLL of the labels under softmax(logits / T)."""
    if len(labels) == 0:
        return 1.0
    result = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                             bounds=(MIN_LOG_T, MAX_LOG_T), method="bounded", options={"xatol": 1e-6})
    return float(np.exp(result.x))


def brier(probabilities, labels) -> float:
    """Multi-class Brier score: mean over images of sum over classes of (p - one_hot)^2 (0 is perfect, 2 worst)."""
    p = np.asarray(probabilities, dtype=np.float64)
    one_hot = np.eye(p.shape[1])[np.asarray(labels, dtype=np.int64)]
    return float(((p - one_hot) ** 2).sum(axis=1).mean())


def reliability_bins(confidence, correct, n_bins: int = ECE_BINS) -> dict:
    """Equal-width bins over (0, 1], right-closed as in Guo et al. ((0, 1/15], (1/15, 2/15], ...):
    per bin the count, mean confidence and accuracy (None where empty)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(which, weights=correct, minlength=n_bins)
    mean = lambda s: [float(v / c) if c else None for v, c in zip(s, counts)]  # noqa: E731
    return {"edges": edges.tolist(), "count": counts.tolist(), "confidence": mean(conf_sum),
            "accuracy": mean(correct_sum)}


def ece(confidence, correct, n_bins: int = ECE_BINS) -> float | None:
    """Expected calibration error: sum over bins of (bin size / N) * |accuracy - mean confidence|."""
    if len(confidence) == 0:
        return None
    bins = reliability_bins(confidence, correct, n_bins)
    total = sum(bins["count"])
    return float(sum(n / total * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"])
                     if n))


def calibration_summary(logits, labels, temperature: float) -> dict:
    """NLL, Brier and ECE of softmax(logits) ("_raw") and of softmax(logits / temperature)."""
    labels = np.asarray(labels, dtype=np.int64)
    out: dict = {}
    for suffix, t in (("_raw", 1.0), ("", temperature)):
        if len(labels) == 0:
            out.update({f"nll{suffix}": None, f"brier{suffix}": None, f"ece{suffix}": None})
            continue
        p = softmax(logits, t)
        correct = p.argmax(axis=1) == labels
        out.update({f"nll{suffix}": nll(logits, labels, t), f"brier{suffix}": brier(p, labels),
                    f"ece{suffix}": ece(p.max(axis=1), correct)})
    return out
