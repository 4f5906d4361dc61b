"""DataComp's image_based rule: caption filter AND the sample's max-inner-product centroid is in S.

S = the centroids that are the max-inner-product centroid of at least one ImageNet-1k train
image (DataComp's `in1k_clip_vit_l14_{0..4}.pt`). Assignment is by largest dot product with
the (unnormalised) centroids, as in DataComp's `get_centroid_ids_gpu` — not the L2-nearest
centroid, although the centroids were trained with L2 k-means.

Search: a blocked float32 numpy matmul + argmax on CPU (first index on exact ties, as
torch.argmax); faiss `IndexFlatIP` on GPU when faiss sees one (same result up to float32
rounding on near-ties). On a torch device (`device="cuda"`, `"torch-cpu"`, ...): `backend.argmax_on`,
the centroids copied to the device once per process (as two float16 parts per row unless they are
float16 numbers, `backend._Split`: 307 MB for 100k × 768; streamed in chunks when above half of the
GPU's free memory), queries as stored, products in ≤ 512 MiB float32 tiles over
at most 65,536 centroids each with a running (max, runner-up, first index): device memory ≈ the
centroids (twice for float32 values: also their exact values) + 512 MiB + the queries, whatever the
centroid count (one task at a time per device in a process).

Near-ties: on the CPU (numpy) and on a torch device alike, a query whose two largest products are
within `backend.NEAR_TIE` (2^-16 ≈ 1.5e-5) × ‖q‖ · max‖c‖ is decided again in float64
(`backend.refine_near_ties`, `_best64` on the device), since float32 rounding (BLAS's, tensor cores')
orders such a pair either way, and in the "which centroids hold an ImageNet image" pass one flipped
row moves a whole cluster of the pool. So both give the same centroids but for exact float64 ties.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..backend import (
    NEAR_TIE,
    DeviceMatrix,
    argmax_on,
    cached_matrix,
    first_nonfinite_row,
    max_norm,
    refine_near_ties,
    to_float32,
)
from ..errors import VaralignError
from ..pool import Shard, embedding_member, iter_row_blocks
from .rules import PathArg, check_rows, image_based_caption_shard

BLOCK_ROWS = 16384  # npz rows per streamed block
BATCH = 65536  # query rows per search call
_SCORE_BYTES = 256 << 20  # numpy fallback: at most this much score matrix at a time

Assigner = Callable[[np.ndarray], np.ndarray]


def _faiss():  # the optional faiss module, or None
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError:
        return None
    return faiss


def check_centroids(centroids: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Centroids as a C-contiguous float32 `(K, D)` array (ValueError if malformed)."""
    cent = np.ascontiguousarray(centroids, dtype=np.float32)
    if cent.ndim != 2 or not len(cent) or (dim is not None and cent.shape[1] != dim):
        raise ValueError(f"centroids must be (K, {dim or 'D'}), got shape {cent.shape}")
    return cent


def centroid_assigner(centroids: np.ndarray, use_faiss: bool | None = None, device: str = "cpu") -> Assigner:
    """A function mapping float32 `(n, D)` queries to the index of their max-inner-product centroid.

    `use_faiss=None`: faiss on GPU when faiss sees one, else numpy (on CPU numpy was as fast as
    faiss `IndexFlatIP`: same CPU time within 5% on 10k-100k queries x 100k centroids, 2 cores).
    A torch `device` other than `cpu`: `backend.argmax_on` there (queries may stay float16).
    """
    cent = check_centroids(centroids)
    if device != "cpu":
        def exact_rows() -> tuple[DeviceMatrix, float]:  # their exact values and largest norm, for near-ties
            matrix = cached_matrix(cent, "centroids", device, lambda: DeviceMatrix.from_array(cent, device))
            halves = np.array_equal(cent.astype(np.float16).astype(np.float32), cent)  # float16 already exact
            return (matrix if halves else DeviceMatrix.from_array(cent, device, split=False)), max_norm(cent)

        def on_device(q: np.ndarray) -> np.ndarray:  # one copy per centroid array (the same one for every shard)
            matrix = cached_matrix(cent, "centroids", device, lambda: DeviceMatrix.from_array(cent, device))
            exact = cached_matrix(cent, "centroids-exact", device, exact_rows)
            return argmax_on(np.asarray(q), matrix, device, exact=exact)

        return on_device
    faiss = _faiss() if use_faiss is not False else None
    gpus = getattr(faiss, "get_num_gpus", lambda: 0)() if faiss is not None else 0
    if faiss is None or (use_faiss is None and gpus == 0):
        return lambda q: _argmax_numpy(np.ascontiguousarray(q, dtype=np.float32), cent)
    index = faiss.IndexFlatIP(cent.shape[1])
    index.add(cent)
    if gpus > 0:  # GPU build with a visible GPU (not testable on the CPU machines)
        index = faiss.index_cpu_to_all_gpus(index)

    def assign(q: np.ndarray) -> np.ndarray:
        if not len(q):
            return np.empty(0, dtype=np.int64)
        _, labels = index.search(np.ascontiguousarray(q, dtype=np.float32), 1)
        return labels[:, 0].astype(np.int64)

    return assign


