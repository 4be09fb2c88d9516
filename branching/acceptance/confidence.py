"""Confidence scores of a node's answers, all "higher = more confident", and how well they separate
right answers from wrong ones.

Scores from logits alone:
- "msp": the maximum softmax probability of logits / T (Hendrycks & Gimpel, 2017);
- "doctor": minus DOCTOR's D_alpha = (1 - g) / g with g = sum_k p_k^2, p = softmax(logits / T)
  (Granese et al., NeurIPS 2021); D_alpha rejects when large, so its negation is the confidence;
- "energy": minus the free energy, T * logsumexp(logits / T) (Liu et al., NeurIPS 2020);
- "margin": the largest logit minus the second largest.
"selfeval" is the probability of being right that a self-evaluation branch (branching.judge) gives;
it needs the judge's output, not only logits.

Correct-versus-wrong metrics treat a right answer as the positive class: AUROC (scikit-learn), the
false-positive rate at 95% true-positive rate, and AURC / E-AURC (branching.selective).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp
from sklearn.metrics import roc_auc_score, roc_curve

from branching.acceptance import calibration, selective

SCORES = ("msp", "selfeval", "doctor", "energy", "margin")
PROBABILITY_SCORES = ("msp", "selfeval")  # in [0, 1]: a fixed threshold in (0, 1] makes sense for them
TPR_TARGET = 0.95


def msp(logits, temperature: float = 1.0) -> np.ndarray:
    return calibration.softmax(logits, temperature).max(axis=1)


def doctor(logits, temperature: float = 1.0) -> np.ndarray:
    """-D_alpha = -(1 - g) / g, g = sum of squared probabilities (1 / K <= g <= 1, so the score is in
    [-(K - 1), 0])."""
    g = (calibration.softmax(logits, temperature) ** 2).sum(axis=1)
    return -(1.0 - g) / g


def energy(logits, temperature: float = 1.0) -> np.ndarray:
    return temperature * logsumexp(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def margin(logits) -> np.ndarray:
    top2 = np.sort(np.asarray(logits, dtype=np.float64), axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def score(name: str, logits, temperature: float = 1.0, judge=None) -> np.ndarray:
    """The confidence `name` (one of SCORES) of each row of logits, float64 (N,); "selfeval" returns
    `judge`, the self-evaluation branch's probabilities for the same images."""
    if name == "msp":
        return msp(logits, temperature)
    if name == "doctor":
        return doctor(logits, temperature)
    if name == "energy":
        return energy(logits, temperature)
    if name == "margin":
        return margin(logits)
    if name == "selfeval":
        if judge is None:
            raise ValueError("the selfeval score needs the self-evaluation branch's probabilities (judge=...)")
        judge = np.asarray(judge, dtype=np.float64)
        if judge.shape != (len(logits),):
            raise ValueError(f"judge must hold one probability per image ({len(logits)}); got shape {judge.shape}")
        return judge
    raise ValueError(f"unknown confidence score {name!r}; use one of {', '.join(SCORES)}")


# ---- right versus wrong --------------------------------------------------------------------

def auroc(confidence, correct) -> float | None:
    """Area under the ROC curve of telling right answers (positives) from wrong ones; None when all
    answers are right or all wrong."""
    correct = np.asarray(correct, dtype=bool)
    if correct.all() or not correct.any():
        return None
    return float(roc_auc_score(correct, np.asarray(confidence, dtype=np.float64)))


def fpr_at_tpr(confidence, correct, tpr_target: float = TPR_TARGET) -> float | None:
    """The share of wrong answers accepted by the highest threshold that accepts at least `tpr_target`
    of the right answers (scikit-learn's ROC points, every threshold kept); None as for auroc."""
    correct = np.asarray(correct, dtype=bool)
    if correct.all() or not correct.any():
        return None
    fpr, tpr, _ = roc_curve(correct, np.asarray(confidence, dtype=np.float64), drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, tpr_target - 1e-12, side="left")])


def separation(confidence, correct) -> dict:
    """AURC, E-AURC, AUROC and FPR at 95% TPR of one score on one set of answers."""
    return {"aurc": selective.aurc(confidence, correct), "eaurc": selective.eaurc(confidence, correct),
            "auroc": auroc(confidence, correct), "fpr95": fpr_at_tpr(confidence, correct)}


def every_score(logits, correct, temperature: float, judge=None) -> dict:
    """{score: separation} of one node's answers for max softmax at T = 1 and at `temperature`, DOCTOR,
    energy, margin, its self-evaluation branch (when `judge` holds its probabilities) and the oracle
    (the correctness itself: the best any score can do)."""
    found = {"msp_1": msp(logits), "msp_t": msp(logits, temperature), "doctor": doctor(logits, temperature),
             "energy": energy(logits, temperature), "margin": margin(logits)}
    if judge is not None:
        found["selfeval"] = np.asarray(judge, dtype=np.float64)
    found["oracle"] = np.asarray(correct, dtype=np.float64)
    return {name: separation(values, correct) for name, values in found.items()}
