"""Atomic outputs: write to a temp file in the destination directory, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VaralignError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_output_path(path: str | os.PathLike) -> None:
    """Fail before any work if `path` cannot be written: it is a folder, or a parent is a file."""
    dest = Path(path)
    if dest.is_dir():
        raise VaralignError("output path is a directory", dest)
    parent = next((p for p in dest.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise VaralignError(f"cannot create the output: {parent} is not a directory", dest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """`np.save` atomically (no pickle)."""
    with atomic_path(path, ".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write pretty JSON atomically."""
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
