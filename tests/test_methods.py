"""Every `--name` of the DataComp and negCLIPLoss baselines, end to end through `filter_pool`,
against the rule/score functions applied to the whole pool (brute force)."""

import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from reference_impl import load_pool, top_k

from varalign import filter_pool
from varalign.cli import main
from varalign.scores import textrules as tr
from varalign.scores.negcliploss import negcliploss_scores
from varalign.scores.normsim import normsim_scores
from varalign.uids import hex_to_uids, sort_uids


def _pool_table(root):
    tables = [pq.read_table(p) for p in sorted((root / "pool").glob("*.parquet"))]
    cols = ["uid", "text", "original_width", "original_height", "clip_b32_similarity_score",
            "clip_l14_similarity_score"]
    return {c: np.concatenate([t.column(c).to_numpy(zero_copy_only=False) for t in tables]) for c in cols}


def _uids(uids, mask):
    return sort_uids(hex_to_uids(list(np.asarray(uids)[mask])))


@pytest.fixture(scope="module")
def pool(synth_pool):
    return synth_pool, _pool_table(synth_pool)


def test_basic_filter(pool, tmp_path) -> None:
    root, t = pool
    res = filter_pool(root / "pool", tmp_path / "b.npy", "basic_filter", quiet=True)
    want = tr.basic_filter_rule(list(t["text"]), t["original_width"], t["original_height"])
    assert 0 < want.sum() < len(want)
    assert np.array_equal(res.uids, _uids(t["uid"], want))


def test_text_based(pool, tmp_path) -> None:
    root, t = pool
    res = filter_pool(root / "pool", tmp_path / "t.npy", "text_based", quiet=True)
    want = tr.text_based_rule(list(t["text"]))
    assert 0 < want.sum() < len(want)
    assert np.array_equal(res.uids, _uids(t["uid"], want))


def test_laion2b(pool, tmp_path, capsys) -> None:
    root, t = pool
    res = filter_pool(root / "pool", tmp_path / "l.npy", "laion2b", quiet=True)
    want = tr.gcld3_english(list(t["text"])) & (t["clip_b32_similarity_score"] >= np.float32(0.28))
    assert np.array_equal(res.uids, _uids(t["uid"], want))
    code = main(["filter", "--name", "laion2b", "--arch", "b32", "--metadata_dir", str(root / "pool"),
                 "--save_path", str(tmp_path / "x.npy")])
    assert code == 1 and "laion2b does not take" in capsys.readouterr().err


