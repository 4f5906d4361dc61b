"""Array kernels: float16 decoding, NaN/inf checks, row-wise quadratic forms, Gram accumulation,
projections; on the CPU with numpy/BLAS, or on a torch device (`--device`). Every torch kernel
lives here: callers pass numpy arrays and a device name and get numpy arrays back."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

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
    f = torch.from_numpy(np.require(features, requirements=["C", "W"])).to(dev).float()
    s = torch.tensor(np.asarray(target, dtype=np.float32), device=dev)
    return ((f @ s) * f).sum(dim=1).cpu().numpy()


def gram64_on(features: np.ndarray, device: str) -> np.ndarray:
    """`gram64` on a device (float32 products, float64 sum on the host)."""
    if device == "cpu":
        return gram64(to_float32(features))
    torch, dev = torch_device(device)
    f = torch.from_numpy(np.require(features, requirements=["C", "W"])).to(dev).float()
    return (f.T @ f).double().cpu().numpy()


def projector(basis: np.ndarray, device: str) -> Callable[[np.ndarray], np.ndarray]:
    """`project(rows)`: float32 `rows @ basis` (float16 rows decoded first), on `device`; the basis
    is sent to a torch device once."""
    if device == "cpu":
        return lambda rows: to_float32(rows) @ basis
    torch, dev = torch_device(device)
    basis_t = torch.from_numpy(np.ascontiguousarray(basis, dtype=np.float32)).to(dev)
    return lambda rows: (torch.from_numpy(np.ascontiguousarray(rows)).to(dev).float() @ basis_t).cpu().numpy()


class ResidentRows:
    """Rows copied once into a torch device's memory, as stored (float16 stays float16).

    Scoring and Gram accumulation over any subset of them then happen there: nothing is sent to
    the device but the target (D×D) and the row indices. Products are float32 like the host path;
    the Gram of the chosen rows is accumulated in float64 on the device.
    """

    def __init__(self, torch, dev, data, block_rows: int) -> None:
        self.torch, self.dev, self.data, self.block_rows = torch, dev, data, block_rows

    @classmethod
    def load(cls, read: Callable[[int, int], np.ndarray], rows: int, dim: int, dtype: np.dtype, device: str,
             block_rows: int, resident: bool | None = None) -> ResidentRows | None:
        """Rows `read(start, stop)` (numpy, `(stop - start, dim)` of `dtype`) copied to `device`;
        None where they should stay on the host: `device` is `cpu`, `resident` is False, or (by
        default, `resident=None`) the device is not an accelerator or they would take more than half
        of its free memory."""
        if device == "cpu" or resident is False:
            return None
        torch, dev = torch_device(device)
        nbytes = rows * dim * np.dtype(dtype).itemsize
        if resident is None:
            if dev.type != "cuda":
                return None  # on the host the streamed rows keep memory bounded
            free, _total = torch.cuda.mem_get_info(dev)
            if nbytes > free // 2:
                return None
        probe = torch.from_numpy(np.zeros((1, dim), dtype=dtype))
        data = torch.empty((rows, dim), dtype=probe.dtype, device=dev)
        for start in range(0, rows, block_rows):
            stop = min(start + block_rows, rows)
            data[start:stop] = torch.from_numpy(np.ascontiguousarray(read(start, stop))).to(dev)
        return cls(torch, dev, data, block_rows)

    def score(self, idx: np.ndarray, target: np.ndarray) -> np.ndarray:
        """f_iᵀ S f_i (float32) for the rows at `idx`."""
        torch = self.torch
        s = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)).to(self.dev)
        index = torch.from_numpy(idx.astype(np.int64)).to(self.dev)
        out = torch.empty(len(idx), dtype=torch.float32, device=self.dev)
        step = self.block_rows * 4
        for a in range(0, len(idx), step):
            f = self.data.index_select(0, index[a : a + step]).float()
            out[a : a + step] = ((f @ s) * f).sum(dim=1)
        return out.cpu().numpy()

    def gram64(self, rows: np.ndarray) -> np.ndarray:
        """Σ f fᵀ (float64) over the rows at `rows`."""
        torch = self.torch
        index = torch.from_numpy(rows.astype(np.int64)).to(self.dev)
        dim = self.data.shape[1]
        total = torch.zeros((dim, dim), dtype=torch.float64, device=self.dev)
        for a in range(0, len(rows), self.block_rows):
            f = self.data.index_select(0, index[a : a + self.block_rows]).float()
            total += (f.T @ f).double()
        return total.cpu().numpy()
