"""Turn score columns into selections: DataComp's threshold-at-rank, exact top-k, thresholds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

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


# -- the same selections over a pool stored shard by shard, without concatenating -------------------
# `parts` is a zero-argument callable returning a fresh iterable of per-shard 1-d float arrays, in pool
# order; each function reads them a few times (one pass per 16 bits of the key, then the masks), so
# memory is one shard plus a 65,536-bin histogram, however large the pool.

Parts = Callable[[], Iterable[np.ndarray]]
_DIGIT = 16
_BATCH = 1 << 18  # digits (uint16) counted per bincount: 512 KB


def order_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integer keys with the order of the float values (float32 -> uint32, float64 -> uint64)."""
    values = np.asarray(values)
    utype = np.dtype(f"u{values.dtype.itemsize}")
    if values.dtype.kind != "f" or values.dtype.itemsize not in (4, 8):
        raise TypeError(f"need float32 or float64 values, got {values.dtype}")
    bits = np.ascontiguousarray(values).view(utype)
    sign = utype.type(1) << utype.type(8 * utype.itemsize - 1)
    bits = np.where(bits == sign, utype.type(0), bits)  # -0.0 == +0.0
    return np.where(bits & sign, ~bits, bits | sign)


def _from_key(key: int, dtype: np.dtype) -> float:
    utype = np.dtype(f"u{dtype.itemsize}")
    sign = 1 << (8 * dtype.itemsize - 1)
    bits = key ^ sign if key & sign else ~key & ((1 << (8 * dtype.itemsize)) - 1)
    return float(np.array(bits, dtype=utype).view(dtype))


def _dtype_of(parts: Parts) -> np.dtype:
    for p in parts():
        return np.result_type(p.dtype, np.float32)
    return np.dtype(np.float32)


def kth_largest_parts(parts: Parts, k: int) -> tuple[float, int]:
    """The exact k-th largest value (1-based) over all parts, and how many values are strictly larger.

    Histogram refinement on order-preserving integer keys: each pass histograms the next 16 bits of
    the keys that share the prefix found so far and walks down from the top bin.
    """
    dtype = _dtype_of(parts)
    width = 8 * dtype.itemsize
    prefix, above, remaining = 0, 0, k
    for shift in range(width - _DIGIT, -1, -_DIGIT):
        hist = np.zeros(1 << _DIGIT, dtype=np.int64)
        pending: list[np.ndarray] = []  # digits of small parts, counted together: one 64k-bin bincount per
        waiting = 0                      # part would cost more than the part itself (a pool of small shards)
        for p in parts():
            keys = order_keys(np.asarray(p, dtype=dtype))
            if shift + _DIGIT < width:
                keys = keys[(keys >> np.uint64(shift + _DIGIT)).astype(np.uint64) == prefix]
            pending.append(((keys >> keys.dtype.type(shift)) & keys.dtype.type(0xFFFF)).astype(np.uint16))
            waiting += len(keys)
            if waiting >= _BATCH:
                hist += np.bincount(np.concatenate(pending), minlength=1 << _DIGIT)
                pending, waiting = [], 0
        if pending:
            hist += np.bincount(np.concatenate(pending), minlength=1 << _DIGIT)
        desc = np.cumsum(hist[::-1])  # desc[j]: values whose digit >= 65535 - j
        j = int(np.searchsorted(desc, remaining))  # first bin (from the top) reaching the k-th
        if j >= len(desc):
            raise ValueError(f"k = {k} exceeds the number of values")
        before = int(desc[j - 1]) if j else 0
        above += before
        remaining -= before
        prefix = (prefix << _DIGIT) | ((1 << _DIGIT) - 1 - j)
    return _from_key(prefix, dtype), above


def _count(parts: Parts) -> int:
    return sum(len(p) for p in parts())


def threshold_at_rank_parts(parts: Parts, n: int) -> float:
    """`threshold_at_rank` over the concatenation of `parts`: the (n+1)-th largest value."""
    total = _count(parts)
    if total == 0:
        return float("inf")
    if n >= total:
        return float(min(float(np.min(p)) for p in parts() if len(p)))
    return kth_largest_parts(parts, n + 1)[0]


def top_k_parts(parts: Parts, k: int, blocks: Parts | None = None) -> Iterator[np.ndarray]:
    """`top_k_mask` over the concatenation of `parts`, yielded part by part (ties to the earliest rows).

    `blocks`: the same values cut otherwise (the same concatenation, e.g. several small parts joined),
    for the passes that only count: fewer, larger reads when the parts are small."""
    counted = parts if blocks is None else blocks
    total = _count(counted)
    if k <= 0 or k >= total:
        for p in parts():
            yield np.full(len(p), k > 0, dtype=bool)
        return
    kth, above = kth_largest_parts(counted, k)
    need = k - above
    for p in parts():
        p = np.asarray(p)
        value = np.asarray(kth, dtype=np.result_type(p.dtype, np.float32))
        mask = p > value
        ties = np.flatnonzero(p == value)[:need]
        mask[ties] = True
        need -= len(ties)
        yield mask
