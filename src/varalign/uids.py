"""DataComp uids: 32-hex-char strings <-> sorted `u8,u8` arrays (the subset file format)."""

from __future__ import annotations

import binascii
import os
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from .atomic import save_npy
from .errors import VaralignError
from .npz import load_npy

UID_DTYPE = np.dtype("u8,u8")

# hex digit value per byte; 255 marks "not a hex digit"
_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def hex_to_uids(values: pa.Array | pa.ChunkedArray | list[str] | np.ndarray, source: object = None) -> np.ndarray:
    """Parse 32-hex-char uid strings into a `u8,u8` array (f0 = high 64 bits, f1 = low 64 bits).

    Same numbers as DataComp's `(int(uid[:16], 16), int(uid[16:32], 16))`; any string that is not
    exactly 32 hex digits raises `VaralignError` naming `source` and the first bad row.
    """
    arr = _as_string_array(values, source)
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=UID_DTYPE)
    if arr.null_count:
        _raise_bad_uid(arr, int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]), source)
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int32 if pa.types.is_string(arr.type) else np.int64)
    offsets = offsets[arr.offset : arr.offset + n + 1]
    lengths = offsets[1:] - offsets[:-1]
    if (lengths != 32).any():
        _raise_bad_uid(arr, int(np.flatnonzero(lengths != 32)[0]), source)
    start = int(offsets[0])
    try:  # the 32 n hex digits, back to back, as 16 n bytes (big-endian words); a non-hex digit raises
        raw = binascii.a2b_hex(memoryview(buffers[2])[start : start + 32 * n])
    except binascii.Error:
        digits = _HEX[np.frombuffer(buffers[2], dtype=np.uint8, count=32 * n, offset=start)].reshape(n, 32)
        _raise_bad_uid(arr, int(np.flatnonzero((digits == 255).any(axis=1))[0]), source)
    words = np.frombuffer(raw, dtype=">u8").reshape(n, 2)
    out = np.empty(n, dtype=UID_DTYPE)
    out["f0"] = words[:, 0]
    out["f1"] = words[:, 1]
    return out


def _as_string_array(values: object, source: object) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        try:
            values = pa.array(list(values) if isinstance(values, np.ndarray) else values, type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise VaralignError(f"uids must be strings ({exc})", source) from None
    if pa.types.is_large_string(values.type) or pa.types.is_string(values.type):
        return values
    if pa.types.is_string_view(values.type) or pa.types.is_dictionary(values.type):
        return values.cast(pa.string())
    raise VaralignError(f"uid column must be strings, found {values.type}", source)


def _raise_bad_uid(arr: pa.Array, row: int, source: object) -> None:
    value = arr[row].as_py()
    if value is None:
        raise VaralignError(f"null uid at row {row} (want 32 hex digits)", source)
    raise VaralignError(f"malformed uid {str(value)[:40]!r} at row {row} (want 32 hex digits)", source)


def uids_to_hex(uids: np.ndarray) -> pa.Array:
    """`u8,u8` array -> pyarrow string array of 32-char lowercase hex uids."""
    n = len(uids)
    words = np.empty((n, 2), dtype=">u8")
    words[:, 0] = uids["f0"]
    words[:, 1] = uids["f1"]
    nibbles = np.empty((n, 32), dtype=np.uint8)
    raw = words.view(np.uint8).reshape(n, 16)
    nibbles[:, 0::2] = raw >> 4
    nibbles[:, 1::2] = raw & 15
    chars = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes()))


def sort_uids(uids: np.ndarray) -> np.ndarray:
    """Lexicographic (high, low) sort, the order DataComp's resharder searches in."""
    return uids[uid_order(uids)]


def uid_order(uids: np.ndarray, then: np.ndarray | None = None) -> np.ndarray:
    """Indices that sort `uids` by (high, low[, then]): `np.lexsort((then, f1, f0))`, faster.

    Random 128-bit uids almost never share their high 64 bits, so one (SIMD) argsort of the high
    words orders them; only when two high words are equal is the full lexsort needed.
    """
    hi = uids["f0"]
    order = np.argsort(hi)
    ranked = hi[order]
    if len(ranked) > 1 and bool((ranked[1:] == ranked[:-1]).any()):
        keys = (uids["f1"], hi) if then is None else (then, uids["f1"], hi)
        return np.lexsort(keys)
    return order


