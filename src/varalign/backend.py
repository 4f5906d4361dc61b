"""Array kernels: float16 decoding, NaN/inf checks, row-wise quadratic forms, Gram accumulation,
projections; on the CPU with numpy/BLAS, or on a torch device (`--device`). Every torch kernel
lives here: callers pass numpy arrays and a device name and get numpy arrays back. The heavy scores'
device kernels (negCLIPLoss, NormSim, max-inner-product centroids, k-means) are at the end, after
`on_device`."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import threading
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from .errors import VaralignError

# float16 bit pattern -> float32 value; indexing this table is ~3x faster than numpy's astype
_F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_EXP_MASK = np.uint16(0x7C00)


def _torch():
    """torch, only if the caller already imported it: importing it costs more than it saves here."""
    if os.environ.get("VARALIGN_NO_TORCH"):
        return None
    return sys.modules.get("torch")


def to_float32(block: np.ndarray) -> np.ndarray:
    """Decode a float16 (or pass through a float32) array to float32, exactly."""
    if block.dtype == np.float32:
        return block
    if block.dtype != np.float16:
        return block.astype(np.float32)
    torch = _torch()
    if torch is not None:
        out = np.empty(block.shape, dtype=np.float32)
        torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(block)))
        return out
    return _F16_TO_F32[np.ascontiguousarray(block).view(np.uint16)]


def all_finite(block: np.ndarray) -> bool:
    """Whether no value is NaN/inf: two read-only reductions, no temporary array.

    float16 NaN/inf have all exponent bits set: as uint16, the negative ones are >= 0xFC00; as
    int16, the positive ones are >= 0x7C00 (every negative number is < 0 there).
    """
    if block.size == 0:
        return True
    if block.dtype == np.float16:
        bits = block.view(np.uint16)
        return int(bits.max()) < 0xFC00 and int(bits.view(np.int16).max()) < 0x7C00
    if block.dtype.kind == "f":  # max/min propagate NaN and reach +-inf
        return bool(np.isfinite(block.max()) and np.isfinite(block.min()))
    return True


def first_nonfinite_row(block: np.ndarray) -> int | None:
    """Index of the first row holding NaN/inf, or None (bit test on float16: no decode)."""
    if all_finite(block):
        return None
    if block.dtype == np.float16:
        bad = (block.view(np.uint16) & _EXP_MASK) == _EXP_MASK
    else:
        bad = ~np.isfinite(block)
    rows = bad.reshape(len(block), -1).any(axis=1)
    hits = np.flatnonzero(rows)
    return int(hits[0]) if len(hits) else None


def check_finite(block: np.ndarray, row0: int, source: object, key: str, member: object = None) -> None:
    """Raise on NaN/inf; with the npz `member` it came from, a corrupt member is reported as such first."""
    row = first_nonfinite_row(block)
    if row is not None:
        if member is not None:  # blocks are yielded before the member's CRC is checked: check it now
            from .npz import verify_member  # noqa: PLC0415

            verify_member(member)
        raise VaralignError(f"embedding {key!r} has NaN/inf at row {row0 + row}", source)


def quadratic_rows(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """v_i = f_i^T S f_i for every row f_i (float32, one GEMM + a row-wise dot)."""
    if len(features) == 0:
        return np.empty(0, dtype=np.float32)
    prod = features @ target
    return np.einsum("ij,ij->i", prod, features)


def gram64(features: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Sum of outer products F^T F accumulated in float64 (float32 SYRK per chunk of rows)."""
    dim = features.shape[1]
    total = np.zeros((dim, dim), dtype=np.float64)
    for start in range(0, len(features), chunk):
        part = features[start : start + chunk]
        total += part.T @ part
    return total


