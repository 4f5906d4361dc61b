"""NormSim (arXiv 2405.19547): how strongly an image embedding aligns with a target set G.

    NormSim_p(i) = ‖G f_i‖_p = (Σ_t |g_tᵀ f_i|^p)^{1/p},   NormSim_∞(i) = max_t |g_tᵀ f_i|

p ≥ 100 means ∞, like the reference (`cal_similarity_scores_norm`, run names `norm100`).
The target G (e.g. ImageNet-1k train, 1.28M × 768) is read chunk by chunk from `.npy`/`.pt`
files, so candidate rows meet it as `(sub_rows × chunk_rows)` float32 products (128 MiB at
4096 × 8192) and only one scalar accumulator per candidate row is kept. NormSim_2 needs no
pass over G per candidate: NormSim_2(i)² = f_iᵀ (GᵀG) f_i, a VAS-style quadratic form with the
D × D Gram matrix built once per target (`gram=True`, the default).

Memory: with `cache=True` a target's arrays stay loaded in each process that uses it (`.npy`
files are memory-mapped; `.pt` files are decoded to float32 by torch: 3.9 GB for ImageNet-1k
L/14). Pickling a `NormSimTarget` drops the cache but keeps a computed Gram matrix, so call
`prepare(p)` once in the parent before sending it to workers.

On a torch device (`device="cuda"`, `"torch-cpu"`, ...) the same per-shard tasks score blocks of up to
DEVICE_BLOCK_ROWS candidate rows (as stored) with `backend.normsim_on`: G is copied to the device once
per process (float16 when all its values are float16 numbers: 2 GB for ImageNet-1k L/14; else two
float16 parts per row, `backend._Split`: 4 GB) when it takes at most half of the GPU's free memory, else
streamed chunk by chunk for every block; the products come in 2,048 × 65,536 float32 tiles (512 MiB;
1,024 rows for a split target). Device memory ≈ G (or one chunk) + 100 MB of
candidates + 512 MiB, whatever |G| (one task at a time per device in a process). p = 2 uses the Gram
form on the device too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..backend import (
    DeviceMatrix,
    cached_matrix,
    check_finite,
    gram64,
    gram64_on,
    normsim_on,
    on_device,
    quadratic_rows,
    quadratic_rows_on,
    to_float32,
)
from ..errors import VaralignError
from ..pool import Shard, embedding_member, iter_row_blocks
from ..target import expand_inputs, load_array

INF_FROM = 100.0  # any p >= this is treated as infinity (the reference's convention)
BLOCK_ROWS = 16384  # candidate rows that share one pass over the target
SUB_ROWS = 4096  # candidate rows per product
CHUNK_ROWS = 8192  # target rows per product
DEVICE_BLOCK_ROWS = 65536  # candidate rows per pass over the target on a torch device
_IN_MEMORY = "<array>"


def parse_p(p: float | str) -> float:
    """The norm order: a float ≥ 1, or "inf"/"∞"/anything ≥ 100 for the max norm."""
    try:
        value = math.inf if str(p).lower() in ("inf", "infinity", "∞") else float(p)
    except ValueError:
        raise VaralignError(f"norm p must be a number >= 1 or 'inf', got {p!r}") from None
    if not value >= 1:
        raise VaralignError(f"norm p must be >= 1, got {p!r}")
    return math.inf if value >= INF_FROM else value


@dataclass
class NormSimTarget:
    """A target embedding set G kept as files (`.npy`/`.pt`, concatenated in order), read in chunks."""

    files: tuple[str, ...]
    key: str | None = None  # dict key inside `.pt` files (DataComp in1k: "image_features")
    dim: int | None = None
    chunk_rows: int = CHUNK_ROWS
    cache: bool = True
    _arrays: list[np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)
    _gram: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_paths(cls, inputs: Iterable[str | os.PathLike], key: str | None = None,
                   dim: int | None = None, **kw) -> NormSimTarget:
        """Files or folders of `.npy`/`.pt` files (a folder's files sorted by name)."""
        return cls(tuple(str(p) for p in expand_inputs(inputs)), key, dim, **kw)

    def __getstate__(self) -> dict:
        if self.files == (_IN_MEMORY,):  # `as_target` of an array: the array is the target
            return dict(self.__dict__)
        return {**self.__dict__, "_arrays": None}

    def arrays(self) -> list[np.ndarray]:
        """The target files as 2-d arrays (checked for shape; memory-mapped where `.npy`)."""
        if self._arrays is not None:
            return self._arrays
        if not self.files:
            raise VaralignError("NormSim target has no files")
        out = []
        for path in self.files:
            arr = load_array(path, self.key)
            if arr.ndim != 2 or arr.shape[0] == 0:
                raise VaralignError(f"target embeddings must be a non-empty (N, D) array, found {arr.shape}", path)
            if self.dim is None:
                self.dim = arr.shape[1]
            if arr.shape[1] != self.dim:
                raise VaralignError(f"target embeddings have dim {arr.shape[1]}, expected {self.dim}", path)
            out.append(arr)
        if self.cache:
            self._arrays = out
        return out

    @property
    def rows(self) -> int:
        return sum(len(a) for a in self.arrays())

    def chunks(self) -> Iterator[np.ndarray]:
        """float32 row chunks of G in file order, each checked for NaN/inf (naming its file)."""
        for path, arr in zip(self.files, self.arrays(), strict=True):
            for start in range(0, len(arr), self.chunk_rows):
                block = np.asarray(arr[start : start + self.chunk_rows])
                if not block.flags.writeable:  # a read-only memory map: torch's decoder warns on those
                    block = block.copy()
                check_finite(block, start, path, self.key or "target")
                yield np.ascontiguousarray(to_float32(block))

    def gram(self, device: str = "cpu") -> np.ndarray:
        """GᵀG (float64 accumulation, float32 result), computed once (on `device` if it is a torch one)."""
        if self._gram is None:
            total = None
            for chunk in self.chunks():
                if device == "cpu":
                    part = gram64(chunk)
                else:
                    with on_device(device):
                        part = gram64_on(chunk, device)
                total = part if total is None else total + part
            self._gram = total.astype(np.float32)
        return self._gram

    def prepare(self, p: float | str, device: str = "cpu") -> NormSimTarget:
        """Validate the files now, and build the Gram matrix if p = 2 will use it."""
        self.arrays()
        if parse_p(p) == 2:
            self.gram(device)
        return self

    def on_device(self, device: str, resident: bool | None = None) -> DeviceMatrix:
        """G on a torch device, copied once per process (see the module doc; `resident` forces it)."""
        return cached_matrix(self, "normsim-target", device,
                             lambda: DeviceMatrix.load(self.chunks, self.rows, self.dim, device, resident))


def as_target(target: NormSimTarget | np.ndarray, chunk_rows: int = CHUNK_ROWS) -> NormSimTarget:
    """Wrap an in-memory `(T, D)` array as a target (nothing is copied)."""
    if isinstance(target, NormSimTarget):
        return target
    arr = np.asarray(target)
    if arr.ndim != 2 or len(arr) == 0:
        raise VaralignError(f"target embeddings must be a non-empty (N, D) array, found {arr.shape}")
    out = NormSimTarget((_IN_MEMORY,), dim=arr.shape[1], chunk_rows=chunk_rows)
    out._arrays = [arr]
    return out


def normsim_scores(features: np.ndarray, target: NormSimTarget | np.ndarray, p: float | str = math.inf, *,
                   gram: bool = True, block_rows: int = BLOCK_ROWS, device: str = "cpu",
                   resident: bool | None = None) -> np.ndarray:
    """NormSim_p of every row of an in-memory `(N, D)` embedding array (float16 or float32).

    On a torch `device`: `_score_block_on` (`resident`: keep G on the device, see `NormSimTarget.on_device`).
    """
    p = parse_p(p)
    tgt = as_target(target)
    tgt.arrays()
    if features.ndim != 2 or features.shape[1] != tgt.dim:
        raise VaralignError(f"embeddings of shape {features.shape} do not match the target dim {tgt.dim}")
    out = np.empty(len(features), dtype=np.float32)
    if device != "cpu":
        step = max(block_rows, DEVICE_BLOCK_ROWS)
        for start in range(0, len(features), step):
            block = np.asarray(features[start : start + step])
            out[start : start + len(block)] = _score_block_on(block, tgt, p, gram, device, resident)
        return out
    for start in range(0, len(features), block_rows):
        block = to_float32(np.asarray(features[start : start + block_rows]))
        out[start : start + len(block)] = _score_block(block, tgt, p, gram)
    return out


def _score_block_on(block: np.ndarray, tgt: NormSimTarget, p: float, gram: bool, device: str,
                    resident: bool | None = None) -> np.ndarray:
    """`_score_block` on a torch device, for rows as stored (float16 stays float16 there)."""
    if p == 2 and gram:
        g = tgt.gram(device)
        with on_device(device):
            return np.sqrt(np.maximum(quadratic_rows_on(block, g, device), 0))
    return normsim_on(block, tgt.on_device(device, resident), p, device)


def _score_block(f: np.ndarray, tgt: NormSimTarget, p: float, gram: bool) -> np.ndarray:
    """NormSim_p of a float32 block: one pass over the target (or the Gram form for p = 2)."""
    if p == 2 and gram:
        return np.sqrt(np.maximum(quadratic_rows(f, tgt.gram()), 0))
    acc = _Accumulator(p, len(f))
    for chunk in tgt.chunks():
        for r0 in range(0, len(f), SUB_ROWS):
            acc.add(r0, f[r0 : r0 + SUB_ROWS] @ chunk.T)
    return acc.result()


class _Accumulator:
    """Running Σ|x|^p (float64) or max|x| over target chunks, for the rows of one candidate block.

    For p ∉ {1, 2, ∞} the sum is kept relative to the running row max m (Σ (|x|/m)^p, rescaled
    when m grows) so |x|^p cannot overflow float32 for large p.
    """

    def __init__(self, p: float, n: int) -> None:
        self.p = p
        self.top = np.zeros(n, dtype=np.float32)
        self.total = np.zeros(n, dtype=np.float64)

    def add(self, r0: int, prod: np.ndarray) -> None:
        rows = slice(r0, r0 + len(prod))
        np.abs(prod, out=prod)
        if self.p == math.inf:
            np.maximum(self.top[rows], prod.max(axis=1), out=self.top[rows])
        elif self.p in (1, 2):
            if self.p == 2:
                np.square(prod, out=prod)
            self.total[rows] += prod.sum(axis=1, dtype=np.float32)
        else:
            self._add_scaled(rows, prod)

    def _add_scaled(self, rows: slice, prod: np.ndarray) -> None:
        old = self.top[rows]
        new = np.maximum(old, prod.max(axis=1))
        safe = np.where(new > 0, new, 1).astype(np.float32)
        self.total[rows] *= (old / safe).astype(np.float64) ** self.p
        prod /= safe[:, None]
        np.power(prod, np.float32(self.p), out=prod)
        self.total[rows] += prod.sum(axis=1, dtype=np.float32)
        self.top[rows] = new

    def result(self) -> np.ndarray:
        if self.p == math.inf:
            return self.top
        if self.p in (1, 2):
            return (self.total ** (1 / self.p)).astype(np.float32)
        return (self.top * self.total ** (1 / self.p)).astype(np.float32)


def normsim_shard(shard: Shard, rows: np.ndarray, target: NormSimTarget | np.ndarray, p: float | str = math.inf,
                  key: str = "l14_img", *, gram: bool = True, block_rows: int = BLOCK_ROWS,
                  device: str = "cpu") -> np.ndarray:
    """NormSim_p of the given (sorted) rows of one shard, streaming its npz member block by block.

    Picked rows are buffered up to `block_rows` (on a torch `device`: DEVICE_BLOCK_ROWS, as stored) so
    each pass over the target serves a full block.
    """
    p = parse_p(p)
    tgt = as_target(target)
    tgt.arrays()
    member = embedding_member(shard, key, tgt.dim)
    out = np.empty(len(rows), dtype=np.float32)
    pos = done = 0
    pending: list[np.ndarray] = []
    flush = block_rows if device == "cpu" else max(block_rows, DEVICE_BLOCK_ROWS)
    for rb in iter_row_blocks(member, rows, block_rows):
        if len(rb.local):
            pending.append(to_float32(rb.block[rb.local]) if device == "cpu" else rb.block[rb.local])
            pos = rb.span.stop
        if pos - done >= flush or (rb.start + len(rb.block) == member.shape[0] and pos > done):
            block = np.concatenate(pending)
            out[done:pos] = _score_block(block, tgt, p, gram) if device == "cpu" else \
                _score_block_on(block, tgt, p, gram, device)
            pending, done = [], pos
    return out
