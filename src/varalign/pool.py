"""A DataComp pool on disk: shards of `{name}.parquet` + `{name}.npz`, rows aligned."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import LocalFileSystem

from . import storage
from .backend import check_finite
from .errors import VaralignError
from .npz import NpzMember, iter_blocks, open_member

ARCHS = {"l14": 768, "b32": 512}
SCORE_COLUMN = {"l14": "clip_l14_similarity_score", "b32": "clip_b32_similarity_score"}
BLOCK_ROWS = 16384  # npz rows inflated at once


def image_key(arch: str) -> str:
    return f"{arch}_img"


def text_key(arch: str) -> str:
    return f"{arch}_txt"


@dataclass(frozen=True)
class Shard:
    """One metadata shard: its parquet, its npz (if present) and its row count."""

    name: str
    parquet: str
    npz: str | None
    num_rows: int


def discover_shards(metadata_dir: str | os.PathLike, need_npz: bool) -> list[Shard]:
    """List the pool's shards sorted by name, checking each parquet has its npz and vice versa.

    A parquet without its npz is an error only when the method reads embeddings (DataComp's
    default download is parquet only, which is enough for `clip_score` and `no_filter`);
    an npz without its parquet is always an error.
    """
    root = str(metadata_dir)
    if not storage.isdir(root):
        raise VaralignError("metadata directory not found" + (" (no objects under this prefix, or no such bucket)"
                                                              if storage.is_url(root) else ""), metadata_dir)
    names = storage.listdir(root)
    prefix = storage.join(root, "x")[:-1]  # `storage.join(root, name)` is prefix + name: made once, not per file
    parquets = {n[: -len(".parquet")]: prefix + n for n in names if n.endswith(".parquet")}
    npzs = {n[: -len(".npz")]: prefix + n for n in names if n.endswith(".npz")}
    if not parquets:
        raise VaralignError("no .parquet files in metadata directory", metadata_dir)
    if "embed.json" in names:
        _check_embed_finished(prefix + "embed.json")
    orphans = sorted(set(npzs) - set(parquets))
    if orphans:
        raise VaralignError("npz has no sibling parquet", npzs[orphans[0]])
    if need_npz:
        missing = sorted(set(parquets) - set(npzs))
        if missing:
            raise VaralignError("parquet has no sibling npz (this method needs embeddings)", parquets[missing[0]])
    shards = []
    for name in sorted(parquets):
        shards.append(Shard(name, str(parquets[name]), str(npzs[name]) if name in npzs else None,
                            parquet_rows(parquets[name])))
    return shards


def _check_embed_finished(path: str) -> None:
    """A pool `varalign embed` is writing, or whose run was killed or failed, holds only some of its shards:
    refused, not read as if it were the whole pool. Its `embed.json` names the shards planned and finished."""
    try:
        data = json.loads(storage.read_bytes(path))
    except (OSError, ValueError):
        return  # not embed's manifest (a user's file of that name): the pool is read as any other
    if not isinstance(data, dict) or not isinstance(data.get("planned"), list) or \
            not isinstance(data.get("shards"), dict):
        return
    left = sorted(set(map(str, data["planned"])) - set(data["shards"]))
    if not left:
        return
    progress = data.get("progress") if isinstance(data.get("progress"), list) else []
    left = sorted(set(left) - set(map(str, progress)))  # those the run in progress (or killed) has finished
    total = len(data["planned"])
    where = (f"has finished {total - len(left)} of {total} shards ({left[0]} not yet)" if left
             else f"has written all {total} shards but not finished")
    raise VaralignError(f"pool is incomplete: varalign embed {where}; run the same embed command again to complete "
                        "it, or remove embed.json to use the finished shards alone", path)


def parquet_rows(path: str | os.PathLike) -> int:
    """The row count in a parquet file's footer."""
    if not storage.is_url(path):
        rows = footer_rows(path)
        if rows is not None:
            return rows
    try:
        if storage.is_url(path):
            with storage.open_read(path, block_size=1 << 20) as fh:
                return pq.ParquetFile(fh).metadata.num_rows
        return pq.ParquetFile(path).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise VaralignError(f"not a readable parquet file ({_short(exc)})", path) from None


