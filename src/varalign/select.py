"""Turn score columns into selections: DataComp's threshold-at-rank, exact top-k, thresholds."""

from __future__ import annotations

import numpy as np


def count_for_fraction(pool_size: int, fraction: float) -> int:
    """`int(N * f)` exactly as the reference scripts compute it (float64 product, truncated)."""
    return int(pool_size * fraction)


def datacomp_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's `--fraction`: the (⌊N·f⌋+1)-th largest score; rows `>=` it are kept.

    DataComp sorts the whole column and indexes `sorted_desc[int(N*f)]`; `np.partition`
    finds the same value in linear time. At f = 1 DataComp raises IndexError; we keep every row.
    """
    return threshold_at_rank(scores, count_for_fraction(len(scores), fraction))


def threshold_at_rank(scores: np.ndarray, n: int) -> float:
    """The (n+1)-th largest score (the smallest one if n >= len: keep every row)."""
    if len(scores) == 0:
        return float("inf")
    if n >= len(scores):
        return float(np.min(scores))
    kth = len(scores) - 1 - n
    return float(np.partition(scores, kth)[kth])


def at_least(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Rows with `score >= threshold`, compared in the scores' own precision like DataComp."""
    return scores >= np.asarray(threshold, dtype=scores.dtype)


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Exactly `k` rows with the highest scores; ties at the cut go to the earliest rows.

    The reference uses `np.argpartition`/`torch.topk`, whose choice among tied rows is
    arbitrary; breaking ties by pool order makes our result reproducible across executors.
    """
    n = len(scores)
    mask = np.zeros(n, dtype=bool)
    if k <= 0:
        return mask
    if k >= n:
        mask[:] = True
        return mask
    kth_value = np.partition(scores, n - k)[n - k]
    mask = scores > kth_value
    need = k - int(mask.sum())
    if need > 0:
        mask[np.flatnonzero(scores == kth_value)[:need]] = True
    return mask
