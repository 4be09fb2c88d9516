"""The statistics the project reports, each computed in one place: the Wilson interval of a proportion,
the Student-t interval of a mean over seeds, the percentile bootstrap interval of a mean, and the mean
and sample standard deviation of a list of figures.

Formatting them is branching.tables' job; the Clopper-Pearson risk bound of the acceptance rules is
selective.risk_upper_bound.
"""

from __future__ import annotations

import numpy as np
from scipy import stats as scipy_stats

__all__ = ["BOOTSTRAP", "bootstrap_interval", "paired_bootstrap_interval", "sample_summary", "t_interval",
           "wilson_interval"]

BOOTSTRAP = 2000  # resamples of a bootstrap interval


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval [low, high] of a binomial proportion successes / n; None when n == 0."""
    if n == 0:
        return None
    ci = scipy_stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), float(ci.high)]


def t_interval(values, level: float = 0.95) -> list[float] | None:
    """Student-t interval [low, high] of the mean of the values (None with fewer than two). Values that
    are all equal give [mean, mean] (scipy's t.interval gives nan for a zero scale)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    mean, sem = float(values.mean()), float(scipy_stats.sem(values))
    if sem == 0:
        return [mean, mean]
    low, high = scipy_stats.t.interval(level, len(values) - 1, loc=mean, scale=sem)
    return [float(low), float(high)]


def bootstrap_interval(values, level: float = 0.95, n_resamples: int = BOOTSTRAP, seed: int = 0) -> list[float]:
    """Percentile bootstrap interval [low, high] of the mean of the values: n_resamples resamples of the
    values with replacement drawn by numpy.random.default_rng(seed), the interval's ends the
    (1 - level) / 2 and (1 + level) / 2 quantiles (linear interpolation) of their means. One value gives
    [value, value]."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 1:  # scipy's bootstrap needs two; every resample of one value is that value
        return [float(values[0]), float(values[0])]
    # random_state (not rng) keeps scipy >= 1.11 working; both draw rng.integers(0, n, (n_resamples, n)).
    result = scipy_stats.bootstrap((values,), np.mean, confidence_level=level, n_resamples=n_resamples,
                                   method="percentile", vectorized=True, random_state=np.random.default_rng(seed))
    return [float(result.confidence_interval.low), float(result.confidence_interval.high)]


def sample_summary(values: list) -> dict:
    """{"mean", "std" (sample, ddof 1), "n", "values"} of the values that are not None; the mean is None
    without values, the std None with fewer than two. "values" is the list as given, Nones included."""
    present = [float(v) for v in values if v is not None]
    mean = float(np.mean(present)) if present else None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return {"mean": mean, "std": std, "n": len(present), "values": values}


def paired_bootstrap_interval(statistic, n: int, level: float = 0.95, n_resamples: int = BOOTSTRAP,
                              seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval [low, high] of statistic(indices) over n paired items (e.g. a
    difference of two scores' AURC on the same test images): statistic is called with
    numpy.random.default_rng(seed).integers(0, n, n) for each resample. None when n == 0."""
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_resamples)], dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]
