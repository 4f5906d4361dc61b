"""Stream one member of a DataComp `.npz` without reading the others; write an `.npz`.

`np.load(path)[key]` inflates with the standard zlib and copies the whole member; on this
project's 2-core reference machine zlib-ng inflates the (nearly incompressible) float16
embeddings about 3x faster (see benchmarks/bench_filter.py). This module locates the member
in the zip, parses its `.npy` header (refusing object arrays, i.e. anything that would need
pickle), and yields row blocks while it inflates, so memory stays at one block per worker.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from . import storage
from .errors import VaralignError

try:  # zlib-ng is a core dependency; fall back to the standard library if it is missing
    from zlib_ng import zlib_ng as _zlib
except ImportError:  # pragma: no cover - exercised only without the wheel
    _zlib = zlib

_READ = 8 << 20  # bytes per file read


@dataclass(frozen=True)
class NpzMember:
    """Where one array lives inside an npz, and what it holds."""

    path: str
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    compressed: bool
    data_offset: int  # file offset of the member's (possibly compressed) bytes
    compress_size: int
    file_size: int
    crc: int
    header_len: int  # bytes of npy header before the array data

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def npz_keys(path: str | os.PathLike) -> list[str]:
    """Names of the arrays in an npz (without `.npy`)."""
    with _open_zip(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


def open_member(path: str | os.PathLike, key: str) -> NpzMember:
    """Locate `key` in the npz at `path` and parse its header; errors name the file."""
    path = str(path)
    with _open_zip(path) as zf:
        try:
            info = zf.getinfo(key + ".npy")
        except KeyError:
            keys = ", ".join(n[:-4] for n in zf.namelist()) or "none"
            raise VaralignError(f"npz has no key {key!r} (keys: {keys})", path) from None
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise VaralignError(f"npz member {key!r} uses unsupported zip compression {info.compress_type}", path)
    with storage.open_read(path, block_size=1 << 16, background=False) as fh:  # a few bytes: one small request
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise VaralignError(f"corrupt npz: bad local header for {key!r}", path)
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        data_offset = info.header_offset + 30 + name_len + extra_len
    compressed = info.compress_type == zipfile.ZIP_DEFLATED
    want = _npy_header_size(path, data_offset, info.compress_size, compressed)
    head = _read_prefix(path, data_offset, info.compress_size, compressed, want)
    dtype, shape, fortran, header_len = _parse_npy_header(head, path, key)
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if info.file_size != expected:
        raise VaralignError(f"corrupt npz: member {key!r} holds {info.file_size} bytes, header says {expected}", path)
    return NpzMember(path, key, dtype, shape, fortran, compressed, data_offset, info.compress_size,
                     info.file_size, info.CRC, header_len)


def iter_blocks(member: NpzMember, block_rows: int, reuse: bool = False) -> Iterator[np.ndarray]:
    """Yield consecutive row blocks (each `(<=block_rows, ...)`, C order) of a 2-d+ member.

    `reuse=True`: every block is a view of one buffer, overwritten by the next block (no page
    faults for a fresh allocation per block): only for callers that drop a block before the next.
    An uncompressed (`np.savez`) member is read straight into the block, with no copy.
    """
    if member.fortran_order:  # cannot stream rows of a column-major array: read it whole
        full = read_member(member)
        for start in range(0, len(full), block_rows):
            yield np.ascontiguousarray(full[start : start + block_rows])
        return
    if not member.compressed:
        yield from _iter_stored_blocks(member, block_rows, reuse)
        return
    n_rows = member.shape[0] if member.shape else 1
    new_block = _allocator(member, block_rows, reuse)
    skip = member.header_len
    done = 0
    block = fill = None
    for chunk in _iter_raw(member):
        view = memoryview(chunk)
        if skip:
            cut = min(skip, len(view))
            view, skip = view[cut:], skip - cut
        while len(view):
            if block is None:
                rows = min(block_rows, n_rows - done)
                if rows <= 0:
                    raise VaralignError(f"corrupt npz: member {member.key!r} has more data than its header says",
                                        member.path)
                block = new_block(rows)
                fill = 0
            target = block.reshape(-1).view(np.uint8)
            take = min(len(view), target.nbytes - fill)
            target[fill : fill + take] = np.frombuffer(view[:take], dtype=np.uint8)
            fill += take
            view = view[take:]
            if fill == target.nbytes:
                done += len(block)
                yield block
                block = None
    if block is not None or done != n_rows:
        raise VaralignError(f"corrupt npz: member {member.key!r} ends early ({done} of {n_rows} rows)", member.path)


def _allocator(member: NpzMember, block_rows: int, reuse: bool) -> Callable[[int], np.ndarray]:
    """`new_block(rows)`: a fresh `(rows, ...)` array, or (reuse) a view of one buffer allocated once."""
    n_rows = member.shape[0] if member.shape else 1
    row_shape = tuple(member.shape[1:])
    buffer: list[np.ndarray] = []

    def new_block(rows: int) -> np.ndarray:
        if not reuse:
            return np.empty((rows,) + row_shape, dtype=member.dtype)
        if not buffer:
            buffer.append(np.empty((min(block_rows, n_rows),) + row_shape, dtype=member.dtype))
        return buffer[0][:rows]

    return new_block


def _iter_stored_blocks(member: NpzMember, block_rows: int, reuse: bool) -> Iterator[np.ndarray]:
    """`iter_blocks` of an uncompressed member: `readinto` the block, CRC-checked at the end."""
    n_rows = member.shape[0] if member.shape else 1
    new_block = _allocator(member, block_rows, reuse)
    try:
        with storage.open_range(member.path, member.data_offset, member.compress_size) as fh:
            head = fh.read(member.header_len)
            crc = _zlib.crc32(head)
            total = len(head)
            done = 0
            while done < n_rows:
                rows = min(block_rows, n_rows - done)
                block = new_block(rows)
                view = memoryview(block.reshape(-1).view(np.uint8))
                got = 0
                while got < len(view):
                    n = fh.readinto(view[got:])
                    if not n:
                        raise VaralignError(f"corrupt npz: member {member.key!r} is truncated", member.path)
                    got += n
                crc = _zlib.crc32(view, crc)
                total += got
                done += rows
                yield block
    except OSError as exc:
        raise VaralignError(f"cannot read npz ({exc.strerror or exc})", member.path) from None
    _check_crc(member, total, crc)


def verify_member(member: NpzMember) -> None:
    """Inflate the whole member and check its CRC (raises the corrupt-npz error); nothing kept."""
    for _ in _iter_raw(member):
        pass


def read_member(member: NpzMember) -> np.ndarray:
    """The whole member as one array."""
    data = bytearray()
    for chunk in _iter_raw(member):
        data += chunk
    arr = np.frombuffer(bytes(data), dtype=member.dtype, offset=member.header_len)
    return arr.reshape(member.shape, order="F" if member.fortran_order else "C")


def _iter_raw(member: NpzMember) -> Iterator[bytes]:
    """Inflated bytes of the member (npy header included), CRC-checked at the end."""
    crc = 0
    total = 0
    try:
        with storage.open_range(member.path, member.data_offset, member.compress_size) as fh:
            remaining = member.compress_size
            inflater = _zlib.decompressobj(-15) if member.compressed else None
            while remaining > 0:
                raw = fh.read(min(_READ, remaining))
                if not raw:
                    raise VaralignError(f"corrupt npz: member {member.key!r} is truncated", member.path)
                remaining -= len(raw)
                for out in _inflate(inflater, raw, member, total) if inflater else (raw,):
                    crc = _zlib.crc32(out, crc)
                    total += len(out)
                    yield out
            if inflater:
                tail = inflater.flush()
                if tail:
                    crc = _zlib.crc32(tail, crc)
                    total += len(tail)
                    yield tail
    except (zlib.error, getattr(_zlib, "error", zlib.error)) as exc:
        raise VaralignError(f"corrupt npz: cannot inflate member {member.key!r} ({exc})", member.path) from None
    except OSError as exc:
        raise VaralignError(f"cannot read npz ({exc.strerror or exc})", member.path) from None
    _check_crc(member, total, crc)


def _inflate(inflater, raw: bytes, member: NpzMember, total: int) -> Iterator[bytes]:
    """Inflate `raw` in pieces of at most 4 MiB, never past the member's declared size plus one byte:
    a deflate bomb (a member that inflates far beyond its zip entry's size) stops after one block,
    not gigabytes later. `total`: bytes inflated before `raw`."""
    data = raw
    while True:
        budget = member.file_size - total + 1  # >= 1: max_length 0 would mean "no limit"
        out = inflater.decompress(data, max(1, min(budget, _READ)))
        total += len(out)
        if total > member.file_size:
            raise VaralignError(f"corrupt npz: member {member.key!r} inflates beyond its declared size "
                                f"({member.file_size} bytes)", member.path)
        if out:
            yield out
        data = inflater.unconsumed_tail
        if not data:
            return


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], compress_level: int = 6) -> None:
    """A standard compressed `.npz` (what `np.savez_compressed` writes) with a chosen zlib level."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compress_level) as zf:
        for key, arr in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asarray(arr), allow_pickle=False)


