"""negCLIPLoss against a full-matrix float64 restatement of the reference (REFERENCE.md §5.1)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from conftest import random_shard, write_pool

from varalign.errors import VaralignError
from varalign.pool import discover_shards
from varalign.scores.negcliploss import negcliploss_scores, negcliploss_shard


def _lse(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def ncl_reference(img, txt, perms, batch_size, tau) -> np.ndarray:
    """cs − mean_k (R1 + R2) with the whole B × B similarity of each batch, in float64."""
    f, t = img.astype(np.float64), txt.astype(np.float64)
    cs = np.einsum("ij,ij->i", f, t)
    norm = np.zeros(len(f))
    for perm in perms:
        for b0 in range(0, len(f), batch_size):
            idx = perm[b0 : b0 + batch_size]
            sim = f[idx] @ t[idx].T / tau
            norm[idx] += tau / 2 * (_lse(sim, 1) + _lse(sim, 0))
    return cs - norm / len(perms)


def _perms(n, seed, k):
    return [np.random.default_rng([*seed, i]).permutation(n) for i in range(k)]


def _pairs(n, dim, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n, dim))
    txt = img + rng.standard_normal((n, dim))  # correlated pairs: a realistic diagonal
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return (scale * img).astype(np.float32), (scale * txt).astype(np.float32)


@pytest.mark.parametrize("n,batch,k,tau", [(50, 16, 3, 0.01), (50, 50, 1, 0.07), (37, 64, 2, 0.01), (61, 7, 4, 0.05)])
def test_matches_full_matrix_reference(n, batch, k, tau) -> None:
    img, txt = _pairs(n, 16)
    got = negcliploss_scores(img, txt, temperature=tau, batch_size=batch, average_num=k, seed=5, row_block=5)
    want = ncl_reference(img, txt, _perms(n, [5], k), batch, tau)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


def test_underflowing_columns_recomputed_exactly() -> None:
    img, txt = _pairs(40, 8, scale=3.0, seed=1)  # similarities in [-9, 9]: exp spans far beyond float32
    got = negcliploss_scores(img, txt, temperature=0.01, batch_size=40, average_num=1, row_block=6)
    want = ncl_reference(img, txt, [np.arange(40)], 40, 0.01)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_one_batch_is_permutation_free_and_k_averages() -> None:
    img, txt = _pairs(30, 8)
    a = negcliploss_scores(img, txt, batch_size=1000, average_num=1, seed=1)
    b = negcliploss_scores(img, txt, batch_size=1000, average_num=3, seed=2)
    np.testing.assert_allclose(a, b, atol=1e-6)
    small = [negcliploss_scores(img, txt, batch_size=8, average_num=k, seed=1) for k in (1, 6)]
    assert not np.allclose(small[0], small[1], atol=1e-4)  # K really changes the average


def test_rows_in_one_batch_are_normalised_once(monkeypatch) -> None:
    """Rows that fit in one batch form the same batch in every repeat: one log-sum-exp pass, not K (and the
    full-matrix reference's K-repeat average, up to float order); more rows than a batch: K passes."""
    import varalign.scores.negcliploss as ncl  # noqa: PLC0415

    calls = []
    real = ncl.batch_logsumexp
    monkeypatch.setattr(ncl, "batch_logsumexp", lambda f, *a, **k: (calls.append(len(f)), real(f, *a, **k))[1])
    img, txt = _pairs(40, 8)
    got = negcliploss_scores(img, txt, temperature=0.02, batch_size=40, average_num=10, seed=4)
    assert calls == [40]
    np.testing.assert_allclose(got, ncl_reference(img, txt, _perms(40, [4], 10), 40, 0.02), rtol=0, atol=2e-5)
    calls.clear()
    negcliploss_scores(img, txt, temperature=0.02, batch_size=39, average_num=10, seed=4)
    assert calls == [39, 1] * 10
    pytest.importorskip("torch")
    perms = []
    real_on = ncl.negcliploss_on
    monkeypatch.setattr(ncl, "negcliploss_on", lambda i, t, p, *a, **k: real_on(i, t, perms.extend(p) or perms, *a, **k))
    negcliploss_scores(img, txt, temperature=0.02, batch_size=64, average_num=10, seed=4, device="torch-cpu")
    assert len(perms) == 1


def test_float16_input_decoded_exactly() -> None:
    img, txt = _pairs(20, 8)
    img16, txt16 = img.astype(np.float16), txt.astype(np.float16)
    got = negcliploss_scores(img16, txt16, batch_size=6, average_num=2, seed=3)
    want = ncl_reference(img16, txt16, _perms(20, [3], 2), 6, 0.01)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.fixture()
def pool(tmp_path):
    rng = np.random.default_rng(4)
    return write_pool(tmp_path / "pool", [random_shard(rng, n, dim=24) for n in (70, 45, 33)])


def _shard_arrays(shard):
    with np.load(shard.npz) as npz:
        return npz["l14_img"], npz["l14_txt"]


@pytest.mark.parametrize("restrict", [False, True])
def test_shard_matches_reference(pool, restrict) -> None:
    for shard in discover_shards(pool, need_npz=True):
        rows = np.arange(shard.num_rows, dtype=np.int64)
        if restrict:
            rows = rows[(rows % 3 != 1)]
        got = negcliploss_shard(shard, rows, temperature=0.02, batch_size=16, average_num=3, seed=9, block_rows=10)
        img, txt = _shard_arrays(shard)
        seed = [9, zlib.crc32(shard.name.encode())]
        want = ncl_reference(img[rows], txt[rows], _perms(len(rows), seed, 3), 16, 0.02)
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_shard_deterministic_and_order_free(pool) -> None:
    shards = discover_shards(pool, need_npz=True)

    def run(order):
        return {s.name: negcliploss_shard(s, np.arange(s.num_rows), batch_size=20, average_num=2, seed=1)
                for s in order}

    first, again, backwards = run(shards), run(shards), run(shards[::-1])
    for name, scores in first.items():
        assert np.array_equal(scores, again[name]) and np.array_equal(scores, backwards[name])
    other = negcliploss_shard(shards[0], np.arange(shards[0].num_rows), batch_size=20, average_num=2, seed=2)
    assert not np.array_equal(other, first[shards[0].name])


def test_nan_names_the_npz(tmp_path) -> None:
    shard = random_shard(np.random.default_rng(0), 30, dim=8)
    shard["l14_txt"][17, 3] = np.nan
    (s,) = discover_shards(write_pool(tmp_path / "bad", [shard]), need_npz=True)
    with pytest.raises(VaralignError, match=r"00000000\.npz: embedding 'l14_txt' has NaN/inf at row 17"):
        negcliploss_shard(s, np.arange(5, dtype=np.int64), block_rows=8)


def test_bad_arguments() -> None:
    img, txt = _pairs(4, 3)
    with pytest.raises(VaralignError, match="same"):
        negcliploss_scores(img, txt[:3])
    with pytest.raises(VaralignError, match="temperature"):
        negcliploss_scores(img, txt, temperature=0)
    with pytest.raises(VaralignError, match="average_num"):
        negcliploss_scores(img, txt, average_num=0)


# -- on a torch device (issue 14): the same permutations and formulas in tiles ---------------------------
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("resident", [True, False])
def test_device_kernel_matches_full_matrix_reference(dtype, resident) -> None:
    """Batches of 16 met in 5 × 3 tiles (several row and column tiles per batch, a short last batch);
    the rows kept on the device or copied batch by batch."""
    pytest.importorskip("torch")
    from varalign.backend import negcliploss_on

    img, txt = (a.astype(dtype) for a in _pairs(61, 16))
    perms = _perms(61, [5], 3)
    cs, lse = negcliploss_on(img, txt, perms, 0.05, 16, "torch-cpu", row_block=5, tile_bytes=4 * 5 * 3,
                             resident=resident)
    want = ncl_reference(img, txt, perms, 16, 0.05)
    np.testing.assert_allclose(cs - lse * (0.05 / 2 / 3), want, rtol=0, atol=2e-5)
    whole = negcliploss_scores(img, txt, temperature=0.05, batch_size=16, average_num=3, seed=5, device="torch-cpu")
    np.testing.assert_allclose(whole, want, rtol=0, atol=2e-5)


def test_device_underflowing_columns_recomputed_exactly(monkeypatch) -> None:
    pytest.importorskip("torch")
    from varalign import backend

    calls = []
    real = backend._tile_columns

    def spy(torch, e, rmax, tc, logits, tile_bytes, acc):
        calls.append(int((torch.exp(rmax - rmax.max()) @ e < backend._TINY).sum()))
        return real(torch, e, rmax, tc, logits, tile_bytes, acc)

    monkeypatch.setattr(backend, "_tile_columns", spy)
    img, txt = _pairs(40, 8, scale=3.0, seed=1)
    got = negcliploss_scores(img, txt, temperature=0.01, batch_size=40, average_num=1, row_block=6, device="torch-cpu")
    want = ncl_reference(img, txt, [np.arange(40)], 40, 0.01)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
    assert sum(calls) > 0  # the exact recomputation ran


@pytest.mark.parametrize("restrict", [False, True])
def test_shard_on_a_device_matches_reference_and_cpu(pool, restrict) -> None:
    pytest.importorskip("torch")
    for shard in discover_shards(pool, need_npz=True):  # 70, 45 and 33 rows: batches of 16 end short
        rows = np.arange(shard.num_rows, dtype=np.int64)
        if restrict:
            rows = rows[(rows % 3 != 1)]
        kw = dict(temperature=0.02, batch_size=16, average_num=3, seed=9, block_rows=10)
        got = negcliploss_shard(shard, rows, device="torch-cpu", **kw)
        img, txt = _shard_arrays(shard)
        want = ncl_reference(img[rows], txt[rows], _perms(len(rows), [9, zlib.crc32(shard.name.encode())], 3), 16,
                             0.02)
        np.testing.assert_allclose(got, want, atol=2e-5)
        np.testing.assert_allclose(got, negcliploss_shard(shard, rows, **kw), atol=2e-6)