def _argmax_numpy(queries: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Blocked `argmax(q @ C^T)` in float32; first index on exact ties (like torch.argmax); a query whose two
    largest products are within `backend.NEAR_TIE` is decided in float64 (`refine_near_ties`), as on a device."""
    out = np.empty(len(queries), dtype=np.int64)
    step = max(16, _SCORE_BYTES // (4 * len(centroids)))
    ct = centroids.T
    cmax = max_norm(centroids)
    near = []
    for start in range(0, len(queries), step):
        q = queries[start : start + step]
        s = q @ ct
        arg = np.argmax(s, axis=1)
        out[start : start + len(q)] = arg
        if s.shape[1] < 2:
            continue
        rows = np.arange(len(s))
        best = s[rows, arg].copy()
        s[rows, arg] = -np.inf
        gap = best - s.max(axis=1)
        near.append(start + np.flatnonzero(gap <= NEAR_TIE * np.sqrt(np.einsum("ij,ij->i", q, q)) * cmax))
    if near:
        refine_near_ties(queries, centroids, out, np.concatenate(near))
    return out


def assign_centroids(features: np.ndarray, centroids: np.ndarray, batch_size: int = BATCH,
                     device: str = "cpu") -> np.ndarray:
    """Max-inner-product centroid index (int64) of every row of an in-memory array."""
    assign = centroid_assigner(centroids, device=device)
    out = np.empty(len(features), dtype=np.int64)
    for start in range(0, len(features), batch_size):
        block = np.asarray(features[start : start + batch_size])
        out[start : start + batch_size] = assign(to_float32(block) if device == "cpu" else block)
    return out


def target_centroid_set(centroids: np.ndarray, in1k_features_iter: Iterable[np.ndarray],
                        batch: int = BATCH, device: str = "cpu") -> np.ndarray:
    """S as a bool mask over centroids: max-inner-product centroid of at least one target row."""
    assign = centroid_assigner(centroids, device=device)
    allowed = np.zeros(len(centroids), dtype=bool)
    seen = 0
    for feats in in1k_features_iter:
        if feats.ndim != 2 or feats.shape[1] != centroids.shape[1]:
            raise VaralignError(f"target features have shape {feats.shape}, centroids have dim {centroids.shape[1]}")
        for start in range(0, len(feats), batch):
            part = to_float32(np.asarray(feats[start : start + batch]))
            bad = first_nonfinite_row(part)
            if bad is not None:
                raise VaralignError(f"target features have NaN/inf at row {seen + start + bad}")
            allowed[assign(part)] = True
        seen += len(feats)
    if not seen:
        raise VaralignError("no target features given")
    return allowed


def image_based_shard(shard: Shard, rows: np.ndarray, centroids: np.ndarray, allowed: np.ndarray,
                      model_path: PathArg = None, batch_size: int = BLOCK_ROWS,
                      key: str = "l14_img", device: str = "cpu") -> np.ndarray:
    """DataComp image_based for the requested rows: caption filter AND centroid in `allowed`."""
    rows = check_rows(shard, rows)
    centroids = check_centroids(centroids)
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != (len(centroids),):
        raise ValueError(f"allowed must be a bool mask of shape ({len(centroids)},), got {allowed.shape}")
    out = image_based_caption_shard(shard, rows, model_path)
    need = np.flatnonzero(out)
    if need.size:
        labels = _shard_labels(shard, rows[need], centroids, batch_size, key, device)
        out[need] = allowed[labels]
    return out


def _shard_labels(shard: Shard, rows: np.ndarray, centroids: np.ndarray, block_rows: int, key: str,
                  device: str = "cpu") -> np.ndarray:
    """Centroid index of the given sorted rows, streaming the npz member block by block (on a torch
    `device` the rows go there as stored)."""
    member = embedding_member(shard, key, centroids.shape[1])
    assign = centroid_assigner(centroids, device=device)
    out = np.empty(len(rows), dtype=np.int64)
    for rb in iter_row_blocks(member, rows, block_rows):
        if len(rb.local):
            picked = rb.block[rb.local]
            out[rb.span] = assign(to_float32(picked) if device == "cpu" else picked)
    return out