def _check_crc(member: NpzMember, total: int, crc: int) -> None:
    """The member's byte count and CRC-32 as its zip entry records them, else the corrupt-npz error."""
    if total != member.file_size or (crc & 0xFFFFFFFF) != member.crc:
        raise VaralignError(f"corrupt npz: member {member.key!r} fails its CRC check", member.path)


def _read_prefix(path: str, offset: int, size: int, compressed: bool, want: int) -> bytes:
    """The first `want` inflated bytes of a member (fewer if the member is shorter)."""
    out = bytearray()
    inflater = _zlib.decompressobj(-15) if compressed else None
    with storage.open_read(path, block_size=1 << 16, background=False) as fh:
        fh.seek(offset)
        remaining = size
        while len(out) < want and remaining > 0:
            raw = fh.read(min(remaining, 1 << 16))
            if not raw:
                break
            remaining -= len(raw)
            try:
                out += inflater.decompress(raw, want - len(out)) if inflater else raw
            except Exception as exc:  # noqa: BLE001 - any inflate failure is a corrupt file
                raise VaralignError(f"corrupt npz: cannot inflate ({exc})", path) from None
    return bytes(out[:want])


def _npy_header_size(path: str, member_offset: int, size: int, compressed: bool) -> int:
    head = _read_prefix(path, member_offset, size, compressed, 12)
    if len(head) < 10 or head[:6] != b"\x93NUMPY":
        return 12
    if head[6] == 1:
        return 10 + struct.unpack("<H", head[8:10])[0]
    return 12 + struct.unpack("<I", head[8:12])[0]


