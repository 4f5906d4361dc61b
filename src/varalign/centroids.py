"""Pool centroids for the image_based rule: DataComp's `image_based_clustering.py` recipe.

faiss k-means (L2), K = 100,000, 20 iterations, seed 0, `max_points_per_centroid` 10M (no
faiss-side subsampling), on the `l14_img` embeddings of the rows that pass the image_based
caption filter; `sample_ratio` -1 (all rows) for small/medium, 0.3 for large, 0.03 for xlarge.
CPU by default, all GPUs when faiss sees one.

Memory: faiss needs the whole training set in RAM as float32, N × D × 4 bytes (10M rows ×
768 × 4 B = 30.7 GB); bound it with `sample_ratio`. Compute: each iteration costs about
N × K × D × 2 flops (10M × 100k × 768 × 2 ≈ 1.5 PFLOP): a GPU job at pool scale (DataComp:
~10 min on 8 GPUs for small); the CPU path is for small pools and tests.
Differences from DataComp: the sample is drawn without replacement from a generator seeded by
(`seed`, shard index), so it is reproducible (DataComp draws with replacement from the global
numpy state of spawned workers, which its seed does not reach).

On a torch device (`device="cuda"`, ...; `varalign centroids --device`): faiss's GPU k-means on every GPU
faiss sees when faiss has GPU support and the device is CUDA (what DataComp runs; `cuda:N`: GPU N alone), else
`backend.kmeans_on` on the device (Lloyd iterations as faiss's, another random start: not the same
centroids as faiss). Device memory there: the training rows (resident, float16 when they are float16
numbers, as rows decoded from a DataComp pool are: N × D × 2 bytes, when that is at most half of the free
memory; else streamed), 20 bytes per centroid coordinate (1.5 GB at K = 100,000), and one 512 MiB
tile, whatever N or K.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import numpy as np

from .backend import to_float32
from .errors import VaralignError
from .guard import guarded_outputs
from .pool import Shard, discover_shards, embedding_member, iter_row_blocks

SAMPLE_RATIO = {"small": -1.0, "medium": -1.0, "large": 0.3, "xlarge": 0.03}
BLOCK_ROWS = 16384


def training_rows(shard: Shard, index: int, caption_filter: bool, sample_ratio: float, seed: int,
                  model_path: str | os.PathLike | None = None) -> np.ndarray:
    """Sorted rows of one shard used for training: caption filter, then a seeded sample."""
    rows = np.arange(shard.num_rows, dtype=np.int64)
    if caption_filter:
        from .scores.rules import image_based_caption_shard  # noqa: PLC0415 - needs the rules extra

        rows = rows[image_based_caption_shard(shard, rows, model_path)]
    if sample_ratio > 0:
        rng = np.random.default_rng([seed, index])
        rows = np.sort(rng.choice(rows, size=int(len(rows) * sample_ratio), replace=False))
    return rows


def load_training_embeddings(pool_dir: str | os.PathLike, key: str = "l14_img", caption_filter: bool = True,
                             sample_ratio: float = -1.0, seed: int = 0,
                             model_path: str | os.PathLike | None = None) -> np.ndarray:
    """The (filtered, sampled) embeddings of a pool as one float32 `(N, D)` array, shards in name order."""
    shards = discover_shards(pool_dir, need_npz=True)
    picked = [training_rows(s, i, caption_filter, sample_ratio, seed, model_path) for i, s in enumerate(shards)]
    dim = embedding_member(shards[0], key).shape[1]
    out = np.empty((sum(map(len, picked)), dim), dtype=np.float32)  # the one big allocation
    pos = 0
    for shard, rows in zip(shards, picked, strict=True):
        member = embedding_member(shard, key, dim)
        for rb in iter_row_blocks(member, rows, BLOCK_ROWS):
            out[pos + rb.span.start : pos + rb.span.stop] = to_float32(rb.block[rb.local])
        pos += len(rows)
    return out


def train_kmeans(embeddings: np.ndarray, k: int = 100_000, niter: int = 20, seed: int = 0,
                 max_points_per_centroid: int = 10_000_000, gpu: bool | int | None = None,
                 verbose: bool = False, device: str = "cpu") -> np.ndarray:
    """faiss L2 k-means; `gpu=None` or True uses every GPU faiss sees, an int (not a bool) that one GPU only
    (`--device cuda:N`), False none. On a torch `device` other than `cpu`: `train_kmeans_on` (see the module
    doc). Returns float32 `(k, D)` centroids."""
    if device != "cpu":
        return train_kmeans_on(embeddings, k, niter, seed, max_points_per_centroid, verbose, device)
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise VaralignError("building centroids needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) < k:
        raise VaralignError(f"k-means needs at least k={k} training rows, got {len(x)}")
    if gpu is None:
        gpu = getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    one = not isinstance(gpu, bool)  # one GPU, by its index (faiss.Kmeans's own gpu= takes a count of GPUs)
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                      gpu=False if one else gpu, verbose=verbose)
    if one:
        resources = faiss.StandardGpuResources()  # kept alive until the training ends
        km.index = faiss.index_cpu_to_gpu(resources, int(gpu), km.index)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])


def train_kmeans_on(embeddings: np.ndarray, k: int, niter: int, seed: int, max_points_per_centroid: int,
                    verbose: bool, device: str) -> np.ndarray:
    """k-means for a torch `device`: faiss on the GPUs when it has them and `device` is CUDA (`cuda`: every GPU
    faiss sees, as DataComp; `cuda:N`: GPU N alone), else torch."""
    from .backend import check_device, kmeans_on  # noqa: PLC0415

    check_device(device)
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) < k:
        raise VaralignError(f"k-means needs at least k={k} training rows, got {len(x)}")
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError:
        faiss = None
    if device.startswith("cuda") and faiss is not None and getattr(faiss, "get_num_gpus", lambda: 0)() > 0:
        index = device.partition(":")[2]
        return train_kmeans(x, k, niter, seed, max_points_per_centroid, gpu=int(index) if index else True,
                            verbose=verbose)
    if len(x) > k * max_points_per_centroid:  # faiss subsamples the same way (with its own generator)
        x = x[np.sort(np.random.default_rng(seed).choice(len(x), k * max_points_per_centroid, replace=False))]
    return kmeans_on(x, k, niter, seed, device, verbose=verbose)


def build_centroids(source: str | os.PathLike | Iterable[np.ndarray], k: int = 100_000, niter: int = 20,
                    seed: int = 0, max_points_per_centroid: int = 10_000_000, sample_ratio: float = -1.0,
                    caption_filter: bool = True, key: str = "l14_img",
                    model_path: str | os.PathLike | None = None, gpu: bool | None = None,
                    save_path: str | os.PathLike | None = None, verbose: bool = False,
                    overwrite: bool = False, device: str = "cpu") -> np.ndarray:
    """Centroids of a pool directory (caption filter + sample as DataComp) or of embedding arrays.

    An iterator of arrays is used as given (no caption filter, no sampling). With `save_path`
    the centroids are written atomically as float32 `.npy`, with a manifest beside them; an existing
    file varalign did not write is not replaced unless `overwrite`. `device`: see `train_kmeans`.
    """
    if device != "cpu":
        from .backend import check_device  # noqa: PLC0415

        check_device(device)  # before any work
    if sample_ratio > 1:
        raise VaralignError(f"sample_ratio must be <= 1 (or <= 0 for no sampling), got {sample_ratio}")
    with contextlib.ExitStack() as stack:
        group = None
        if save_path is not None:  # checked, locked and verified before the (long) k-means
            inputs = {"--metadata_dir": str(source) if isinstance(source, (str, os.PathLike)) else None,
                      "--fasttext_model": model_path}
            group = stack.enter_context(guarded_outputs({"--save_path": save_path}, inputs, overwrite=overwrite,
                                                        pool_dirs=[inputs["--metadata_dir"]] if inputs[
                                                            "--metadata_dir"] else []))
        if isinstance(source, (str, os.PathLike)):
            x = load_training_embeddings(source, key, caption_filter, sample_ratio, seed, model_path)
        else:
            parts = [to_float32(np.asarray(a)) for a in source]
            x = np.concatenate(parts) if parts else np.empty((0, 0), dtype=np.float32)
            if not np.isfinite(x).all():
                raise VaralignError("training embeddings hold NaN/inf")
        centroids = train_kmeans(x, k, niter, seed, max_points_per_centroid, gpu, verbose, device)
        if group is not None:
            with group.write(save_path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, centroids, allow_pickle=False)
            group.commit({"tool": "varalign centroids", "path": str(save_path), "k": int(len(centroids)),
                          "dim": int(centroids.shape[1]), "niter": niter, "seed": seed,
                          "sample_ratio": sample_ratio, "caption_filter": caption_filter, "training_rows": len(x),
                          "source": str(source) if isinstance(source, (str, os.PathLike)) else "arrays"}
                         | ({"device": device} if device != "cpu" else {}))
    return centroids