def first_duplicate(sorted_uids: np.ndarray) -> int | None:
    """Index of the first repeated uid in a sorted array, or None."""
    if len(sorted_uids) < 2:
        return None
    high, low = sorted_uids["f0"], sorted_uids["f1"]
    pairs = np.flatnonzero(high[1:] == high[:-1])  # neighbours sharing the high word (rare), then the low word
    hits = pairs[low[pairs + 1] == low[pairs]]
    return int(hits[0]) if len(hits) else None


def isin_sorted(query: np.ndarray, ref_sorted: np.ndarray) -> np.ndarray:
    """Boolean mask: which `query` uids occur in the sorted, duplicate-free `ref_sorted`."""
    if len(ref_sorted) == 0 or len(query) == 0:
        return np.zeros(len(query), dtype=bool)
    hi = ref_sorted["f0"]
    left = np.searchsorted(hi, query["f0"], side="left")
    right = np.searchsorted(hi, query["f0"], side="right")
    found = np.zeros(len(query), dtype=bool)
    single = right - left == 1
    idx = left[single]
    found[single] = ref_sorted["f1"][idx] == query["f1"][single]
    for i in np.flatnonzero(right - left > 1):  # two uids sharing the high 64 bits: vanishingly rare
        found[i] = bool((ref_sorted["f1"][left[i]:right[i]] == query["f1"][i]).any())
    return found


def save_subset(path: str | os.PathLike, uids: np.ndarray) -> np.ndarray:
    """Sort and save as DataComp's subset file (`np.save` of a `u8,u8` array), atomically."""
    arr = sort_uids(np.asarray(uids, dtype=UID_DTYPE))
    save_npy(path, arr)
    return arr


def load_subset(path: str | os.PathLike) -> np.ndarray:
    """Read a subset file as DataComp's resharder does (npy, or a raw `u8,u8` memmap); sorted, unique."""
    return load_subset_counts(path)[0]


