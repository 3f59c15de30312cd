"""95% intervals over cases: the percentile bootstrap with a fixed seed (same values, same
interval), since per-case scores (cosines, angles) are bounded and often skewed."""

from __future__ import annotations

import numpy as np


def summarise(values: list[float], resamples: int = 2000, seed: int = 0) -> dict:
    """n, mean and the 95% bootstrap interval of the mean (None below two values)."""
    data = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(data) == 0:
        return {"n": 0, "mean": None, "ci95": None}
    if len(data) == 1:
        return {"n": 1, "mean": float(data[0]), "ci95": None}
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"n": int(len(data)), "mean": float(data.mean()), "ci95": [float(low), float(high)]}


def auc(positives: list[float], negatives: list[float]) -> float | None:
    """The chance that a positive scores above a negative (ties count half): how well a score
    separates same-person outputs from other-person ones (1.0 perfect, 0.5 chance)."""
    pos = np.asarray([v for v in positives if v is not None], dtype=np.float64)
    neg = np.asarray([v for v in negatives if v is not None], dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))
