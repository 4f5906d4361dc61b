"""Pass 1 over the parquets: uids, the CLIP score column, and the optional `--given_uids_path` restriction."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .errors import VaralignError
from .pool import Shard, read_columns, read_scores
from .uids import first_duplicate, hex_to_uids, isin_sorted, load_subset, sort_uids


@dataclass
class ShardScan:
    """Rows of one shard that belong to the pool: uids, scores, and row numbers when restricted."""

    uids: np.ndarray
    columns: dict[str, np.ndarray]  # float32 score columns, restricted like `uids`
    rows: np.ndarray | None  # row indices into the shard when --given_uids_path restricts it
    sorted_uids: np.ndarray | None = None  # `uids` sorted: the shard's run for the pool-wide duplicate check


def _given(path: str) -> np.ndarray:
    st = os.stat(path)  # keyed by the file's identity too: a file rewritten in place is read again
    return _given_at(path, st.st_size, st.st_mtime_ns, st.st_ino)


@lru_cache(maxsize=2)
def _given_at(path: str, size: int, mtime_ns: int, ino: int) -> np.ndarray:
    return load_subset(path)


def scan_shard(shard: Shard, score_columns: list[str], given_path: str | None) -> ShardScan:
    """Read uids (+ score columns) of a shard, validate them, and apply the restriction."""
    table = read_columns(shard, ["uid"] + list(score_columns))
    if table.num_rows != shard.num_rows:  # the file changed under us
        raise VaralignError(f"parquet now has {table.num_rows} rows, expected {shard.num_rows}", shard.parquet)
    uids = hex_to_uids(table.column("uid"), shard.parquet)
    ordered = sort_uids(uids)
    dup = first_duplicate(ordered)
    if dup is not None:
        raise VaralignError("duplicate uid within the shard", shard.parquet)
    columns = {c: read_scores(table, c, shard) for c in score_columns}
    rows = None
    if given_path is not None:
        keep = isin_sorted(uids, _given(given_path))
        rows = np.flatnonzero(keep).astype(np.int64)
        uids = uids[rows]
        columns = {c: v[rows] for c, v in columns.items()}
        ordered = ordered[isin_sorted(ordered, _given(given_path))]
    return ShardScan(uids, columns, rows, ordered)
