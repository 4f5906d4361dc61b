"""Target second-moment matrices: load (npy / torch .pt, safely), validate, build from embeddings."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import VaralignError
from .npz import load_npy
from .ptfile import load_pt

TARGET_ALIASES = {"imagenet-1k": "imagenet_1k", "variance_imagenet_1k": "imagenet_1k"}


def canonical_target_name(name: str) -> str:
    """The name a target is stored under (`imagenet-1k` and `variance_imagenet_1k` are `imagenet_1k`)."""
    return TARGET_ALIASES.get(name, name)


def target_path_for(files_path: str | os.PathLike, name: str) -> Path:
    """Where the VAS reference looks for a named target: `{files_path}/variance/variance_{name}.pt`.

    A `.npy` with the same stem (what `varalign target` writes without torch) is found too.
    """
    name = canonical_target_name(name)
    base = Path(files_path) / "variance" / f"variance_{name}"
    for suffix in (".pt", ".npy"):
        if base.with_suffix(suffix).exists():
            return base.with_suffix(suffix)
    raise VaralignError(
        f"no target named {name!r}: expected variance_{name}.pt or .npy (build one with `varalign target`)",
        base.parent)


def load_array(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Load a numeric array from `.npy` (no pickle) or `.pt` (`ptfile.load_pt`: never a full unpickle)."""
    path = Path(path)
    if not path.exists():
        raise VaralignError("file not found", path)
    if path.suffix == ".npy":
        try:
            arr = load_npy(path, mmap_mode="r")
        except ValueError as exc:
            why = "pickle refused: " if "object" in str(exc) or "pickle" in str(exc) else ""
            raise VaralignError(f"not a plain numeric .npy ({why}{exc})", path) from None
        except (OSError, EOFError) as exc:
            raise VaralignError(f"unreadable .npy ({exc})", path) from None
    elif path.suffix in (".pt", ".pth"):
        arr = load_pt(path, key)
    else:
        raise VaralignError("unsupported array file: use .npy or .pt", path)
    if arr.dtype.kind not in "fiu":
        raise VaralignError(f"array must be numeric, found {arr.dtype}", path)
    return arr


def load_target(path: str | os.PathLike, dim: int | None = None) -> np.ndarray:
    """Load a D×D target, check shape, finiteness and symmetry, return float32."""
    arr = np.array(load_array(path), dtype=np.float32)  # a copy in memory: no map of the user's file kept
    validate_target(arr, dim, path)
    return arr


def validate_target(arr: np.ndarray, dim: int | None, path: object) -> None:
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise VaralignError(f"target must be a square D×D matrix, found shape {arr.shape}", path)
    if dim is not None and arr.shape[0] != dim:
        raise VaralignError(f"target is {arr.shape[0]}×{arr.shape[1]} but the embeddings have dim {dim}", path)
    if not np.isfinite(arr).all():
        raise VaralignError("target has NaN/inf entries", path)
    scale = float(np.abs(arr).max()) or 1.0
    asym = float(np.abs(arr - arr.T).max())
    if asym > 1e-5 * scale:
        raise VaralignError(f"target is not symmetric (max |S - S^T| = {asym:.3g})", path)


class SecondMoment:
    """Streaming uncentered second moment: sum of f f^T in float64, divided by the row count.

    On a torch `device` the float32 products of each 8,192-row chunk run there (as `gram64` does them on
    the CPU) and are summed in float64 on the host; device memory: those rows in float32 and the D × D
    product (30 MB at D = 768)."""

    def __init__(self, dim: int | None = None, device: str = "cpu") -> None:
        self.dim = dim
        self.device = device
        self.total: np.ndarray | None = None
        self.count = 0

    def _gram(self, f: np.ndarray) -> np.ndarray:
        from .backend import gram64, gram64_on, on_device  # noqa: PLC0415

        if self.device == "cpu":
            return gram64(f)
        total = np.zeros((f.shape[1], f.shape[1]), dtype=np.float64)
        with on_device(self.device):
            for start in range(0, len(f), 8192):
                total += gram64_on(f[start : start + 8192], self.device)
        return total

    def add(self, features: np.ndarray) -> None:
        from .backend import to_float32  # noqa: PLC0415

        if features.ndim != 2:
            raise ValueError(f"embeddings must be 2-d, found shape {features.shape}")
        if self.dim is None:
            self.dim = features.shape[1]
        if features.shape[1] != self.dim:
            raise ValueError(f"embedding dim {features.shape[1]} differs from {self.dim}")
        part = self._gram(to_float32(np.asarray(features)))
        self.total = part if self.total is None else self.total + part
        self.count += len(features)

    def merge(self, total: np.ndarray, count: int) -> None:
        self.total = total.copy() if self.total is None else self.total + total
        self.count += count

    def result(self) -> np.ndarray:
        if self.total is None or self.count == 0:
            raise ValueError("no embeddings were added")
        return (self.total / self.count).astype(np.float32)