def load_subset_counts(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A subset file as (sorted unique uids, how often each occurs): a uid repeated k times is
    written k times by the resharder (DataComp's up-sampling)."""
    arr = sort_uids(_read_subset(path))
    if len(arr) == 0:
        return arr, np.zeros(0, dtype=np.int64)
    new = np.ones(len(arr), dtype=bool)
    new[1:] = (arr["f0"][1:] != arr["f0"][:-1]) | (arr["f1"][1:] != arr["f1"][:-1])
    starts = np.flatnonzero(new)
    return arr[starts], np.diff(np.append(starts, len(arr))).astype(np.int64)


def _read_subset(path: str | os.PathLike) -> np.ndarray:
    """The raw `u8,u8` array of a subset file (npy, or raw records like DataComp's resharder)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise VaralignError(f"cannot read subset file ({exc.strerror})", path) from None
    try:
        if magic == b"\x93NUMPY":
            arr = load_npy(path, mmap_mode="r")
        else:
            arr = np.memmap(path, dtype=UID_DTYPE, mode="r")
    except ValueError as exc:
        raise VaralignError(f"not a uid subset file ({exc})", path) from None
    if arr.dtype != UID_DTYPE or arr.ndim != 1:
        raise VaralignError(f"subset file must hold a 1-d u8,u8 array, found {arr.dtype} {arr.shape}", path)
    return np.asarray(arr)


# -- sorted runs on disk: k-way merge in bounded memory ---------------------------------------------
MERGE_BUDGET = 1 << 18  # uids read per merge step across all runs (4 MiB), whatever the pool size


def save_run(path: str | os.PathLike, uids: np.ndarray) -> None:
    """Write a sorted uid run as raw `u8,u8` records (read back in slices by `read_run`)."""
    np.ascontiguousarray(uids, dtype=UID_DTYPE).tofile(path)


def read_run(path: str | os.PathLike, start: int, stop: int, fds: dict[str, int] | None = None) -> np.ndarray:
    """Records `[start, stop)` of a raw run file (through `fds`, {path: open fd}, when given: a merge of
    many runs in one file opens it once, not once per run and step)."""
    if fds is None:
        return np.fromfile(path, dtype=UID_DTYPE, count=max(0, stop - start), offset=start * UID_DTYPE.itemsize)
    out = np.empty(max(0, stop - start), dtype=UID_DTYPE)
    _read_into(path, start, out, fds)
    return out


def _read_into(path: str | os.PathLike, start: int, out: np.ndarray, fds: dict[str, int]) -> None:
    """Fill `out` with the records of a raw run file from record `start` on (one positioned read)."""
    key = str(path)
    fd = fds.get(key)
    if fd is None:
        fd = fds[key] = os.open(key, os.O_RDONLY)
    view, pos = memoryview(out.view(np.uint8)), start * UID_DTYPE.itemsize
    while len(view):
        n = os.preadv(fd, [view], pos)
        if n <= 0:
            raise OSError(f"{key}: short read at byte {pos}")
        view, pos = view[n:], pos + n


def merge_runs(paths: list[str], lengths: list[int] | np.ndarray, budget: int | None = None,
               starts: list[int] | np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Merge sorted run files; yield `(uids, run_index)` batches in ascending uid order. Run r is
    `lengths[r]` records of `paths[r]` from record `starts[r]` (default 0): several runs may share a file.

    Each step reads the next `budget // runs` uids of every run and takes from each those <= the
    smallest last-read uid of the runs that have more to read (a run read to its end bounds
    nothing: without that rule every step would end at the smallest run maximum, one run per step,
    and the merge would read every run once per run). The batch is sorted; equal uids land in the
    same batch, ordered by run. Memory: about 4x the budget's uids (16 MiB), whatever the pool size.
    """
    base = np.zeros(len(paths), dtype=np.int64) if starts is None else np.asarray(starts, dtype=np.int64)
    pos = base.copy()
    ends = base + np.asarray(lengths, dtype=np.int64)
    chunk = max(1, (budget or MERGE_BUDGET) // max(1, len(paths)))
    fds: dict[str, int] = {}
    try:
        yield from _merge(paths, pos, ends, chunk, fds)
    finally:
        for fd in fds.values():
            os.close(fd)


def _merge(paths: list[str], pos: np.ndarray, ends: np.ndarray, chunk: int,
           fds: dict[str, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # a step's run heads are read side by side into one array (`at[j]`: where live run j's head starts) and
    # cut with whole-array operations: many small runs cost one positioned read each per step, not also a
    # search and an array apiece
    while True:
        live = np.flatnonzero(pos < ends)
        if not len(live):
            return
        stops = np.minimum(pos[live] + chunk, ends[live])
        sizes = stops - pos[live]
        at = np.zeros(len(live) + 1, dtype=np.int64)
        np.cumsum(sizes, out=at[1:])
        heads = np.empty(int(at[-1]), dtype=UID_DTYPE)
        for r, start, a, b in zip(live.tolist(), pos[live].tolist(), at[:-1].tolist(), at[1:].tolist(), strict=True):
            _read_into(paths[r], start, heads[a:b], fds)
        more = np.flatnonzero(stops < ends[live])  # runs with uids beyond their head
        if len(more):
            lasts = heads[at[1:][more] - 1]
            bound = lasts[uid_order(lasts)[0]]
            high, low = heads["f0"], heads["f1"]
            # each head is sorted: the uids <= bound are a prefix of it, and the batch is those prefixes
            keep = (high < bound["f0"]) | ((high == bound["f0"]) & (low <= bound["f1"]))
            takes = np.add.reduceat(keep, at[:-1], dtype=np.int64)  # every live head holds >= 1 uid
            batch = heads[keep]
            del keep, high, low
        else:  # every run read to its end: the rest is this batch
            takes, batch = sizes, heads
        del heads
        pos[live] += takes
        source = np.repeat(live.astype(np.int32), takes)
        order = uid_order(batch, source)
        yield batch[order], source[order]


def first_shared(batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> int | None:
    """The latest run holding the smallest uid that occurs in two runs, or None."""
    for uids, source in batches:
        dup = first_duplicate(uids)
        if dup is not None:
            same = (uids["f0"] == uids["f0"][dup]) & (uids["f1"] == uids["f1"][dup])
            return int(source[same].max())
    return None


def stream_subset(path: str | os.PathLike, total: int, batches: Iterable[np.ndarray]) -> None:
    """Write `total` sorted uids, arriving in batches, as the bytes `save_subset` would write."""
    header = {"descr": np.lib.format.dtype_to_descr(UID_DTYPE), "fortran_order": False, "shape": (total,)}
    written = 0
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for batch in batches:
            fh.write(np.ascontiguousarray(batch, dtype=UID_DTYPE).view(np.uint8))  # the buffer, not a bytes copy
            written += len(batch)
    if written != total:
        raise RuntimeError(f"wrote {written} uids, expected {total}")