def footer_rows(path: str | os.PathLike) -> int | None:
    """A local parquet's row count read straight from its footer (FileMetaData's `num_rows`, field 3 of
    the Thrift struct): two positioned reads and ~40 us of parsing, a third of what `pq.ParquetFile`
    costs (which also builds the Arrow schema); discovering a pool of many small shards does it once a
    shard. None for anything unexpected (not a plain parquet footer, an encrypted one, a read error):
    the caller then opens the file with pyarrow, which reads it or says what is wrong."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < 12:
            return None
        tail = os.pread(fd, 8, size - 8)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != b"PAR1" or not 0 < length <= size - 12:
            return None
        footer = os.pread(fd, length, size - 8 - length)
        if len(footer) != length:
            return None
        rows = _footer_num_rows(footer)
    except (OSError, IndexError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    return rows if rows is not None and rows >= 0 else None


# Thrift compact protocol (the encoding of parquet's footer): just enough to skip to one top-level field
_T_BOOL_TRUE, _T_BOOL_FALSE, _T_BYTE, _T_I16, _T_I32, _T_I64, _T_DOUBLE, _T_BINARY, _T_LIST, _T_SET, _T_MAP, \
    _T_STRUCT = range(1, 13)


def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = out = 0
    while True:
        x = b[i]
        i += 1
        out |= (x & 0x7F) << shift
        if x < 0x80:
            return out, i
        shift += 7


def _skip(b: bytes, i: int, t: int, depth: int = 0) -> int:
    """The position after the value of compact type `t` at `i`."""
    if depth > 64:
        raise ValueError("thrift structure too deep")
    if t == _T_STRUCT:  # the fields of parquet's schema elements inline: ints, names, a nested struct
        while True:
            head = b[i]
            i += 1
            if head == 0:
                return i
            if head < 0x10:  # the field id in full (zigzag varint) instead of a delta
                i = _varint(b, i)[1]
            ft = head & 0x0F
            if _T_I16 <= ft <= _T_I64:
                while b[i] & 0x80:
                    i += 1
                i += 1
            elif ft == _T_BINARY:
                n, i = _varint(b, i)
                i += n
            elif ft > _T_BOOL_FALSE:
                i = _skip(b, i, ft, depth + 1)
    if t in (_T_BOOL_TRUE, _T_BOOL_FALSE):  # a struct field's bool is in its header
        return i
    if t == _T_BYTE:
        return i + 1
    if t in (_T_I16, _T_I32, _T_I64):
        return _varint(b, i)[1]
    if t == _T_DOUBLE:
        return i + 8
    if t == _T_BINARY:
        n, i = _varint(b, i)
        return i + n
    if t in (_T_LIST, _T_SET):
        head = b[i]
        i += 1
        n, et = head >> 4, head & 0x0F
        if n == 15:
            n, i = _varint(b, i)
        if et in (_T_BOOL_TRUE, _T_BOOL_FALSE):  # a list's bools take a byte each
            return i + n
        for _ in range(n):
            i = _skip(b, i, et, depth + 1)
            if i > len(b):  # a damaged count: not a loop over the claimed size
                raise ValueError("thrift list runs past the footer")
        return i
    if t == _T_MAP:
        n, i = _varint(b, i)
        if n:
            kv = b[i]
            i += 1
            for _ in range(n):
                i = _skip(b, _skip(b, i, kv >> 4, depth + 1), kv & 0x0F, depth + 1)
                if i > len(b):
                    raise ValueError("thrift map runs past the footer")
        return i
    raise ValueError(f"unknown thrift compact type {t}")


def _footer_num_rows(b: bytes) -> int | None:
    """`num_rows` of a parquet FileMetaData in Thrift compact form, or None unless the footer starts the
    way every parquet writer starts it: field 1 (version) an i32, field 2 (schema) a list of structs,
    field 3 (num_rows) an i64, field 4 (row_groups) a list of structs, and ends with a struct's stop byte.
    The row groups' column chunks are not parsed (that is ~5x the cost of the rest, and the parse
    pyarrow does anyway when the shard's columns are read, failing there with the file's name if they
    are damaged); a zeroed or garbled footer, or one cut short, fails here and goes to pyarrow now."""
    if not b or b[-1] != 0:
        return None
    i, fid, rows = 0, 0, None
    for field, expected in ((1, _T_I32), (2, _T_LIST), (3, _T_I64), (4, _T_LIST)):
        head = b[i]
        i += 1
        delta, t = head >> 4, head & 0x0F
        if delta:
            fid += delta
        else:
            z, i = _varint(b, i)
            fid = (z >> 1) ^ -(z & 1)
        if fid != field or t != expected:
            return None
        if t == _T_LIST and b[i] & 0x0F != _T_STRUCT:  # schema elements, row groups
            return None
        if field == 3:
            z, i = _varint(b, i)
            rows = (z >> 1) ^ -(z & 1)
        elif field < 3:
            i = _skip(b, i, t)
        if i >= len(b):
            return None
    return rows


def read_columns(shard: Shard, columns: list[str]) -> pa.Table:
    """Read only `columns` of the shard's parquet; a missing column names the file."""
    try:
        fs, path = storage.arrow_filesystem(shard.parquet)  # a URL through fsspec, a local path as it is
        # one open for the schema and the columns; ParquetFile, not read_table: no dataset layer (which
        # imports pandas, ~30 MB, and costs ~5 ms a file: the per-shard cost of a pool of small shards)
        # locally no pre-buffering and no thread pool of its own (the workers run shards side by side): ~40%
        # less per file of 1,000 rows; a URL keeps pre_buffer's coalesced ranged reads. A local path goes
        # through one LocalFileSystem kept for the process (pyarrow would make one and stat the path first)
        pf = pq.ParquetFile(path, filesystem=fs if fs is not None else _local_fs(), pre_buffer=fs is not None)
        table = pf.read(columns=columns, use_threads=False)  # a name that is no column is left out
    except (OSError, pa.ArrowException) as exc:
        raise VaralignError(f"not a readable parquet file ({_short(exc)})", shard.parquet) from None
    names = set(table.column_names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise VaralignError(f"parquet has no column {missing[0]!r}", shard.parquet)
    return table


@functools.cache
def _local_fs() -> LocalFileSystem:
    return LocalFileSystem()  # stateless: shared by the worker threads


def read_scores(table: pa.Table, column: str, shard: Shard) -> np.ndarray:
    """A float score column as float32; NaN/inf/null name the file and row."""
    col = table.column(column)
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise VaralignError(f"column {column!r} is null at row {row}", shard.parquet)
    if not pa.types.is_floating(col.type):  # a bool or a numeric string is not a score
        raise VaralignError(f"column {column!r} must be floating point, found {col.type}", shard.parquet)
    values = col.to_numpy().astype(np.float32, copy=False)
    bad = ~np.isfinite(values)
    if bad.any():
        raise VaralignError(f"column {column!r} is not finite at row {int(np.flatnonzero(bad)[0])}", shard.parquet)
    return values


def embedding_member(shard: Shard, key: str, dim: int | None = None) -> NpzMember:
    """Open the shard's npz member `key` and check it against the parquet (rows) and `dim`."""
    if shard.npz is None:
        raise VaralignError("parquet has no sibling npz (this method needs embeddings)", shard.parquet)
    member = open_member(shard.npz, key)
    if len(member.shape) != 2:
        raise VaralignError(f"npz member {key!r} must be 2-d, found shape {member.shape}", shard.npz)
    if member.shape[0] != shard.num_rows:
        raise VaralignError(
            f"row-count mismatch: npz {key!r} has {member.shape[0]} rows, parquet has {shard.num_rows}", shard.npz)
    if member.dtype.kind != "f":
        raise VaralignError(f"npz member {key!r} must be floating point, found {member.dtype}", shard.npz)
    if dim is not None and member.shape[1] != dim:
        raise VaralignError(f"npz member {key!r} has dim {member.shape[1]}, expected {dim}", shard.npz)
    return member


def iter_checked_blocks(member: NpzMember, block_rows: int, reuse: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """`(start, block)` for consecutive row blocks of an npz member, each checked for NaN/inf
    (a bit test on float16, no decode; the error names the file, the key and the pool row).
    `reuse`: as `npz.iter_blocks` (every block overwrites the previous one)."""
    start = 0
    for block in iter_blocks(member, block_rows, reuse=reuse):
        check_finite(block, start, member.path, member.key, member)
        yield start, block
        start += len(block)


class RowBlock(NamedTuple):
    """One block of a member and the requested rows that fall inside it."""

    start: int  # member row of block[0]
    block: np.ndarray  # member rows start .. start + len(block), NaN/inf-checked
    span: slice  # the entries of the requested `rows` that fall in this block
    local: np.ndarray  # those rows as indices into `block` (rows[span] - start)


def iter_row_blocks(member: NpzMember, rows: np.ndarray, block_rows: int,
                    reuse: bool = False) -> Iterator[RowBlock]:
    """Walk a member block by block with the sorted row indices `rows` that each block holds.

    Every block is yielded (and NaN/inf-checked), also those holding none of `rows` (then
    `local` is empty): the whole member is read, so its CRC is checked at the end.
    """
    pos = 0
    for start, block in iter_checked_blocks(member, block_rows, reuse):
        stop = int(np.searchsorted(rows, start + len(block), side="left"))
        yield RowBlock(start, block, slice(pos, stop), rows[pos:stop] - start)
        pos = stop


def read_rows(shard: Shard, key: str, rows: np.ndarray, dim: int | None = None,
              block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """The given (sorted) rows of one npz member, in its stored dtype; every block NaN/inf-checked."""
    member = embedding_member(shard, key, dim)
    out = np.empty((len(rows), member.shape[1]), dtype=member.dtype)
    for rb in iter_row_blocks(member, rows, block_rows):
        out[rb.span] = rb.block[rb.local]
    return out


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
