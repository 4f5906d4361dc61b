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
    n = len(scores)
    f = features.astype(np.float64)
    target_n = int(n * fraction_vas)
    s = f.T @ f / n  # whole pool, before the CLIP stage
    keep = top_k(scores, int(n * fraction))
    chunk = math.ceil((len(keep) - target_n) / num_iters)
    for it in range(num_iters):
        v = ((f[keep] @ s) * f[keep]).sum(axis=1)
        k = target_n if it == num_iters - 1 else max(target_n, len(keep) - chunk)
        keep = np.sort(keep[top_k(v, k)])
        s = f[keep].T @ f[keep] / len(keep)
    return keep
