"""Uncertainty and significance of per-query scores: what makes a report's cells trustworthy.

In: per-query scores (``{query id: score}``) of each model on one dataset. Out:

- :func:`bootstrap_intervals`: the 95% confidence interval of each model's mean by the
  percentile bootstrap over queries (Efron & Tibshirani 1993). *Paired*: every model of a
  dataset is resampled with the same query draws, so the interval of a difference between two
  models (:func:`bootstrap_difference`) comes from the same resamples. Fixed seed and
  ``resamples`` (10,000 by default): a report's intervals are reproducible.
- :func:`holm`: Holm's step-down adjustment of p-values for the comparisons made (Holm 1979,
  "A Simple Sequentially Rejective Multiple Test Procedure"); controls the family-wise error.
- :func:`wins_ties_losses`: per query, better / equal / worse than the baseline.

Everything is vectorised numpy; ``scipy.stats.bootstrap`` and statsmodels' ``multipletests``
are the independent references the tests compare against.
"""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0
# The bootstrap draws this many query indices at a time (a resample matrix of ~32 MiB).
_BATCH_ELEMENTS = 1 << 22


def resampled_means(matrix: np.ndarray, resamples: int = RESAMPLES,
                    seed: int = SEED) -> np.ndarray:
    """``matrix``: [models, queries] scores. Returns [models, resamples] means of the same
    bootstrap resamples of the queries (with replacement) for every model."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] < 1:
        raise ValueError(f"expected [models, queries] scores with queries, got {matrix.shape}")
    n = matrix.shape[1]
    rng = np.random.default_rng(seed)
    out = np.empty((matrix.shape[0], resamples))
    step = max(1, _BATCH_ELEMENTS // n)
    for start in range(0, resamples, step):
        stop = min(start + step, resamples)
        draws = rng.integers(0, n, size=(stop - start, n))
        out[:, start:stop] = matrix[:, draws].mean(axis=2)
    return out


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> np.ndarray:
    """[..., 2]: the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the last axis."""
    tail = (1 - confidence) / 2
    return np.stack([np.quantile(samples, tail, axis=-1),
                     np.quantile(samples, 1 - tail, axis=-1)], axis=-1)


def aligned(per_query: dict[str, dict[str, float]]) -> tuple[list[str], list[str], np.ndarray]:
    """Models, the queries all of them scored, and the [models, queries] score matrix."""
    models = list(per_query)
    shared = sorted(set.intersection(*(set(s) for s in per_query.values()))) if models else []
    return models, shared, np.array([[per_query[m][q] for q in shared] for m in models],
                                    dtype=np.float64).reshape(len(models), len(shared))


def bootstrap_intervals(per_query: dict[str, dict[str, float]], resamples: int = RESAMPLES,
                        seed: int = SEED) -> dict[str, tuple[float, float]]:
    """model -> 95% interval of its mean score over the queries every model scored."""
    models, shared, matrix = aligned(per_query)
    if not shared:
        return {}
    bounds = percentile_interval(resampled_means(matrix, resamples, seed))
    return {m: (float(lo), float(hi)) for m, (lo, hi) in zip(models, bounds)}


def bootstrap_difference(a: list[float], b: list[float], resamples: int = RESAMPLES,
                         seed: int = SEED) -> tuple[float, float]:
    """95% interval of mean(a - b) over paired queries (the same draws for both)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = percentile_interval(resampled_means(diffs[None, :], resamples, seed))[0]
    return float(lo), float(hi)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given: the i-th smallest p times (m - i + 1),
    made non-decreasing in that order, capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    if p.size == 0:
        return []
    if np.any((p < 0) | (p > 1) | np.isnan(p)):
        raise ValueError(f"p-values must lie in [0, 1], got {pvalues}")
    order = np.argsort(p, kind="stable")
    scaled = (p.size - np.arange(p.size)) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted.tolist()


def wins_ties_losses(scores: list[float], baseline: list[float],
                     tolerance: float = 1e-9) -> tuple[int, int, int]:
    """Queries where ``scores`` beats, equals (within ``tolerance``) or trails ``baseline``."""
    diffs = np.asarray(scores, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return (int(np.sum(diffs > tolerance)), int(np.sum(np.abs(diffs) <= tolerance)),
            int(np.sum(diffs < -tolerance)))
