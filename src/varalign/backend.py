"""Array kernels on CPU: float16 decoding, row-wise quadratic forms, Gram accumulation."""

from __future__ import annotations

import os
import sys

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


def _torch_device(device: str):
    import torch  # noqa: PLC0415

    return torch, torch.device("cpu" if device == "torch-cpu" else device)


def quadratic_rows_on(features: np.ndarray, target: np.ndarray, device: str) -> np.ndarray:
    """`quadratic_rows` on a device: float16 rows are shipped as float16 and decoded there."""
    if device == "cpu":
        return quadratic_rows(to_float32(features), target)
    torch, dev = _torch_device(device)
    f = torch.from_numpy(np.require(features, requirements=["C", "W"])).to(dev).float()
    s = torch.tensor(np.asarray(target, dtype=np.float32), device=dev)
    return ((f @ s) * f).sum(dim=1).cpu().numpy()


def gram64_on(features: np.ndarray, device: str) -> np.ndarray:
    """`gram64` on a device (float32 products, float64 sum on the host)."""
    if device == "cpu":
        return gram64(to_float32(features))
    torch, dev = _torch_device(device)
    f = torch.from_numpy(np.require(features, requirements=["C", "W"])).to(dev).float()
    return (f.T @ f).double().cpu().numpy()