# numpy parses an .npy header with ast.literal_eval, which CPython 3.11 makes racy across threads ("AST
# constructor recursion depth mismatch", python/cpython#106905), and tasks read arrays in threads: every header
# varalign reads is parsed under this lock, one at a time (they are ~100 bytes); the data is read outside it.
# This is why the package reads .npy/.npz through `load_npy`/`load_npz` below, never `np.load` (ruff bans it).
_NPY_HEADER_LOCK = threading.Lock()


def _read_header(fp) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran order) of the .npy whose magic starts at `fp`'s position; ValueError if invalid."""
    with _NPY_HEADER_LOCK:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    return dtype, tuple(shape), bool(fortran)


def load_npy(source, mmap_mode: str | None = None) -> np.ndarray:
    """What `np.load(source, mmap_mode=..., allow_pickle=False)` returns for an `.npy` (a path or a binary
    file object), with the header read under the lock above. Raises ValueError for an object array (it would
    need pickle), a bad header or missing data, OSError when the file cannot be read."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as fh:
            if mmap_mode is None:
                return load_npy(fh)
            dtype, shape, fortran = _checked_header(fh)
            offset = fh.tell()
        if not int(np.prod(shape, dtype=np.int64)):  # mmap cannot map zero bytes
            return np.empty(shape, dtype=dtype, order="F" if fortran else "C")
        return np.memmap(source, dtype=dtype, mode=mmap_mode, offset=offset, shape=shape,
                         order="F" if fortran else "C")
    dtype, shape, fortran = _checked_header(source)
    arr = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    view = memoryview(arr.reshape(-1, order="A").view(np.uint8)) if arr.size else memoryview(b"")
    got = 0
    while got < len(view):
        n = source.readinto(view[got:])
        if not n:
            raise ValueError(f"the array is cut short: {got} of {len(view)} data bytes")
        got += n
    return arr


def _checked_header(fp) -> tuple[np.dtype, tuple[int, ...], bool]:
    dtype, shape, fortran = _read_header(fp)
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    return dtype, shape, fortran


def load_npz(path: str | os.PathLike, keys: list[str] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a (small) `.npz` as {name: array}, or only `keys` (KeyError for a missing one): what
    `np.load(path, allow_pickle=False)` gives, read whole. zipfile.BadZipFile, ValueError or OSError when bad."""
    with zipfile.ZipFile(path) as zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        if keys is not None:
            missing = [k for k in keys if k not in names]
            if missing:
                raise KeyError(f"{missing[0]} is not a file in the archive")
            names = list(keys)
        out = {}
        for name in names:
            with zf.open(name + ".npy") as fh:
                out[name] = load_npy(fh)
        return out


def _parse_npy_header(head: bytes, path: str, key: str) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    fp = io.BytesIO(head)
    try:
        dtype, shape, fortran = _read_header(fp)
    except (ValueError, EOFError, SyntaxError) as exc:
        raise VaralignError(f"npz member {key!r} is not a valid .npy array ({exc})", path) from None
    if dtype.hasobject:
        raise VaralignError(f"npz member {key!r} holds Python objects and would need pickle: refused", path)
    return dtype, shape, fortran, fp.tell()


class _OwnedZip(zipfile.ZipFile):
    """A ZipFile over a file object it closes too (a remote file: its requests and threads end)."""

    def close(self) -> None:
        fh = self.fp
        super().close()
        if fh is not None:
            fh.close()


def _open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    try:
        if storage.is_url(path):  # only the central directory is read: a few small ranged requests
            return _OwnedZip(storage.open_read(path, block_size=1 << 16, background=False))
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise VaralignError("npz file not found", path) from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise VaralignError(f"not a readable npz file ({exc})", path) from None