def check_device(device: str) -> str:
    """`cpu` (numpy/BLAS), or a torch device (`cuda`, `cuda:1`, `torch-cpu` for torch on the CPU)."""
    if device == "cpu":
        return device
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise VaralignError(f"--device {device} needs torch: pip install 'varalign[torch]'") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VaralignError(f"--device {device}: torch sees no CUDA device (torch {torch.__version__})")
    if device.startswith("cuda") and os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "").strip().lower() in (
            "1", "true", "yes", "on", "y"):
        # torch then multiplies float32 in TF32 whatever the process asks (10-bit mantissas: subsets would
        # differ from the CPU's far beyond float ties)
        raise VaralignError(f"--device {device}: TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set, which makes CUDA's "
                            "float32 products TF32; unset it")
    try:
        dev = torch.device("cpu" if device == "torch-cpu" else device)
    except (RuntimeError, ValueError):
        raise VaralignError(f"--device {device}: not a torch device (cpu, torch-cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise VaralignError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise VaralignError(f"--device {device}: torch sees no MPS device (torch {torch.__version__})")
    return device


def torch_device(device: str):
    """`(torch, torch.device)` for a device name that is not `cpu` (`torch-cpu` is torch on the CPU)."""
    import torch  # noqa: PLC0415

    return torch, torch.device("cpu" if device == "torch-cpu" else device)


def quadratic_rows_on(features: np.ndarray, target: np.ndarray, device: str) -> np.ndarray:
    """`quadratic_rows` on a device: float16 rows are shipped as float16 and decoded there."""
    if device == "cpu":
        return quadratic_rows(to_float32(features), target)
    torch, dev = torch_device(device)
    with device_errors(device):
        f = torch.from_numpy(np.require(features, requirements=["C", "W"])).to(dev).float()
        s = torch.tensor(np.asarray(target, dtype=np.float32), device=dev)
        return ((f @ s) * f).sum(dim=1).cpu().numpy()


def gram64_on(features: np.ndarray, device: str) -> np.ndarray:
    """`gram64` on a device (float32 products, float64 sum on the host)."""
    if device == "cpu":
        return gram64(to_float32(features))
    torch, dev = torch_device(device)
    with device_errors(device):
        f = torch.from_numpy(np.require(features, requirements=["C", "W"])).to(dev).float()
        return (f.T @ f).double().cpu().numpy()


def projector(basis: np.ndarray, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """`project(rows)`: float32 `rows @ basis` (float16 rows decoded first), on `device`; the basis
    is sent to a torch device once."""
    if device == "cpu":
        return lambda rows: to_float32(rows) @ basis
    torch, dev = torch_device(device)
    with device_errors(device):
        basis_t = torch.from_numpy(np.ascontiguousarray(basis, dtype=np.float32)).to(dev)

    def project(rows: np.ndarray) -> np.ndarray:
        with device_errors(device):
            return (torch.from_numpy(np.ascontiguousarray(rows)).to(dev).float() @ basis_t).cpu().numpy()
    return project


class ResidentRows:
    """Rows copied once into a torch device's memory, as stored (float16 stays float16).

    Scoring and Gram accumulation over any subset of them then happen there: nothing is sent to
    the device but the target (D×D) and the row indices. Products are float32 like the host path;
    the Gram of the chosen rows is accumulated in float64 on the device.
    """

    def __init__(self, torch, dev, data, block_rows: int) -> None:
        self.torch, self.dev, self.data, self.block_rows = torch, dev, data, block_rows

    @staticmethod
    def work_bytes(dim: int, block_rows: int, index_rows: int, rows: int = 0) -> int:
        """Device memory the rounds use beside the resident rows: a scoring step of 4·`block_rows` rows
        (gathered float16, then three float32 arrays of them alive at once: 14 B a value), a Gram block
        (float32 rows, float64 D×D sums), the row indices of one state block (int64) and their scores, and
        the `rows` candidates' round state kept on the device with a round's selection (20 B a candidate: the
        round that removed it and its last score, 8 B; the scores masked for the top-k, 4 B; the top-k's values
        and indices, up to 6 B when a round keeps up to half of them (one round); two flags)."""
        step = 4 * block_rows
        return step * dim * 14 + block_rows * dim * 4 + 2 * dim * dim * 8 + index_rows * 12 + rows * 20

    @staticmethod
    def fits(nbytes: int, work: int, free: int, total: int) -> bool:
        """Whether rows of `nbytes` stay resident on an accelerator with `free` of `total` bytes free: with the
        rounds' working set `work` and 5% of the device (the caching allocator's slack) still free beside
        them. DataComp-medium's 57.6M exact VAS-D candidates (88.5 GB as float16) fit one 141 GB H200."""
        return nbytes + work + total // 20 <= free

    @classmethod
    def load(cls, read: Callable[[int, int], np.ndarray], rows: int, dim: int, dtype: np.dtype, device: str,
             block_rows: int, resident: bool | None = None, index_rows: int = 1 << 20) -> ResidentRows | None:
        """Rows `read(start, stop)` (numpy, `(stop - start, dim)` of `dtype`) copied to `device`;
        None where they should stay on the host: `device` is `cpu`, `resident` is False, or (by
        default, `resident=None`) the device is not an accelerator or they do not fit beside the rounds'
        working set (`fits`; a note on stderr says so, since every round then reads them from the host)."""
        if device == "cpu" or resident is False:
            return None
        torch, dev = torch_device(device)
        nbytes = rows * dim * np.dtype(dtype).itemsize
        if resident is None:
            if dev.type != "cuda":
                return None  # on the host the streamed rows keep memory bounded
            torch.cuda.empty_cache()  # what torch keeps cached from earlier stages counts as free here
            free, total = torch.cuda.mem_get_info(dev)
            if not cls.fits(nbytes, cls.work_bytes(dim, block_rows, index_rows, rows), free, total):
                print(f"varalign: note: the {rows:,} VAS-D candidates ({nbytes / 1e9:.1f} GB) do not fit in "
                      f"{dev}'s {free / 1e9:.1f} GB free beside the rounds' working set: they are read from the "
                      "host every round (slower; a larger device holds them)", file=sys.stderr)
                return None
        probe = torch.from_numpy(np.zeros((1, dim), dtype=dtype))
        data = torch.empty((rows, dim), dtype=probe.dtype, device=dev)
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            data[start:stop] = torch.from_numpy(np.ascontiguousarray(read(start, stop))).to(dev)
        return cls(torch, dev, data, block_rows)

    def score(self, index: Any, target: Any) -> Any:
        """f_iᵀ S f_i (float32, on the device) for the rows at `index` (int64 on the device); `target` S is a
        float32 D×D on the device."""
        torch = self.torch
        out = torch.empty(len(index), dtype=torch.float32, device=self.dev)
        step = self.block_rows * 4
        for a in range(0, len(index), step):
            f = self.data.index_select(0, index[a : a + step]).float()
            out[a : a + step] = ((f @ target) * f).sum(dim=1)
        return out

    def gram64(self, index: Any) -> Any:
        """Σ f fᵀ (float64 D×D, on the device) over the rows at `index` (int64 on the device)."""
        torch = self.torch
        dim = self.data.shape[1]
        total = torch.zeros((dim, dim), dtype=torch.float64, device=self.dev)
        for a in range(0, len(index), self.block_rows):
            f = self.data.index_select(0, index[a : a + self.block_rows]).float()
            total += (f.T @ f).double()
        return total


# -- the heavy scores on a torch device: negCLIPLoss, NormSim, max-inner-product centroids, k-means --------
#
# `on_device` gives a kernel the device to itself within this process: one task's working set is on it at
# a time, so the memory bounds stated below hold whatever --num_workers (they are per process: Ray tasks
# each hold their own), and running out of memory or any other device failure is one VaralignError line,
# never a fall back to the CPU.
#
# Products (`_product`): a @ bᵀ in float32. When both operands are float16 (DataComp's embeddings as
# stored; a target or centroids whose values are all float16 numbers) every product of two entries is
# exact in float32 and only the sums round, as in the float32 product of the decoded rows: on CUDA this
# runs on tensor cores (`torch.mm(..., out_dtype=torch.float32)`: float32 accumulation), elsewhere as
# float32 after an exact upcast. A matrix kept on the device (`DeviceMatrix`: NormSim targets, centroids)
# whose values are not all float16 numbers is kept as two float16 parts per row (`_Split`: row · 2^k =
# hi + lo, the power of two putting the row's largest entry in [2^13, 2^14)), which hold each row to
# 2^-22 of its largest entry; float16 queries meet it in two exact-product GEMMs, summed in float32 and
# scaled back exactly (tensor cores again: about 8× the float32 rate on an H100/H200). Anything else is
# multiplied in float32 (no TF32).

TILE_BYTES = 512 << 20  # one float32 product tile on the device (rows × columns × 4 B)
PART_ROWS = 65536  # rows of a resident matrix met by one product
HOST_RESIDENT_BYTES = 1 << 30  # devices other than CUDA (torch-cpu): a matrix is copied whole up to this size
KMEANS_EPS = 1.0 / 1024  # faiss's perturbation when an empty cluster takes half of another
_TINY = 1e-20  # negCLIPLoss column sums below this are recomputed exactly (as scores/negcliploss.py)
_LOCKS: dict[str, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()
_HALF_MM: dict[str, bool] = {}
# a RuntimeError that names the device or its memory (whole words: "relationship" does not name HIP)
_DEVICE_ERROR = re.compile(r"(?<![a-z])(cuda|cublas|cudnn|hip|mps|xpu)(?![a-z])|device-side|device ordinal")
_OOM = re.compile(r"out of memory|(tried|failed) to allocate|can't allocate memory")


@contextlib.contextmanager
def on_device(device: str) -> Iterator[tuple[Any, Any]]:
    """`(torch, torch.device)`, this thread holding the device alone among this process's threads (a
    re-entrant lock per device). Out of memory, or any other failure of the device, inside the block is
    raised as one VaralignError line (`device_errors`)."""
    torch, dev = torch_device(device)
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(str(dev), threading.RLock())
    with lock, device_errors(device):
        yield torch, dev


@contextlib.contextmanager
def device_errors(device: str) -> Iterator[None]:
    """Out of memory, or any other failure of `device`, inside the block raised as one VaralignError line,
    with float32 products in full float32 on CUDA (no TF32) for the block; without `on_device`'s lock, for the
    small per-task kernels (VAS scores, Gram blocks, projections) that worker threads run side by side,
    some of them while another thread holds the lock for the whole of VAS-D's rounds."""
    if device == "cpu":
        yield
        return
    torch, dev = torch_device(device)
    cuda = dev.type == "cuda"
    if cuda:
        _no_tf32(torch, +1)
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is one
        text = " ".join(str(exc).split())
        low = text.lower()
        oom = isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or _OOM.search(low) is not None
        if not (oom or _DEVICE_ERROR.search(low)):
            raise
        first = text.split(". ")[0][:240] or type(exc).__name__
        if oom:
            # the finished frames of the failed kernel still hold its tensors through the traceback (and so
            # would the error a caller keeps): free their locals, then return the memory to the device
            traceback.clear_frames(exc.__traceback__)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            raise VaralignError(f"--device {device}: out of memory ({first}); free the device, or run with "
                                "--device cpu") from None
        raise VaralignError(f"--device {device}: {first}") from None
    finally:
        if cuda:
            _no_tf32(torch, -1)


_TF32: dict[str, Any] = {"depth": 0, "saved": None}
_TF32_GUARD = threading.Lock()


def _no_tf32(torch, step: int) -> None:
    """Float32 products in full float32 on CUDA while any thread is inside `device_errors` (`step` +1 on
    entry, -1 on exit). A process that asked for TF32 (10-bit mantissas, ~1e-3 per product: subsets far from
    the CPU's) or less, through either of torch's switches (`torch.backends.cuda.matmul.fp32_precision`, or
    the older `set_float32_matmul_precision` / `allow_tf32`), gets "ieee" / "highest" there, both set so that
    torch sees no mix of the two, and its own settings back when the last thread leaves."""
    matmul = torch.backends.cuda.matmul
    with _TF32_GUARD:
        if step > 0 and _TF32["depth"] == 0:
            try:
                legacy = torch.get_float32_matmul_precision()
            except RuntimeError:  # torch refuses to read it once the newer switch was used alone
                legacy = None
            _TF32["saved"] = (matmul.fp32_precision, legacy)
            if legacy not in (None, "highest"):
                torch.set_float32_matmul_precision("highest")
            matmul.fp32_precision = "ieee"
        _TF32["depth"] += step
        if step < 0 and _TF32["depth"] == 0:
            fp32, legacy = _TF32["saved"]
            if legacy not in (None, "highest"):
                torch.set_float32_matmul_precision(legacy)
            matmul.fp32_precision = fp32


def _acc_dtype(torch, dev):
    """float64 accumulators (as the CPU path), except where the device has none (MPS)."""
    return torch.float32 if dev.type == "mps" else torch.float64


def _keep_resident(torch, dev, nbytes: int, resident: bool | None) -> bool:
    """Whether `nbytes` should be copied to the device whole: `resident` if given; on CUDA when they take
    at most half of its free memory; elsewhere up to HOST_RESIDENT_BYTES."""
    if resident is not None:
        return resident
    if dev.type == "cuda":
        return nbytes <= torch.cuda.mem_get_info(dev)[0] // 2
    return nbytes <= HOST_RESIDENT_BYTES


def _up(torch, dev, arr: np.ndarray):
    """A host array on the device as stored (float16 stays float16); no copy on torch's CPU device."""
    return torch.from_numpy(np.require(arr, requirements=["C", "W"])).to(dev)


def _half_mm(torch, dev) -> bool:
    """Whether `torch.mm(float16, float16, out_dtype=float32)` runs on this device (CUDA; probed once)."""
    key = str(dev)
    if key not in _HALF_MM:
        ok = False
        if dev.type == "cuda":
            try:
                one = torch.ones((2, 2), dtype=torch.float16, device=dev)
                ok = torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
            except (RuntimeError, TypeError):
                ok = False
        _HALF_MM[key] = ok
    return _HALF_MM[key]


def _mm16(torch, dev, a, b):
    """a @ bᵀ of float16 operands in float32: exact products, float32 sums (tensor cores on CUDA)."""
    if _half_mm(torch, dev):
        return torch.mm(a, b.T, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float().T)


def _product(torch, dev, a, b):
    """a @ bᵀ in float32 (b a tensor or a `_Split`): float16 operands as stored (exact products, float32
    sums), a `_Split` as two such products scaled back by its powers of two, anything else in float32."""
    if isinstance(b, _Split):
        if a.dtype != torch.float16:
            return torch.mm(a.float(), b.float().T)
        s = _mm16(torch, dev, a, b.hi)
        s += _mm16(torch, dev, a, b.lo)
        return s.mul_(b.inv)
    if a.dtype == torch.float16 and b.dtype == torch.float16:
        return _mm16(torch, dev, a, b)
    return torch.mm(a.float(), b.float().T)


def _tile_rows(part, tile_bytes: int) -> int:
    """Query rows per product with `part` so that its float32 tile(s) take at most `tile_bytes`."""
    return max(1, tile_bytes // (4 * len(part) * (2 if isinstance(part, _Split) else 1)))


def _half_if_exact(torch, x):
    """`x` as float16 when every value is a float16 number (float32 queries decoded from float16 files)."""
    if x.dtype == torch.float32 and len(x):
        h = x.half()
        if torch.equal(h.float(), x):
            return h
    return x


class _Split:
    """Rows kept as (hi + lo) · inv: hi and lo float16 `(r, D)`, inv float32 powers of two `(r,)`; sliced
    like a tensor. `float()` gives the float32 rows."""

    __slots__ = ("hi", "lo", "inv")

    def __init__(self, hi, lo, inv) -> None:
        self.hi, self.lo, self.inv = hi, lo, inv

    @classmethod
    def of(cls, torch, c) -> _Split:
        """Split float32 rows `c` (on the device)."""
        _, exp = torch.frexp(c.abs().amax(dim=1))
        exp = exp.clamp(min=-100)  # all-zero (or nearly) rows: any scale
        one = torch.ones_like(exp, dtype=torch.float32)
        scaled = c * torch.ldexp(one, 14 - exp)[:, None]  # exact: |row max| in [2^13, 2^14)
        hi = scaled.half()
        lo = (scaled - hi.float()).half()
        return cls(hi, lo, torch.ldexp(one, exp - 14))

    def __len__(self) -> int:
        return len(self.hi)

    def __getitem__(self, rows) -> _Split:
        return _Split(self.hi[rows], self.lo[rows], self.inv[rows])

    def put(self, start: int, other: _Split) -> None:
        stop = start + len(other)
        self.hi[start:stop], self.lo[start:stop], self.inv[start:stop] = other.hi, other.lo, other.inv

    def float(self):
        return (self.hi.float() + self.lo.float()) * self.inv[:, None]


def _compact(torch, c):
    """Float32 rows `c` on the device as float16 when they are all float16 numbers, else as a `_Split`."""
    h = c.half()
    return h if torch.equal(h.float(), c) else _Split.of(torch, c)


# negCLIPLoss ---------------------------------------------------------------------------------------------
def negcliploss_on(img: np.ndarray, txt: np.ndarray, perms: Iterable[np.ndarray], temperature: float,
                   batch_size: int, device: str, row_block: int = 4096, tile_bytes: int = TILE_BYTES,
                   resident: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(cs, lse)` of pairs (img[i], txt[i]) on `device`, float64: cs_i = f_i·t_i, and lse_i the sum over
    the permutations `perms` of the row and column log-sum-exp of (F_b T_bᵀ)/τ of the batch holding i
    (each permutation cut into consecutive batches of `batch_size`, as scores/negcliploss.py).

    The batch similarity is computed in `row_block × col_block` float32 tiles (col_block = tile_bytes /
    (4·row_block): 4096 × 32768 = 512 MiB), each reduced at once: the row log-sum-exp from the tile's row
    maxima (exp(s − max) ≤ 1), the column one from the same exponentials weighted by exp(rmax − max rmax)
    (one GEMV), columns whose weighted sum underflows (< 1e-20) recomputed from their own maxima; tiles
    combine by logaddexp. Float16 rows are multiplied as stored and scaled by 1/τ after the product
    (exact products); float32 rows are scaled first, as the CPU path.
    Device memory: the rows as stored (4·N·D bytes for N float16 pairs; with `resident` False or on CUDA
    above half the free memory, one batch's: 4·B·D), one batch gathered as stored (4·B·D), at most two
    tiles (2 × tile_bytes), a row block and a column block in float32 ((row_block + col_block)·D·4) and
    float64 accumulators (40 bytes per row): nothing grows with B², K or the pool.
    """
    n = len(img)
    inv = float(np.float32(1.0 / temperature))
    half = img.dtype == np.float16 and txt.dtype == np.float16
    with on_device(device) as (torch, dev):
        acc = _acc_dtype(torch, dev)
        keep = _keep_resident(torch, dev, img.nbytes + txt.nbytes, resident)
        stored = (_up(torch, dev, img), _up(torch, dev, txt)) if keep else None
        cs = torch.zeros(n, dtype=acc, device=dev)
        lse = torch.zeros(n, dtype=acc, device=dev)
        col_block = max(1, tile_bytes // (4 * row_block))
        for k, perm in enumerate(perms):
            for b0 in range(0, n, batch_size):
                idx = np.ascontiguousarray(perm[b0 : b0 + batch_size], dtype=np.int64)
                at = torch.from_numpy(idx).to(dev)
                if stored is not None:
                    f, t = stored[0].index_select(0, at), stored[1].index_select(0, at)
                else:
                    f, t = _up(torch, dev, img[idx]), _up(torch, dev, txt[idx])
                if k == 0:  # cs does not depend on the batch
                    for r0 in range(0, len(idx), row_block):
                        part = slice(r0, r0 + row_block)
                        cs[at[part]] = (f[part].float() * t[part].float()).sum(dim=1).to(acc)
                lse.index_add_(0, at, _batch_lse(torch, dev, f, t, inv, half, row_block, col_block, tile_bytes,
                                                 acc))
        return cs.cpu().numpy(), lse.cpu().numpy()


def _batch_lse(torch, dev, f, t, inv: float, half: bool, row_block: int, col_block: int, tile_bytes: int, acc):
    """Row plus column logsumexp of (f tᵀ)·inv for one batch, tile by tile."""
    n = len(f)
    row = torch.full((n,), -math.inf, dtype=acc, device=dev)
    col = torch.full((n,), -math.inf, dtype=acc, device=dev)
    for c0 in range(0, n, col_block):
        tc = t[c0 : c0 + col_block]
        tc = tc if half else tc.float()
        cols = slice(c0, c0 + len(tc))
        for r0 in range(0, n, row_block):
            fr = f[r0 : r0 + row_block]
            fr = fr if half else fr.float() * inv  # float32 rows: 1/τ first, as the CPU path

            def logits(b, fr=fr):
                s = _product(torch, dev, fr, b)
                return s.mul_(inv) if half else s

            s = logits(tc)
            rmax = s.amax(dim=1)
            s.sub_(rmax[:, None]).exp_()
            rows = slice(r0, r0 + len(fr))
            row[rows] = torch.logaddexp(row[rows], rmax.to(acc) + s.sum(dim=1).to(acc).log())
            col[cols] = torch.logaddexp(col[cols], _tile_columns(torch, s, rmax, tc, logits, tile_bytes, acc))
    return row + col


def _tile_columns(torch, e, rmax, tc, logits: Callable, tile_bytes: int, acc):
    """Column logsumexp of one tile given e = exp(s − rmax) row-wise: Σ_i exp(s_ij) = exp(M)·Σ_i
    exp(rmax_i − M)·e_ij with M = max rmax; columns whose sum is below 1e-20 are recomputed exactly."""
    top = rmax.max()
    csum = torch.exp(rmax - top) @ e
    out = top.to(acc) + csum.clamp_min(_TINY).to(acc).log()
    low = torch.nonzero(csum < _TINY).flatten()
    step = max(1, tile_bytes // (12 * len(e)))  # float32 logits + float64 exponentials
    for a in range(0, len(low), step):
        which = low[a : a + step]
        sub = logits(tc.index_select(0, which))
        cmax = sub.amax(dim=0)
        sub.sub_(cmax).exp_()
        out[which] = cmax.to(acc) + sub.to(acc).sum(dim=0).log()
    return out


# matrices kept on the device (NormSim targets, centroids, k-means data) --------------------------------
class DeviceMatrix:
    """A (T, D) matrix for products on a torch device, given as float32 host chunks (`source()`, in order).

    Resident: copied once, as float16 when every value is a float16 number (exact: half the memory), else
    as a `_Split` (two float16 parts per row; `split=False`, for rows that are queries: float32): T·D·2 or
    T·D·4 bytes of device memory. Streamed: every pass copies one host chunk at a time, in the same form
    (device memory: one chunk).
    """

    def __init__(self, torch, dev, source: Callable[[], Iterable[np.ndarray]] | None, data=None,
                 split: bool = True) -> None:
        self.torch, self.dev, self.source, self.data, self.split = torch, dev, source, data, split

    @classmethod
    def load(cls, source: Callable[[], Iterable[np.ndarray]], rows: int, dim: int, device: str,
             resident: bool | None = None, split: bool = True) -> DeviceMatrix:
        """Resident when `resident`, or (None) when T·D·4 bytes fit (`_keep_resident`); else streamed."""
        torch, dev = torch_device(device)
        if not _keep_resident(torch, dev, rows * dim * 4, resident):
            return cls(torch, dev, source, split=split)
        half = torch.empty((rows, dim), dtype=torch.float16, device=dev)
        other = None  # a _Split (or float32 rows) once some value is not a float16 number
        pos = 0
        for chunk in source():
            c = _up(torch, dev, np.asarray(chunk, dtype=np.float32))
            if other is None:
                h = c.half()
                if torch.equal(h.float(), c):
                    half[pos : pos + len(c)] = h
                    pos += len(c)
                    continue
                if split:  # every row split (the float16 rows so far exactly)
                    other = _Split(torch.empty_like(half), torch.empty_like(half),
                                   torch.empty(rows, dtype=torch.float32, device=dev))
                    other.put(0, _Split.of(torch, half[:pos].float()))
                else:
                    other = torch.empty((rows, dim), dtype=torch.float32, device=dev)
                    other[:pos] = half[:pos].float()
                half = None
            if split:
                other.put(pos, _Split.of(torch, c))
            else:
                other[pos : pos + len(c)] = c
            pos += len(c)
        if pos != rows:
            raise ValueError(f"matrix source gave {pos} rows, expected {rows}")
        return cls(torch, dev, None, half if other is None else other, split)  # the host rows are not kept

    @classmethod
    def of_tensor(cls, torch, dev, rows) -> DeviceMatrix:
        """Float32 rows already on the device (k-means centroids), in the compact form."""
        return cls(torch, dev, None, _compact(torch, rows))

    @classmethod
    def from_array(cls, arr: np.ndarray, device: str, resident: bool | None = None,
                   chunk_rows: int = PART_ROWS, split: bool = True) -> DeviceMatrix:
        """A host `(T, D)` array (float16 or float32) as a device matrix."""
        def source() -> Iterator[np.ndarray]:
            for s in range(0, len(arr), chunk_rows):
                yield to_float32(np.asarray(arr[s : s + chunk_rows]))

        return cls.load(source, len(arr), arr.shape[1], device, resident, split)

    @property
    def resident(self) -> bool:
        return self.data is not None

    def parts(self, max_rows: int = PART_ROWS) -> Iterator[tuple[int, Any]]:
        """`(first row, rows on the device)` covering the matrix in order, at most `max_rows` at a time."""
        if self.data is not None:
            for s in range(0, len(self.data), max_rows):
                yield s, self.data[s : s + max_rows]
            return
        pos = 0
        for chunk in self.source():
            c = _up(self.torch, self.dev, np.asarray(chunk, dtype=np.float32))
            c = _compact(self.torch, c) if self.split else _half_if_exact(self.torch, c)
            for s in range(0, len(c), max_rows):
                yield pos + s, c[s : s + max_rows]
            pos += len(c)


_CACHE: dict[tuple[str, str], tuple[Any, DeviceMatrix]] = {}


def cached_matrix(owner: object, name: str, device: str, make: Callable[[], DeviceMatrix]) -> DeviceMatrix:
    """`make()` once per `owner` (e.g. a NormSim target, a centroid array) and device in this process, so
    the shards of a run share one copy: one matrix per `name` and device, kept while its owner lives
    (a resident matrix holds no reference to it) until another owner's replaces it, or
    `release_device_matrices()`."""
    key = (device, name)

    def forget(ref: weakref.ref, key: tuple[str, str] = key) -> None:
        if _CACHE.get(key, (None,))[0] is ref:
            _CACHE.pop(key, None)

    with on_device(device):
        hit = _CACHE.get(key)
        if hit is not None and hit[0]() is owner:
            return hit[1]
        _CACHE.pop(key, None)  # free the previous one first
        matrix = make()
        _CACHE[key] = (weakref.ref(owner, forget), matrix)
        return matrix


def release_device_matrices() -> None:
    """Drop every cached device matrix (their memory returns to torch's allocator)."""
    _CACHE.clear()


# NormSim -------------------------------------------------------------------------------------------------
def normsim_on(block: np.ndarray, target: DeviceMatrix, p: float, device: str,
               tile_bytes: int = TILE_BYTES, part_rows: int = PART_ROWS) -> np.ndarray:
    """NormSim_p (float32) of every row of `block` (as stored) against the rows of `target`, on `device`.

    Products in `rows × PART_ROWS` float32 tiles (≤ tile_bytes), each reduced into one accumulator per row
    as the CPU path (`_Accumulator` in scores/normsim.py): max |x| for p = ∞ (one aminmax pass), Σ|x|^p in
    float64 otherwise, relative to the running row max for p ∉ {1, 2}. Device memory: `target` (resident
    or one chunk), the block as stored, one tile, 12 bytes per row.
    """
    with on_device(device) as (torch, dev):
        x = _half_if_exact(torch, _up(torch, dev, block))
        acc = _NormAcc(torch, dev, p, len(x))
        for _, part in target.parts(part_rows):
            step = _tile_rows(part, tile_bytes)
            for r0 in range(0, len(x), step):
                acc.add(r0, _product(torch, dev, x[r0 : r0 + step], part))
        return acc.result().cpu().numpy()


class _NormAcc:
    """The device twin of scores/normsim.py's `_Accumulator` (same operations, same dtypes)."""

    def __init__(self, torch, dev, p: float, n: int) -> None:
        self.torch, self.p, self.acc = torch, p, _acc_dtype(torch, dev)
        self.top = torch.zeros(n, dtype=torch.float32, device=dev)
        self.total = torch.zeros(n, dtype=self.acc, device=dev)

    def add(self, r0: int, prod) -> None:
        torch, rows = self.torch, slice(r0, r0 + len(prod))
        if self.p == math.inf:
            lo, hi = torch.aminmax(prod, dim=1)
            self.top[rows] = torch.maximum(self.top[rows], torch.maximum(hi, -lo))
            return
        prod.abs_()
        if self.p in (1, 2):
            if self.p == 2:
                prod.square_()
            self.total[rows] += prod.sum(dim=1).to(self.acc)
            return
        old = self.top[rows]
        new = torch.maximum(old, prod.amax(dim=1))
        safe = torch.where(new > 0, new, torch.ones_like(new))
        self.total[rows] *= (old / safe).to(self.acc) ** self.p
        prod.div_(safe[:, None]).pow_(float(np.float32(self.p)))
        self.total[rows] += prod.sum(dim=1).to(self.acc)
        self.top[rows] = new

    def result(self):
        if self.p == math.inf:
            return self.top
        if self.p in (1, 2):
            return (self.total ** (1 / self.p)).float()
        return (self.top.to(self.acc) * self.total ** (1 / self.p)).float()


# max inner product (image_based's centroids) and k-means ----------------------------------------------
def argmax_on(queries: np.ndarray, matrix: DeviceMatrix, device: str, tile_bytes: int = TILE_BYTES,
              part_rows: int = PART_ROWS, exact: tuple[DeviceMatrix, float] | None = None) -> np.ndarray:
    """Index (int64) of the row c of `matrix` with the largest q·c for every query row q (as stored), on
    `device`; the first index on exact ties, as numpy/torch argmax. With `exact` (the same rows with their
    exact values, `DeviceMatrix.from_array(..., split=False)`, and their largest norm), a query whose two
    largest products are within NEAR_TIE is decided in float64 there, as `refine_near_ties` does on the host:
    the same index on every device. Device memory: `matrix` and `exact` (resident or one chunk), the queries
    as stored, one tile of ≤ tile_bytes, 16 bytes per query."""
    with on_device(device) as (torch, dev):
        q = _half_if_exact(torch, _up(torch, dev, queries))
        arg, best, runner = _best(torch, dev, q, matrix, tile_bytes, part_rows=part_rows, second=exact is not None)
        if exact is not None:
            rows, cmax = exact
            near = torch.nonzero(best - runner <= NEAR_TIE * torch.linalg.vector_norm(q.float(), dim=1) * cmax)
            if len(near):
                near = near.squeeze(1)
                # `refine_near_ties` on the device: float64 products and sums (float32 on MPS, which has no
                # float64), 8,192 rows of `rows` at a time (50 MB at D = 768)
                acc = _acc_dtype(torch, dev)
                arg[near] = _best(torch, dev, q.index_select(0, near).to(acc), rows, tile_bytes,
                                  part_rows=min(part_rows, 8192), dtype=acc)[0]
        return arg.cpu().numpy()


NEAR_TIE = 2.0**-16  # a top-2 gap below this × ‖q‖·max‖c‖ (~1.5e-5; float32 errors are ~1e-6) is decided in float64


def max_norm(rows: np.ndarray) -> float:
    """The largest Euclidean norm of the float32 `rows` (no float64 copy of them)."""
    return float(np.sqrt(np.einsum("ij,ij->i", rows, rows).max())) if len(rows) else 0.0


def refine_near_ties(queries: np.ndarray, centroids: np.ndarray, labels: np.ndarray, rows: np.ndarray,
                     chunk: int = 8192) -> None:
    """`labels[rows]` set to the first index of max_c q·c in float64 (the queries decoded exactly, the float32
    centroids widened exactly): for the rows whose float32 top two are a near-tie, which float32 rounding
    (BLAS's, or a GPU's tensor cores) could order either way. One flipped row of the "which centroids hold an
    ImageNet image" pass would move a whole cluster of the pool, hence the same exact decision on every device."""
    if not len(rows):
        return
    q = to_float32(np.asarray(queries[rows])).astype(np.float64)
    best = np.full(len(rows), -np.inf)
    arg = np.zeros(len(rows), dtype=np.int64)
    for c0 in range(0, len(centroids), chunk):
        s = q @ np.asarray(centroids[c0 : c0 + chunk], dtype=np.float64).T
        i = s.argmax(axis=1)
        v = s[np.arange(len(s)), i]
        better = v > best
        best[better], arg[better] = v[better], i[better] + c0
    labels[rows] = arg


def _best(torch, dev, q, matrix: DeviceMatrix, tile_bytes: int, half_norms=None, part_rows: int = PART_ROWS,
          second: bool = False, dtype=None):
    """(index, value, runner-up value or None) of max_c q·c (minus half_norms[c] when given) over the parts of
    `matrix`; the first index on ties (a later part wins only with a strictly larger value). The runner-up
    (`second`) is the second largest value, equal to the largest on an exact tie. Products as `_product`
    takes them (float32), or with `dtype` (float64: `q` already of it) in that dtype throughout."""
    n = len(q)
    best = torch.full((n,), -math.inf, dtype=dtype or torch.float32, device=dev)
    runner = torch.full((n,), -math.inf, dtype=torch.float32, device=dev) if second else None
    arg = torch.zeros(n, dtype=torch.int64, device=dev)
    for off, part in matrix.parts(part_rows):
        if dtype is not None:
            part = part.to(dtype)
        step = _tile_rows(part, tile_bytes) if dtype is None else max(1, tile_bytes // (8 * len(part)))
        for r0 in range(0, n, step):
            s = _product(torch, dev, q[r0 : r0 + step], part) if dtype is None else q[r0 : r0 + step] @ part.T
            if half_norms is not None:
                s.sub_(half_norms[off : off + len(part)])
            value, index = torch.max(s, dim=1)
            rows = slice(r0, r0 + len(s))
            better = value > best[rows]
            if second:  # the tile's second value; then the top two of (best, runner) and the tile's
                two = s.scatter_(1, index[:, None], -math.inf).amax(dim=1)  # (the tile is ours: one pass)
                runner[rows] = torch.where(better, torch.maximum(best[rows], two), torch.maximum(runner[rows], value))
            best[rows] = torch.where(better, value, best[rows])
            arg[rows] = torch.where(better, index + off, arg[rows])
    return arg, best, runner


def kmeans_on(x: np.ndarray, k: int, niter: int, seed: int, device: str, verbose: bool = False,
              resident: bool | None = None, tile_bytes: int = TILE_BYTES) -> np.ndarray:
    """L2 k-means on `device`, following faiss.Kmeans: start from k distinct rows drawn with `seed`,
    then `niter` rounds of assignment (nearest centroid: the largest x·c − ‖c‖²/2, first index on ties)
    and update (each cluster's mean, summed in float64); an empty cluster takes half of a cluster drawn
    in proportion to its size, both perturbed by ±1/1024 (faiss's split). Not the same centroids as faiss
    (another random start). Returns float32 `(k, D)`.

    Device memory: the rows x (resident as `DeviceMatrix`, else one chunk), 20 bytes per centroid
    coordinate (the centroids in float32, their `_Split` form for the products, their float64 sums, the
    next centroids), one tile of ≤ tile_bytes, 16,384 rows in float64 (D·8 each).
    """
    n, dim = x.shape
    rng = np.random.default_rng(seed)
    start = np.ascontiguousarray(to_float32(np.asarray(x[rng.permutation(n)[:k]])))
    with on_device(device) as (torch, dev):
        acc = _acc_dtype(torch, dev)
        data = DeviceMatrix.from_array(x, device, resident, split=False)  # the rows are queries
        c = _up(torch, dev, start)
        for it in range(niter):
            centroids = DeviceMatrix.of_tensor(torch, dev, c)
            half_norms = (c * c).sum(dim=1) * 0.5
            sums = torch.zeros((k, dim), dtype=acc, device=dev)
            counts = torch.zeros(k, dtype=torch.int64, device=dev)
            objective = 0.0
            for _, part in data.parts():
                labels, best, _ = _best(torch, dev, part, centroids, tile_bytes, half_norms)
                # CUDA's index_add_ adds in no fixed order, yet the sums are run to run identical for rows of
                # float16 numbers below 1 (DataComp's embeddings): multiples of 2^-24, exact in float64 up to
                # 2^29 rows a cluster. Rows of other float32 values may differ in the last bits of a sum
                for s in range(0, len(part), 16384):
                    sums.index_add_(0, labels[s : s + 16384], part[s : s + 16384].to(acc))
                counts += torch.bincount(labels, minlength=k)
                if verbose:
                    objective += float((part.float().square().sum(dim=1) - 2 * best).sum())
            c = (sums / counts.clamp_min(1)[:, None].to(acc)).float()
            host_counts = counts.cpu().numpy()
            if (host_counts == 0).any():
                c = _up(torch, dev, _split_empty(c.cpu().numpy(), host_counts, rng))
            if verbose:
                print(f"k-means round {it + 1}/{niter}: objective {objective:.6g}, "
                      f"{int((host_counts == 0).sum())} empty clusters split", file=sys.stderr)
        return c.cpu().numpy()


def _split_empty(c: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """faiss's `split_clusters`: each empty cluster becomes a perturbed copy of a cluster drawn with
    probability ∝ (size − 1), which gives it half of its points."""
    counts = counts.copy()
    sign = np.where(np.arange(c.shape[1]) % 2 == 0, KMEANS_EPS, -KMEANS_EPS).astype(np.float32)
    for ci in np.flatnonzero(counts == 0):
        weight = np.maximum(counts - 1, 0).astype(np.float64)
        if weight.sum() <= 0:
            break
        cj = int(np.searchsorted(np.cumsum(weight), rng.random() * weight.sum(), side="right"))
        cj = min(cj, len(counts) - 1)
        c[ci] = c[cj] * (1 + sign)
        c[cj] = c[cj] * (1 - sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return c