def iter_array_blocks(arr: np.ndarray, rows: int = 65536) -> Iterator[np.ndarray]:
    for start in range(0, len(arr), rows):
        yield np.asarray(arr[start : start + rows])


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files behind the inputs: a `.npy`/`.pt` file, or a folder of them (sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix in (".npy", ".pt", ".pth"))
            if not found:
                raise VaralignError("folder holds no .npy or .pt files", p)
            out.extend(found)
        elif p.exists():
            out.append(p)
        else:
            raise VaralignError("file not found", p)
    return out


class _PoolSource:
    """A pool input of `build_target`: its shards, and the npz key to read."""

    def __init__(self, root: Path, key: str) -> None:
        from .pool import discover_shards  # noqa: PLC0415

        self.shards, self.key = discover_shards(root, need_npz=True), key


def _pool_blocks(root: Path, key: str) -> _PoolSource:
    return _PoolSource(root, key)


def _block_stats(block: np.ndarray, normalize: bool, device: str) -> tuple[np.ndarray, int, float]:
    """One block's float64 Gram (of the normalised rows if asked), row count and sum of row norms."""
    from .backend import to_float32  # noqa: PLC0415

    f = to_float32(block)
    norms = np.linalg.norm(f, axis=1)
    if normalize:
        f = f / np.maximum(norms, 1e-12)[:, None]
    return SecondMoment(dim=f.shape[1], device=device)._gram(f), len(f), float(norms.sum())


def _block_part(origin: str, block: np.ndarray, normalize: bool, acc: SecondMoment) -> tuple:
    if block.ndim != 2:
        raise VaralignError(f"embeddings must be 2-d, found shape {block.shape}", origin)
    if acc.dim is not None and block.shape[1] != acc.dim:
        raise VaralignError(f"embedding dim {block.shape[1]} differs from {acc.dim}", origin)
    return (origin, *_block_stats(block, normalize, acc.device))


def shard_target_parts(shard, key: str, normalize: bool, device: str) -> list[tuple]:
    """A shard's target sums, one per 65,536-row block (a task: the driver adds them in pool order)."""
    from .pool import embedding_member, iter_checked_blocks  # noqa: PLC0415

    return [_block_stats(block, normalize, device)
            for _start, block in iter_checked_blocks(embedding_member(shard, key), 65536)]


def _pool_parts(source: _PoolSource, normalize: bool, device: str) -> Iterator[tuple]:
    from .execute import LocalExecutor, default_workers  # noqa: PLC0415

    # BLAS keeps its own threads (as a single driver loop did), so the sums are the same bits
    executor = LocalExecutor(1 if device != "cpu" else default_workers(), limit_kernels=False)
    window = 2 * executor.num_workers  # the driver holds a window's block sums (D x D float64 each)
    for start in range(0, len(source.shards), window):
        part = source.shards[start : start + window]
        results = executor.map(shard_target_parts, [(s, source.key, normalize, device) for s in part],
                               "target", quiet=True)
        for shard, blocks in zip(part, results, strict=True):
            for gram, count, norms in blocks:
                yield shard.npz, gram, count, norms


def _file_blocks(path: Path, key: str | None) -> Iterator[tuple[str, np.ndarray]]:
    from .backend import check_finite  # noqa: PLC0415

    arr = load_array(path, key)
    if arr.ndim != 2:
        raise VaralignError(f"embeddings must be a 2-d (N, D) array, found shape {arr.shape}", path)
    start = 0
    for block in iter_array_blocks(arr):
        check_finite(block, start, path, key or "array")
        start += len(block)
        yield str(path), block


