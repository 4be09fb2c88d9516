"""Temperature scaling (Guo et al., 2017): one temperature per model, fit on validation logits."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

MIN_LOG_T, MAX_LOG_T = np.log(0.05), np.log(20.0)


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
