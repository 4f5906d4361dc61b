"""This run's pool-wide arrays (the scan's uids and columns, keep masks, scores, sorted uid runs), one flat
file each in the work directory: shard i's part is records `offsets[i]:offsets[i + 1]`, read back with one
positioned read. One file per array, not per shard and array: a pool of many small shards costs no more
file creations, opens and zip headers than a pool of a few large ones, and the driver holds only the
offsets (8 bytes a shard), never an array of the pool.

These files are not what a killed run resumes from (the per-shard task results are, see `workdir.py`):
every run rewrites them from those results.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

WRITE_BUFFER = 1 << 18  # bytes an Appender gathers before it writes


def offsets_of(counts: list[int] | np.ndarray) -> np.ndarray:
    """`[0, c0, c0 + c1, ...]`: where each shard's records start."""
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


class Flat:
    """One pool-wide array of `dtype` in the flat file `path`, shard by shard at `offsets`."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, offsets: np.ndarray) -> None:
        self.path, self.dtype, self.offsets = str(path), np.dtype(dtype), offsets
        self._fd: int | None = None  # kept open: a pool of many small shards reads each file once per shard

    def close(self) -> None:
        """Close the file kept open for reading (read() opens it again if needed)."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    __del__ = close

    @classmethod
    def create(cls, path: str | os.PathLike, dtype: np.dtype, offsets: np.ndarray) -> Flat:
        """An empty (zero-filled, sparse) file of the right size, replacing what a previous run left."""
        with open(path, "wb") as fh:
            fh.truncate(int(offsets[-1]) * np.dtype(dtype).itemsize)
        return cls(path, dtype, offsets)

    def count(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def get(self, i: int) -> np.ndarray:
        """Shard i's records."""
        return self.read(int(self.offsets[i]), int(self.offsets[i + 1]))

    def span(self, a: int, b: int) -> np.ndarray:
        """The records of shards `a .. b-1`, one after the other (one read)."""
        return self.read(int(self.offsets[a]), int(self.offsets[b]))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Records `[start, stop)` of the whole array."""
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        out = np.empty(stop - start, dtype=self.dtype)
        view, pos = memoryview(out.view(np.uint8)), start * self.dtype.itemsize
        while len(view):
            n = os.preadv(self._fd, [view], pos)
            if n <= 0:
                raise OSError(f"{self.path}: short read at byte {pos}")
            view, pos = view[n:], pos + n
        return out

    def put(self, i: int, array: np.ndarray) -> None:
        """Write shard i's records (any order of shards)."""
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if len(array) != self.count(i):
            raise ValueError(f"shard {i} has {self.count(i)} records here, got {len(array)}")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            data, pos = memoryview(array.view(np.uint8)), int(self.offsets[i]) * self.dtype.itemsize
            while len(data):
                n = os.pwrite(fd, data, pos)
                data, pos = data[n:], pos + n
        finally:
            os.close(fd)


class Appender:
    """Writes a pool-wide array shard after shard, in shard order, through one open file."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype | None = None) -> None:
        self.path, self.dtype = Path(path), None if dtype is None else np.dtype(dtype)
        self.counts: list[int] = []
        # a buffer of its own: the arrays of small shards are written a few at a time, not one write call each
        self.fh: BinaryIO | None = open(self.path, "wb", buffering=WRITE_BUFFER)  # noqa: SIM115 - closed by close()

    def add(self, array: np.ndarray) -> None:
        if self.dtype is None:
            self.dtype = array.dtype
        array = np.ascontiguousarray(array, dtype=self.dtype)
        self.fh.write(array.view(np.uint8))
        self.counts.append(len(array))

    def skip(self) -> None:
        """A shard with no records."""
        self.counts.append(0)

    def close(self) -> Flat:
        """The array written, to read back shard by shard."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        return Flat(self.path, self.dtype if self.dtype is not None else np.dtype(np.float32),
                    offsets_of(self.counts))

    def __del__(self) -> None:
        if getattr(self, "fh", None) is not None:
            self.fh.close()
