"""Slow, obviously-correct re-statements of the reference algorithms (REFERENCE.md §2-4), for tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def load_pool(metadata_dir: Path, arch: str = "l14") -> tuple[list[str], np.ndarray, np.ndarray]:
    """uids, CLIP scores and image embeddings (float32) of the whole pool, shards in name order."""
    uids, scores, feats = [], [], []
    for parquet in sorted(Path(metadata_dir).glob("*.parquet")):
        table = pq.read_table(parquet)
        uids += table.column("uid").to_pylist()
        scores.append(table.column(f"clip_{arch}_similarity_score").to_numpy().astype(np.float32))
        with np.load(parquet.with_suffix(".npz"), allow_pickle=False) as npz:
            feats.append(npz[f"{arch}_img"].astype(np.float32))
    return uids, np.concatenate(scores), np.concatenate(feats)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best rows; ties go to the earliest row (stable sort)."""
    return np.sort(np.argsort(-scores, kind="stable")[:k])


def vas_loop(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """f_i^T S f_i, one row at a time, in float64."""
    s = target.astype(np.float64)
    return np.array([f @ s @ f for f in features.astype(np.float64)])


def vas_select(scores, features, target, fraction, fraction_vas):
    n = len(scores)
    cand = top_k(scores, int(n * fraction))
    vas = vas_loop(features[cand], target)
    return np.sort(cand[top_k(vas, int(n * fraction_vas))])


def vas_d_select(scores, features, fraction, fraction_vas, num_iters):
    """load_uids_with_vas_d_filter as REFERENCE.md §4.1 states it (plain loop, float64)."""
    return vas_d_rounds(scores, features, fraction, fraction_vas, num_iters)[0]


def vas_d_rounds(scores, features, fraction, fraction_vas, num_iters):
    """vas_d_select's loop, also tracing every row of the pool: the round that removed it (-1: never a
    candidate; num_iters: kept to the end) and its VAS-D score in the last round that scored it (NaN: never)."""
    n = len(scores)
    f = features.astype(np.float64)
    target_n = int(n * fraction_vas)
    s = f.T @ f / n  # whole pool, before the CLIP stage
    keep = top_k(scores, int(n * fraction))
    removed_at = np.full(n, -1)
    removed_at[keep] = num_iters
    last = np.full(n, np.nan)
    chunk = math.ceil((len(keep) - target_n) / num_iters)
    for it in range(num_iters):
        v = ((f[keep] @ s) * f[keep]).sum(axis=1)
        last[keep] = v
        k = target_n if it == num_iters - 1 else max(target_n, len(keep) - chunk)
        survivors = np.sort(keep[top_k(v, k)])
        removed_at[np.setdiff1d(keep, survivors)] = it
        keep = survivors
        s = f[keep].T @ f[keep] / len(keep)
    return keep, removed_at, last


def datacomp_threshold(scores: np.ndarray, fraction: float):
    """DataComp's clip_score --fraction: sort descending, take the value at index floor(N*f) (the
    (floor(N*f)+1)-th largest; the smallest when that is past the end); rows >= it are kept."""
    ranked = -np.sort(-scores)
    return ranked[min(int(len(scores) * fraction), len(scores) - 1)]


def combine(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union or intersection of two sorted row selections."""
    return np.union1d(a, b) if op == "union" else np.intersect1d(a, b)


def lowrank_features(features: np.ndarray, candidates: np.ndarray, rank: int) -> np.ndarray:
    """Features projected on the top-`rank` eigenvectors of the candidates' second moment (float64)."""
    f = features.astype(np.float64)
    _, vecs = np.linalg.eigh(f[candidates].T @ f[candidates])
    return f @ vecs[:, ::-1][:, :rank]
