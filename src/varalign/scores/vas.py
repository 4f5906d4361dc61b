"""Variance Alignment Score: VAS(i) = f_i^T S f_i with the image embedding f_i and a target S."""

from __future__ import annotations

import numpy as np

from ..backend import quadratic_rows, quadratic_rows_on, to_float32
from ..pool import Shard, embedding_member, iter_row_blocks

BLOCK_ROWS = 16384


def vas_scores(features: np.ndarray, target: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """VAS of every row of an in-memory `(N, D)` embedding array (float16 or float32)."""
    target = np.asarray(target, dtype=np.float32)
    out = np.empty(len(features), dtype=np.float32)
    for start in range(0, len(features), block_rows):
        block = to_float32(np.asarray(features[start : start + block_rows]))
        out[start : start + len(block)] = quadratic_rows(block, target)
    return out


def vas_shard(shard: Shard, key: str, rows: np.ndarray, target: np.ndarray,
              block_rows: int = BLOCK_ROWS, device: str = "cpu") -> np.ndarray:
    """VAS of the given (sorted) rows of one shard, streaming its npz member block by block.

    Every block is checked for NaN/inf (a bit test on float16, no decode); only the rows
    that survived the CLIP stage are decoded and scored.
    """
    member = embedding_member(shard, key, target.shape[0])
    out = np.empty(len(rows), dtype=np.float32)
    for rb in iter_row_blocks(member, rows, block_rows, reuse=True):  # rows are gathered (copied)
        if len(rb.local):
            out[rb.span] = quadratic_rows_on(rb.block[rb.local], target, device)
    return out
