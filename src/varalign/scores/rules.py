"""DataComp's rule baselines (basic_filter, text_based, laion2b, image_based's caption filter) per shard.

Each function reads only the parquet columns it needs and returns one bool per requested
row (`rows`: sorted int64 row indices into the shard). The rules themselves live in
`varalign.scores.textrules` and follow DataComp's `baselines/apply_filter.py` word for word
(REFERENCE.md §2.2, §11). Differences from DataComp, on purpose:

- a null caption fails every rule (DataComp crashes on it);
- a null or non-finite width/height fails basic_filter's size rule (as NaN does in DataComp);
- laion2b's CLIP score column must be finite and non-null (the project's score-column check).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import VaralignError
from ..pool import SCORE_COLUMN, Shard, read_columns, read_scores
from . import textrules

LAION2B_THRESHOLD = np.float32(0.28)

PathArg = str | os.PathLike | None


def check_rows(shard: Shard, rows: np.ndarray) -> np.ndarray:
    """`rows` as sorted, unique int64 indices inside the shard (ValueError otherwise)."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1:
        raise ValueError(f"rows must be 1-d, got shape {rows.shape}")
    if len(rows) and (rows[0] < 0 or rows[-1] >= shard.num_rows or np.any(np.diff(rows) <= 0)):
        raise ValueError(f"rows must be sorted, unique and within [0, {shard.num_rows}) for shard {shard.name}")
    return rows


def _take(table: pa.Table, rows: np.ndarray, shard: Shard) -> pa.Table:
    if table.num_rows != shard.num_rows:
        raise VaralignError(f"parquet has {table.num_rows} rows, expected {shard.num_rows}", shard.parquet)
    if len(rows) == table.num_rows:  # sorted + unique + in range => all rows
        return table
    return table.take(pa.array(rows))


def read_text(shard: Shard, rows: np.ndarray, extra: list[str] | None = None) -> pa.Table:
    """The `text` column (and `extra` columns) of the requested rows; `text` must be a string column."""
    rows = check_rows(shard, rows)
    return _check_text(_take(read_columns(shard, ["text", *(extra or [])]), rows, shard), shard)


def _check_text(table: pa.Table, shard: Shard) -> pa.Table:
    kind = table.schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise VaralignError(f"column 'text' must hold strings, found {kind}", shard.parquet)
    return table


def _sizes(table: pa.Table, shard: Shard) -> tuple[np.ndarray, np.ndarray]:
    """original_width / original_height as float64 (null -> NaN, which fails the size rule)."""
    out = []
    for name in ("original_width", "original_height"):
        col = table.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_null(col.type)):
            raise VaralignError(f"column {name!r} must be numeric, found {col.type}", shard.parquet)
        out.append(pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False))
    return out[0], out[1]


def basic_filter_shard(shard: Shard, rows: np.ndarray, model_path: PathArg = None) -> np.ndarray:
    """DataComp basic_filter: fastText English, >2 words, >5 chars, min side >= 200, aspect <= 3."""
    table = read_text(shard, rows, ["original_width", "original_height"])
    width, height = _sizes(table, shard)
    return textrules.basic_filter_rule(table.column("text"), width, height, model_path)


def text_based_shard(shard: Shard, rows: np.ndarray, model_path: PathArg = None,
                     wordnet_dir: PathArg = None, imagenet21k_ids: PathArg = None) -> np.ndarray:
    """DataComp text_based: fastText English AND a token whose first WordNet synset is ImageNet-21k."""
    text = read_text(shard, rows).column("text")
    return textrules.text_based_rule(text, model_path, wordnet_dir, imagenet21k_ids)


def image_based_caption_shard(shard: Shard, rows: np.ndarray, model_path: PathArg = None) -> np.ndarray:
    """DataComp image_based caption filter: fastText English, >1 fastText token, >5 chars."""
    return textrules.image_based_caption_rule(read_text(shard, rows).column("text"), model_path)


def laion2b_shard(shard: Shard, rows: np.ndarray) -> np.ndarray:
    """DataComp laion2b: gcld3 English AND `clip_b32_similarity_score >= 0.28` (float32 compare)."""
    key = SCORE_COLUMN["b32"]
    rows = check_rows(shard, rows)
    table = read_columns(shard, ["text", key])
    scores = read_scores(table, key, shard)[rows]
    text = _check_text(_take(table, rows, shard), shard).column("text")
    out = np.zeros(len(rows), dtype=bool)
    idx = np.flatnonzero(scores >= LAION2B_THRESHOLD)
    if idx.size:  # gcld3 only where the score passes (same mask, less work)
        out[idx] = textrules.gcld3_english(text.take(pa.array(idx)))
    return out