def _fake_datacomp_cache(tmp_path, rng, centroids):
    """DataComp's cache layout: {scale}_centroids.pt and in1k_clip_vit_l14_{0..4}.pt (our own, so the
    sha256 differs: a warning, not an error)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save(torch.from_numpy(centroids), cache / "small_centroids.pt")
    feats = []
    for i in range(5):
        f = rng.standard_normal((40, 768)).astype(np.float32)
        f /= np.linalg.norm(f, axis=1, keepdims=True)
        torch.save({"image_features": torch.from_numpy(f)}, cache / f"in1k_clip_vit_l14_{i}.pt")
        feats.append(f)
    return cache, np.concatenate(feats)


def test_image_based_and_intersection_with_clip_score(pool, tmp_path) -> None:
    root, t = pool
    uids, scores, feats = load_pool(root / "pool")
    rng = np.random.default_rng(0)
    centroids = feats[rng.choice(len(feats), 64, replace=False)] * rng.uniform(0.5, 2.0, (64, 1)).astype(np.float32)
    cache, in1k = _fake_datacomp_cache(tmp_path, rng, centroids)
    allowed = np.zeros(64, bool)
    allowed[np.argmax(in1k.astype(np.float64) @ centroids.T.astype(np.float64), axis=1)] = True
    caption = tr.image_based_caption_rule(list(t["text"]))
    label = np.argmax(feats.astype(np.float64) @ centroids.T.astype(np.float64), axis=1)
    want = caption & allowed[label]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # our cache files are not DataComp's: sha256 warnings
        res = filter_pool(root / "pool", tmp_path / "i.npy", "image_based", image_based_scale="small",
                          cache_path=str(cache), quiet=True)
        both = filter_pool(root / "pool", tmp_path / "ic.npy", "image_based_intersect_clip_score", arch="l14",
                           fraction=0.3, image_based_scale="small", cache_path=str(cache), quiet=True)
    assert 0 < want.sum() < len(want)
    assert np.array_equal(res.uids, _uids(uids, want))
    thr = -np.sort(-scores)[int(len(scores) * 0.3)]
    assert np.array_equal(both.uids, _uids(uids, want & (scores >= thr)))


def test_image_based_missing_asset_names_file(pool, tmp_path, capsys) -> None:
    root, _ = pool
    code = main(["filter", "--name", "image_based", "--image_based_scale", "small", "--cache_path",
                 str(tmp_path / "empty"), "--metadata_dir", str(root / "pool"), "--save_path", str(tmp_path / "o.npy")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "small_centroids.pt" in err and "download" in err


def _shards(root):
    out = []
    for parquet in sorted((root / "pool").glob("*.parquet")):
        with np.load(parquet.with_suffix(".npz")) as z:
            out.append((parquet.stem, z["l14_img"], z["l14_txt"]))
    return out


def test_negcliploss_and_normsim(pool, tmp_path) -> None:
    """cs_new: negCLIPLoss top 30% of the pool (per-shard batches), then NormSim∞ top 20%."""
    import zlib

    root, t = pool
    uids = t["uid"]
    ncl = np.concatenate([negcliploss_scores(img, txt, batch_size=256, average_num=3,
                                             seed=(0, zlib.crc32(name.encode())))
                          for name, img, txt in _shards(root)])
    res = filter_pool(root / "pool", tmp_path / "n.npy", "negcliploss", arch="l14", fraction=0.3, batch_size=256,
                      average_num=3, quiet=True)
    assert np.array_equal(res.uids, _uids(uids, np.isin(np.arange(len(uids)), top_k(ncl, 900))))

    target = np.random.default_rng(1).standard_normal((300, 768)).astype(np.float32)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    (tmp_path / "proxy").mkdir()
    np.save(tmp_path / "proxy" / "task_a.npy", target[:100])
    np.save(tmp_path / "proxy" / "task_b.npy", target[100:])
    both = filter_pool(root / "pool", tmp_path / "nn.npy", "cs_new", arch="l14", fraction=0.3, fraction_vas=0.2,
                       batch_size=256, average_num=3, proxy_path=str(tmp_path / "proxy"), quiet=True)
    stage1 = top_k(ncl, 900)
    feats = np.concatenate([img for _, img, _ in _shards(root)])
    ns = normsim_scores(feats[stage1], target, "inf")
    assert np.array_equal(both.uids, _uids(uids, np.isin(np.arange(len(uids)), stage1[top_k(ns, 600)])))
    assert both.counts == {"pool": 3000, "negcliploss": 900, "normsim": 600, "selected": 600}


def test_negcliploss_is_seeded(pool, tmp_path) -> None:
    root, _ = pool
    kw = dict(arch="l14", fraction=0.3, batch_size=128, average_num=1, quiet=True)
    a = filter_pool(root / "pool", None, "negcliploss", seed=1, **kw)
    b = filter_pool(root / "pool", None, "negcliploss", seed=1, num_workers=1, **kw)
    c = filter_pool(root / "pool", None, "negcliploss", seed=2, **kw)
    assert np.array_equal(a.uids, b.uids) and not np.array_equal(a.uids, c.uids)


def test_centroids_command_then_image_based(pool, tmp_path, capsys) -> None:
    """`varalign centroids` output feeds `--centroid_path` (ImageNet features from the cache)."""
    root, t = pool
    out = tmp_path / "c.npy"
    assert main(["centroids", "--metadata_dir", str(root / "pool"), "--save_path", str(out), "-k", "16",
                 "--niter", "5"]) == 0
    assert "16 centroids × 768" in capsys.readouterr().out
    cache, _ = _fake_datacomp_cache(tmp_path, np.random.default_rng(5), np.load(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = filter_pool(root / "pool", tmp_path / "i.npy", recipe="image_based_clip_score_l14_30",
                          centroid_path=str(out), cache_path=str(cache), quiet=True)
    assert 0 < res.counts["image_based"] <= res.counts["clip_score"]