def _is_pool(path: Path | str) -> bool:
    from . import storage  # noqa: PLC0415

    if storage.is_url(path):  # a pool in object storage (a URL input is always a pool)
        return True
    return path.is_dir() and any(p.suffix == ".parquet" for p in path.iterdir())


def build_target(inputs: Iterable[str | os.PathLike], save_path: str | os.PathLike, arch: str = "l14",
                 key: str | None = None, normalize: bool = False, quiet: bool = False,
                 overwrite: bool = False, device: str = "cpu") -> dict:
    """Build the (1/N) Σ f fᵀ target from embeddings and save it (float32 `.npy`, or `.pt` with torch).

    `inputs`: DataComp metadata dirs (reads `{arch}_img`, or `key`), `.npy`/`.pt` files, or
    folders of them. Returns a summary dict (rows, dim, trace, mean row norm). The target and its
    manifest appear together; an existing file varalign did not write is not replaced unless `overwrite`.
    `device`: a torch device for the products (`SecondMoment`); `cpu` is numpy/BLAS.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .guard import guarded_outputs  # noqa: PLC0415

    inputs = list(inputs)
    from . import storage  # noqa: PLC0415

    save_path = save_path if storage.is_url(save_path) else Path(save_path)
    suffix = os.path.splitext(str(save_path))[1]
    if device != "cpu":
        from .backend import check_device  # noqa: PLC0415

        check_device(device)
    if suffix == ".pt":
        try:
            import torch  # noqa: PLC0415
        except ImportError:
            raise VaralignError("saving .pt needs torch; save as .npy instead", save_path) from None
    files: list[Path] = []
    sources: list[Iterator[tuple[str, np.ndarray]]] = []
    for item in inputs:
        p = item if storage.is_url(item) else Path(item)
        if _is_pool(p):
            files.append(p)
            sources.append(_pool_blocks(p, key or f"{arch}_img"))
        else:
            found = expand_inputs([p])
            files.extend(found)
            sources.extend(_file_blocks(f, key) for f in found)
    for item in inputs:  # a target saved into a folder of input arrays would be read by the next run
        p = Path(item)
        if storage.is_url(item) or storage.is_url(save_path):
            continue
        if p.is_dir() and not _is_pool(p) and suffix in (".npy", ".pt", ".pth") \
                and save_path.absolute().parent.resolve() == p.resolve():
            raise VaralignError(f"--save_path is inside the input folder {p}: the next run would read it as an "
                                "input; write it elsewhere", save_path)
    with guarded_outputs({"--save_path": save_path}, {"an input": [str(f) for f in files]},
                         overwrite=overwrite) as group:
        acc = SecondMoment(device=device)
        norm_sum = 0.0
        with tqdm(desc="target", unit="row", unit_scale=True, disable=quiet, leave=False) as bar:
            for source in sources:
                # a pool's shards run through the executor (block sums come back and are added in pool
                # order, so the target does not depend on the worker count); arrays block by block here
                parts = _pool_parts(source, normalize, device) if isinstance(source, _PoolSource) else (
                    _block_part(origin, block, normalize, acc) for origin, block in source)
                for origin, gram, count, norms in parts:
                    if acc.dim is not None and gram.shape[0] != acc.dim:
                        raise VaralignError(f"embedding dim {gram.shape[0]} differs from {acc.dim}", origin)
                    acc.dim = gram.shape[0]
                    acc.merge(gram, count)
                    norm_sum += norms
                    bar.update(count)
        if acc.count == 0:
            raise VaralignError("no embeddings found in the inputs")
        target = acc.result()
        with group.write(save_path) as tmp:
            if suffix == ".pt":
                torch.save(torch.from_numpy(target), tmp)
            else:
                with open(tmp, "wb") as fh:
                    np.save(fh, target, allow_pickle=False)
        info = {"rows": acc.count, "dim": int(target.shape[0]), "trace": float(np.trace(target)),
                "mean_row_norm": norm_sum / acc.count, "normalized": normalize,
                "inputs": [str(i) for i in inputs], "path": str(save_path)}
        group.commit({"tool": "varalign target", **info})
    return info
