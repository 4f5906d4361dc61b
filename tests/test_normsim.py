"""NormSim against full float64 products (REFERENCE.md §5.2), and its p = 2 link to VAS."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from conftest import random_shard, write_pool

from varalign.errors import VaralignError
from varalign.pool import discover_shards
from varalign.scores.normsim import NormSimTarget, as_target, normsim_scores, normsim_shard, parse_p
from varalign.scores.vas import vas_scores

P_VALUES = [1, 2, 3.5, "inf", 100]


def normsim_reference(features: np.ndarray, target: np.ndarray, p: float | str) -> np.ndarray:
    prod = np.abs(features.astype(np.float64) @ target.astype(np.float64).T)
    if p == "inf" or float(p) >= 100:
        return prod.max(axis=1)
    return (prod ** float(p)).sum(axis=1) ** (1 / float(p))


def _unit(rng, n, dim, dtype=np.float32):
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("gram", [True, False])
def test_in_memory_matches_reference(p, gram) -> None:
    rng = np.random.default_rng(0)
    feats, target = _unit(rng, 50, 12, np.float16), _unit(rng, 70, 12)
    tgt = as_target(target, chunk_rows=16)
    got = normsim_scores(feats, tgt, p, gram=gram, block_rows=9)
    np.testing.assert_allclose(got, normsim_reference(feats, target, p), rtol=2e-5, atol=1e-6)
    plain = normsim_scores(feats, target, p, gram=gram)  # a bare array works too
    np.testing.assert_allclose(plain, got, rtol=2e-5, atol=1e-6)


def test_large_p_does_not_overflow() -> None:
    rng = np.random.default_rng(1)
    feats, target = 40 * _unit(rng, 10, 6), 40 * _unit(rng, 30, 6)  # |x| up to 1600: x^50 overflows float32
    got = normsim_scores(feats, target, 50)
    np.testing.assert_allclose(got, normsim_reference(feats, target, 50), rtol=2e-5)


def test_p2_squared_is_t_times_vas() -> None:
    """NormSim_2(i)² = Σ_t (g_tᵀ f_i)² = |T| · VAS(i) with S = GᵀG / |T| (README: VAS is a special case)."""
    rng = np.random.default_rng(2)
    feats, target = _unit(rng, 40, 10), _unit(rng, 90, 10)
    vas = vas_scores(feats, (target.astype(np.float64).T @ target / len(target)).astype(np.float32))
    direct = normsim_scores(feats, target, 2, gram=False)
    np.testing.assert_allclose(direct.astype(np.float64) ** 2, len(target) * vas, rtol=1e-5)


def _target_files(tmp_path, target, torch):
    parts = np.split(target, [25, 60])
    np.save(tmp_path / "a.npy", parts[0].astype(np.float16))
    torch.save({"image_features": torch.from_numpy(parts[1]), "labels": torch.zeros(35)}, tmp_path / "b.pt")
    np.save(tmp_path / "c.npy", parts[2])
    return [tmp_path / "a.npy", tmp_path / "b.pt", tmp_path / "c.npy"]


@pytest.fixture()
def pool(tmp_path):
    rng = np.random.default_rng(3)
    return write_pool(tmp_path / "pool", [random_shard(rng, n, dim=16) for n in (57, 40)])


@pytest.mark.parametrize("p", P_VALUES)
def test_shard_with_split_target_matches_reference(pool, tmp_path, p) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    target = _unit(rng, 80, 16)
    tgt = NormSimTarget.from_paths(_target_files(tmp_path, target, torch), key="image_features", chunk_rows=11)
    assert tgt.rows == 80 and tgt.dim == 16
    exact = np.concatenate([target[:25].astype(np.float16).astype(np.float32), target[25:]])
    for shard in discover_shards(pool, need_npz=True):
        with np.load(shard.npz) as npz:
            feats = npz["l14_img"]
        for rows in (np.arange(shard.num_rows), np.array([0, 5, 6, 31, shard.num_rows - 1])):
            got = normsim_shard(shard, rows.astype(np.int64), tgt, p, block_rows=8)
            np.testing.assert_allclose(got, normsim_reference(feats[rows], exact, p), rtol=2e-5, atol=1e-6)


def test_target_pickles_without_cache(tmp_path) -> None:
    rng = np.random.default_rng(5)
    np.save(tmp_path / "g.npy", _unit(rng, 20, 4))
    tgt = NormSimTarget.from_paths([tmp_path]).prepare(2)
    clone = pickle.loads(pickle.dumps(tgt))
    assert clone._arrays is None and clone._gram is not None
    feats = _unit(rng, 5, 4)
    np.testing.assert_array_equal(normsim_scores(feats, clone, "inf"), normsim_scores(feats, tgt, "inf"))
    wrapped = pickle.loads(pickle.dumps(as_target(_unit(rng, 6, 4))))
    assert normsim_scores(feats, wrapped, 3).shape == (5,)


def test_nan_in_candidates_names_the_npz(tmp_path) -> None:
    shard = random_shard(np.random.default_rng(0), 30, dim=8)
    shard["l14_img"][21, 0] = np.inf
    (s,) = discover_shards(write_pool(tmp_path / "bad", [shard]), need_npz=True)
    with pytest.raises(VaralignError, match=r"00000000\.npz: embedding 'l14_img' has NaN/inf at row 21"):
        normsim_shard(s, np.arange(3, dtype=np.int64), _unit(np.random.default_rng(1), 5, 8), block_rows=8)


def test_bad_target_and_p(tmp_path) -> None:
    rng = np.random.default_rng(6)
    bad = _unit(rng, 10, 4)
    bad[7, 1] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(VaralignError, match=r"bad\.npy: embedding 'target' has NaN/inf at row 7"):
        normsim_scores(_unit(rng, 3, 4), NormSimTarget.from_paths([tmp_path / "bad.npy"]), 2)
    with pytest.raises(VaralignError, match="dim"):
        normsim_scores(_unit(rng, 3, 5), _unit(rng, 3, 4), 2)
    with pytest.raises(VaralignError, match=">= 1"):
        parse_p(0.5)
    assert parse_p("inf") == parse_p(100) == parse_p(250.0) == math.inf and parse_p("3") == 3.0


# -- on a torch device (issue 14) -------------------------------------------------------------------------
@pytest.mark.parametrize("p", P_VALUES)
@pytest.mark.parametrize("resident", [True, False])
def test_device_kernel_matches_reference(p, resident) -> None:
    """Target parts of 16 rows (resident) or chunks of 11 (streamed), 7-row product tiles."""
    pytest.importorskip("torch")
    from varalign.backend import DeviceMatrix, normsim_on

    rng = np.random.default_rng(7)
    feats, target = _unit(rng, 50, 12, np.float16), _unit(rng, 70, 12)
    matrix = DeviceMatrix.from_array(target, "torch-cpu", resident=resident, chunk_rows=11)
    got = normsim_on(feats, matrix, parse_p(p), "torch-cpu", tile_bytes=4 * 16 * 7, part_rows=16)
    np.testing.assert_allclose(got, normsim_reference(feats, target, p), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got, normsim_scores(feats, target, p, gram=False), rtol=1e-6, atol=1e-7)


def test_device_matrix_keeps_float16_when_exact_else_two_float16_parts() -> None:
    """A matrix of float16 numbers stays float16 on the device; any other is split per row into
    (hi + lo) · 2^-k (float16 parts: the rows within 2^-23 of their largest entry; float16 rows exactly)."""
    torch = pytest.importorskip("torch")
    from varalign.backend import DeviceMatrix, _Split

    rng = np.random.default_rng(8)
    exact = _unit(rng, 30, 6, np.float16).astype(np.float32)
    m = DeviceMatrix.from_array(exact, "torch-cpu", resident=True, chunk_rows=8)
    assert m.resident and m.data.dtype == torch.float16 and np.array_equal(m.data.float().numpy(), exact)
    wide = _unit(rng, 10, 6) * np.float32(1e-3) ** np.arange(10, dtype=np.float32)[:, None]  # rows of any scale
    mixed = np.concatenate([exact, wide, np.zeros((1, 6), np.float32)])  # float16 numbers first, then others
    m = DeviceMatrix.from_array(mixed, "torch-cpu", resident=True, chunk_rows=8)
    assert isinstance(m.data, _Split) and m.data.hi.dtype == m.data.lo.dtype == torch.float16
    back = m.data.float().numpy()
    assert np.array_equal(back[:30], exact) and not back[-1].any()
    assert (np.abs(back - mixed).max(axis=1) <= 2.0**-23 * np.abs(mixed).max(axis=1)).all()
    streamed = DeviceMatrix.from_array(mixed, "torch-cpu", resident=False, chunk_rows=8)
    parts = list(streamed.parts(5))
    assert not streamed.resident and [o for o, _ in parts] == [0, 5, 8, 13, 16, 21, 24, 29, 32, 37, 40]
    assert np.array_equal(np.concatenate([t.float().numpy() for _, t in parts]), back)


@pytest.mark.parametrize("p", P_VALUES)
def test_shard_on_a_device_matches_reference(pool, tmp_path, p) -> None:
    """The split target (a float16 .npy, a .pt, a float32 .npy) on the device, shards of 57 and 40 rows."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    target = _unit(rng, 80, 16)
    tgt = NormSimTarget.from_paths(_target_files(tmp_path, target, torch), key="image_features", chunk_rows=11)
    exact = np.concatenate([target[:25].astype(np.float16).astype(np.float32), target[25:]])
    for shard in discover_shards(pool, need_npz=True):
        with np.load(shard.npz) as npz:
            feats = npz["l14_img"]
        for rows in (np.arange(shard.num_rows), np.array([0, 5, 6, 31, shard.num_rows - 1])):
            got = normsim_shard(shard, rows.astype(np.int64), tgt, p, block_rows=8, device="torch-cpu")
            np.testing.assert_allclose(got, normsim_reference(feats[rows], exact, p), rtol=2e-5, atol=1e-6)
            cpu = normsim_shard(shard, rows.astype(np.int64), tgt, p, block_rows=8)
            np.testing.assert_allclose(got, cpu, rtol=2e-6, atol=1e-7)


def test_target_is_copied_to_the_device_once(pool, monkeypatch) -> None:
    """Every shard of a run meets the same resident copy of G (one per target and device in a process)."""
    pytest.importorskip("torch")
    from varalign import backend

    loads = []
    real = backend.DeviceMatrix.load.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[1])
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(backend.DeviceMatrix, "load", classmethod(counting))
    backend.release_device_matrices()
    tgt = as_target(_unit(np.random.default_rng(9), 30, 16))
    for shard in discover_shards(pool, need_npz=True):
        normsim_shard(shard, np.arange(shard.num_rows, dtype=np.int64), tgt, "inf", device="torch-cpu")
    assert loads == [30]
    other = as_target(_unit(np.random.default_rng(10), 20, 16))
    normsim_shard(discover_shards(pool, need_npz=True)[0], np.arange(3, dtype=np.int64), other, 3, device="torch-cpu")
    assert loads == [30, 20]  # another target replaces it
    backend.release_device_matrices()
