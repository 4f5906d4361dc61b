"""Out-of-core engine: per-shard selection equals selection on concatenated arrays, and `filter_pool`'s
outputs on many-shard pools equal brute-force expectations built from tests/reference_impl.py."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import reference_impl as ref

from varalign import filter_pool
from varalign.atomic import manifest_path
from varalign.errors import VaralignError
from varalign.select import threshold_at_rank, threshold_at_rank_parts, top_k_mask, top_k_parts
from varalign.synth import make_pool, make_target
from varalign.uids import (
    UID_DTYPE,
    first_shared,
    hex_to_uids,
    merge_runs,
    save_run,
    save_subset,
    sort_uids,
    stream_subset,
)


# -- exact k-th value over parts ------------------------------------------------------------------------
def _random_parts(rng: np.random.Generator, kind: int) -> list[np.ndarray]:
    parts = []
    for _ in range(int(rng.integers(1, 9))):
        m = int(rng.integers(0, 80))
        if kind == 0:  # few distinct values: many ties
            v = rng.integers(-4, 4, m).astype(np.float32) / 4
        elif kind == 1:  # float16-valued scores, negative ones too
            v = rng.normal(0.0, 0.1, m).astype(np.float16).astype(np.float32)
        elif kind == 2:  # tiny and subnormal magnitudes
            v = rng.normal(0.0, 1e-40, m).astype(np.float32)
        else:
            v = rng.choice(np.array([-np.inf, np.inf, 0.0, -0.0, 1.5, -1.5], dtype=np.float32), m)
        parts.append(v)
    return parts


@pytest.mark.parametrize("batch", [1 << 18, 37])  # the default, and small parts' digits counted in batches
@pytest.mark.parametrize("kind", range(4))
def test_top_k_and_threshold_over_parts_match_concatenated(kind: int, batch: int, monkeypatch) -> None:
    monkeypatch.setattr("varalign.select._BATCH", batch)
    rng = np.random.default_rng(kind)
    for _ in range(30):
        parts = _random_parts(rng, kind)
        whole = np.concatenate(parts)
        edges = [0, 1, 2, len(whole) - 1, len(whole), len(whole) + 1]
        again = parts.copy  # each call: a fresh iterable over the same parts
        for k in sorted(set(edges + rng.integers(0, len(whole) + 1, 6).tolist()) - {-1}):
            got = np.concatenate(list(top_k_parts(again, k)))
            assert np.array_equal(got, top_k_mask(whole, k))
            assert threshold_at_rank_parts(again, k) == threshold_at_rank(whole, k)


def test_float64_parts() -> None:
    rng = np.random.default_rng(7)
    parts = [rng.integers(-3, 3, 50).astype(np.float64) * 1e-9 + 1.0 for _ in range(5)]
    whole = np.concatenate(parts)
    for k in (1, 17, 120, 249):
        assert np.array_equal(np.concatenate(list(top_k_parts(lambda: iter(parts), k))), top_k_mask(whole, k))


# -- merging sorted runs --------------------------------------------------------------------------------
def test_merge_runs_streams_the_sorted_union_and_finds_shared_uids(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    runs = []
    for _ in range(25):
        u = np.empty(int(rng.integers(0, 120)), dtype=UID_DTYPE)
        u["f0"] = rng.integers(0, 4, len(u))  # many equal high words
        u["f1"] = rng.integers(0, 2**63, len(u), dtype=np.uint64)
        runs.append(sort_uids(u))
    paths = [str(tmp_path / f"{i}.run") for i in range(len(runs))]
    for p, u in zip(paths, runs, strict=True):
        save_run(p, u)
    lengths = [len(u) for u in runs]
    expected = sort_uids(np.concatenate(runs))
    for budget in (60, 300, 10_000):
        got = np.concatenate([b for b, _ in merge_runs(paths, lengths, budget)])
        assert np.array_equal(got, expected)
        stream_subset(tmp_path / "s.npy", len(expected), (b for b, _ in merge_runs(paths, lengths, budget)))
        save_subset(tmp_path / "ref.npy", expected)
        assert (tmp_path / "s.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
        assert first_shared(merge_runs(paths, lengths, budget)) is None
    dup = runs[20][len(runs[20]) // 2]
    for i in (4, 11):
        runs[i] = sort_uids(np.concatenate([runs[i], [dup]]))
        save_run(paths[i], runs[i])
    lengths = [len(u) for u in runs]
    assert first_shared(merge_runs(paths, lengths, 7)) == 20  # the latest run holding the uid


# -- filter_pool vs brute force (tests/reference_impl.py) ----------------------------------------------
@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 shards x 200 rows; CLIP scores rounded to 0.01 and shifted (many ties, negative values)."""
    root = tmp_path_factory.mktemp("bounded")
    make_pool(root / "pool", num_samples=8000, num_shards=40, seed=5)
    for path in sorted((root / "pool").glob("*.parquet")):
        table = pq.read_table(path)
        for col in ("clip_l14_similarity_score", "clip_b32_similarity_score"):
            rounded = np.round(table.column(col).to_numpy().astype(np.float32) - 0.25, 2).astype(np.float32)
            table = table.set_column(table.schema.get_field_index(col), col, pa.array(rounded))
        pq.write_table(table, path)
    make_target(root / "target.npy", seed=5, n=2000)
    uids = pq.read_table(root / "pool" / "00000003.parquet").column("uid").to_pylist()
    given = [u for p in sorted((root / "pool").glob("*.parquet"))[8:] for u in pq.read_table(p).column("uid")
             .to_pylist()[::3]] + uids[:50]  # shards 0-2 and 4-7 contribute nothing
    save_subset(root / "given.npy", hex_to_uids(given))
    (root / "given.txt").write_text("\n".join(given))  # the same uids, as the reference reads them
    return root


_OPS = """
[[parts]]
name = "l14"
[[parts.stages]]
score = "clip_score"
arch = "l14"
fraction = 0.2
[[parts]]
name = "b32"
[[parts.stages]]
score = "clip_score"
arch = "b32"
select = "datacomp"
fraction = 0.25
"""

CASES = {
    "clip_fraction": ("clip_score", {"arch": "l14", "fraction": 0.3}),
    "clip_threshold": ("clip_score", {"arch": "l14", "threshold": 0.0}),
    "vas": ("vas", {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3}),
    "vas_given": ("vas", {"arch": "l14", "fraction": 0.1, "fraction_vas": 0.05, "given": True}),
    "clip_given": ("clip_score", {"arch": "l14", "fraction": 0.1, "given": True}),
    "vas_d": ("vas_d", {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "num_iters": 5}),
    "vas_d_lowrank": ("vas_d", {"arch": "l14", "fraction": 0.4, "fraction_vas": 0.2, "num_iters": 3,
                                "vas_d_mode": "lowrank", "vas_d_rank": 16}),
    "union": (None, {"op": "union"}),
    "intersection": (None, {"op": "intersection"}),
}


def _options(root: Path, tmp: Path, case: str) -> tuple[str | None, dict]:
    name, opts = CASES[case]
    opts = dict(opts)
    if opts.pop("given", False):
        opts["given_uids_path"] = str(root / "given.npy")
    if name == "vas":
        opts["target"] = str(root / "target.npy")
    if "op" in opts:
        op = opts.pop("op")
        (tmp / f"{op}.toml").write_text(f'name = "{op}"\nop = "{op}"\n' + _OPS)
        opts["recipe"] = str(tmp / f"{op}.toml")
    return name, opts


@dataclass
class Pool:
    """The pool as the reference sees it (restricted to given.txt for the *_given cases), in shard order."""

    uids: list[str]
    shard_rows: list[int]  # rows per shard
    l14: np.ndarray  # CLIP scores, float32
    b32: np.ndarray
    feats: np.ndarray  # L/14 image embeddings


@dataclass
class Expected:
    """What filter_pool must output: the pool, its selected rows, counts, thresholds, --save_scores columns."""

    pool: Pool
    rows: np.ndarray
    counts: dict[str, int]
    thresholds: dict[str, float]
    columns: dict[str, np.ndarray]  # after `uid`, in order; NaN in a float column: null (not scored)


def _load(root: Path, given: bool) -> Pool:
    uids, l14, feats = ref.load_pool(root / "pool", "l14")
    _, b32, _ = ref.load_pool(root / "pool", "b32")
    shard_rows = [pq.read_metadata(p).num_rows for p in sorted((root / "pool").glob("*.parquet"))]
    if not given:
        return Pool(uids, shard_rows, l14, b32, feats)
    allowed = set((root / "given.txt").read_text().split())
    keep = np.array([u in allowed for u in uids])
    shard_rows = [int(k.sum()) for k in np.split(keep, np.cumsum(shard_rows)[:-1])]
    return Pool([u for u, k in zip(uids, keep, strict=True) if k], shard_rows, l14[keep], b32[keep], feats[keep])


def _mask(rows: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[rows] = True
    return out


def _scored(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """A float32 column over the pool: `values` at `rows`, NaN (null) elsewhere."""
    out = np.full(n, np.nan, dtype=np.float32)
    out[rows] = values
    return out


def _expect(root: Path, case: str) -> Expected:
    name, opts = CASES[case]
    pool = _load(root, opts.get("given", False))
    n, s = len(pool.uids), pool.l14
    counts: dict[str, int] = {"pool": n}
    thresholds: dict[str, float] = {}
    columns: dict[str, np.ndarray] = {}
    if name == "clip_score":
        if "threshold" in opts:
            t = np.float32(opts["threshold"])
        else:
            t = ref.datacomp_threshold(s, opts["fraction"])
        rows = np.flatnonzero(s >= t)
        thresholds["clip_score"] = float(t)
        counts["clip_score"] = len(rows)
        columns |= {"clip_score": s, "kept_clip_score": _mask(rows, n)}
    elif name == "vas":
        target = np.load(root / "target.npy")
        cand = ref.top_k(s, int(n * opts["fraction"]))
        rows = ref.vas_select(s, pool.feats, target, opts["fraction"], opts["fraction_vas"])
        counts |= {"clip_score": len(cand), "vas": len(rows)}
        columns |= {"clip_score": s, "kept_clip_score": _mask(cand, n),
                    "vas": _scored(ref.vas_loop(pool.feats[cand], target), cand, n), "kept_vas": _mask(rows, n)}
    elif name == "vas_d":
        feats = pool.feats
        if opts.get("vas_d_mode") == "lowrank":
            # low-rank VAS-D is exact VAS-D on the embeddings projected onto the top-`rank` eigenvectors of
            # the CLIP-stage candidates' second moment (the first target, the pool's second moment, projects
            # to B^T S B: the same thing), so the reference loop on projected features is its brute force
            feats = ref.lowrank_features(feats, ref.top_k(s, int(n * opts["fraction"])), opts["vas_d_rank"])
        rows, removed_at, last = ref.vas_d_rounds(s, feats, opts["fraction"], opts["fraction_vas"],
                                                  opts["num_iters"])
        cand = np.flatnonzero(removed_at >= 0)
        counts |= {"clip_score": len(cand), "vas_d": len(rows)}
        columns |= {"clip_score": s, "kept_clip_score": _mask(cand, n),
                    "vas_d_removed_at": removed_at.astype(np.int32), "vas_d_score": last.astype(np.float32),
                    "kept_vas_d": _mask(rows, n)}
    else:  # the union / intersection recipe: l14 top 20% of the pool, b32 DataComp 25%
        l14 = ref.top_k(s, int(n * 0.2))
        t = ref.datacomp_threshold(pool.b32, 0.25)
        b32 = np.flatnonzero(pool.b32 >= t)
        rows = ref.combine(opts["op"], l14, b32)
        counts |= {"l14.clip_score": len(l14), "b32.clip_score": len(b32)}
        thresholds["b32.clip_score"] = float(t)
        columns |= {"l14.clip_score": s, "kept_l14.clip_score": _mask(l14, n),
                    "b32.clip_score": pool.b32, "kept_b32.clip_score": _mask(b32, n)}
    counts["selected"] = len(rows)
    columns["selected"] = _mask(rows, n)
    return Expected(pool, rows, counts, thresholds, columns)


@pytest.fixture(scope="module")
def expected(many_shards: Path):
    """case -> Expected, computed once per case."""
    cache: dict[str, Expected] = {}

    def get(case: str) -> Expected:
        if case not in cache:
            cache[case] = _expect(many_shards, case)
        return cache[case]

    return get


def _subset_bytes(tmp: Path, pool: Pool, rows: np.ndarray) -> bytes:
    save_subset(tmp / "expected.npy", hex_to_uids([pool.uids[i] for i in rows]))
    return (tmp / "expected.npy").read_bytes()


def _check_scores(path: Path, exp: Expected) -> None:
    """The --save_scores parquet: one row group per shard, every pool uid in shard order, each column."""
    meta = pq.read_metadata(path)
    assert meta.num_row_groups == 40
    assert [meta.row_group(i).num_rows for i in range(40)] == exp.pool.shard_rows
    table = pq.read_table(path)
    assert table.column_names == ["uid", *exp.columns]
    assert table.column("uid").to_pylist() == exp.pool.uids
    for name, want in exp.columns.items():
        col = table.column(name)
        assert col.type == pa.from_numpy_dtype(want.dtype), name
        if want.dtype.kind == "f":
            unscored = np.isnan(want)
            assert np.array_equal(col.is_null().to_numpy(zero_copy_only=False), unscored), name
            got = col.to_numpy(zero_copy_only=False)
            if name.endswith("clip_score"):  # read from the parquet: exactly
                assert np.array_equal(got, want), name
            else:  # computed in float32 from float16 embeddings; the reference uses float64
                np.testing.assert_allclose(got[~unscored], want[~unscored], rtol=1e-5, err_msg=name)
        else:
            assert col.null_count == 0 and np.array_equal(col.to_numpy(zero_copy_only=False), want), name


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_match_brute_force(many_shards: Path, expected, tmp_path: Path, monkeypatch, case: str) -> None:
    import varalign.engine.run  # noqa: PLC0415
    import varalign.uids  # noqa: PLC0415

    monkeypatch.setattr(varalign.uids, "MERGE_BUDGET", 97)  # many merge steps over the 40 runs
    monkeypatch.setattr(varalign.engine.run, "SPAN_ROWS", 450)  # spans of two shards (more with --given_uids_path)
    name, opts = _options(many_shards, tmp_path, case)
    exp = expected(case)
    res = filter_pool(many_shards / "pool", tmp_path / "new.npy", name, quiet=True,
                      save_scores=str(tmp_path / "new.parquet"), **opts)
    assert (tmp_path / "new.npy").read_bytes() == _subset_bytes(tmp_path, exp.pool, exp.rows)
    assert res.uids.dtype == UID_DTYPE and np.array_equal(res.uids, np.load(tmp_path / "expected.npy"))
    assert res.counts == exp.counts and res.thresholds == exp.thresholds
    _check_scores(tmp_path / "new.parquet", exp)
    manifest = json.loads((tmp_path / "new.manifest.json").read_text())
    assert manifest["output"]["uids"] == len(exp.rows) and manifest["counts"] == exp.counts
    assert not (tmp_path / ".new.varalign-work").exists()


def test_vas_d_lowrank_is_the_same_for_any_worker_count_and_close_to_exact(many_shards: Path, expected,
                                                                           tmp_path: Path) -> None:
    name, opts = _options(many_shards, tmp_path, "vas_d_lowrank")
    outs = []
    for workers in (1, 2):
        res = filter_pool(many_shards / "pool", tmp_path / f"w{workers}.npy", name, quiet=True, num_workers=workers,
                          save_scores=str(tmp_path / f"w{workers}.parquet"), **opts)
        assert len(res.uids) == int(8000 * opts["fraction_vas"]) == res.counts["selected"]
        outs.append(((tmp_path / f"w{workers}.npy").read_bytes(), pq.read_table(tmp_path / f"w{workers}.parquet")))
    assert outs[0][0] == outs[1][0] and outs[0][1].equals(outs[1][1])  # subset and every score, bit for bit
    timing = json.loads(manifest_path(tmp_path / "w1.npy").read_text())["stages"]["vas_d"]["timing"]
    assert timing["project_s"] > 0 and timing["rounds_run"] == opts["num_iters"]  # the projection is timed too
    pool = expected("vas_d_lowrank").pool
    exact = ref.vas_d_select(pool.l14, pool.feats, opts["fraction"], opts["fraction_vas"], opts["num_iters"])
    low = {tuple(u) for u in np.load(tmp_path / "w1.npy").tolist()}
    ref_uids = {tuple(u) for u in sort_uids(hex_to_uids([pool.uids[i] for i in exact])).tolist()}
    assert len(low & ref_uids) / len(low | ref_uids) >= 0.9


def test_datacomp_fraction_at_tie_edges(many_shards: Path, expected, tmp_path: Path) -> None:
    """The rounded scores tie in large groups, so the cases above cannot tell DataComp's threshold (the
    (floor(N*f)+1)-th largest score) from its neighbours. The two top B/32 scores tie and the third is
    lower: at floor(N*f) = 1 the next rank's value differs, at 2 the previous rank's does. One run, two parts."""
    b32 = expected("union").pool.b32
    ranked = -np.sort(-b32)
    assert ranked[1] != ranked[2]  # so both an off-by-one up (k=1) and down (k=2) change the threshold
    parts = "".join(f'[[parts]]\nname = "k{k}"\n[[parts.stages]]\nscore = "clip_score"\narch = "b32"\n'
                    f'select = "datacomp"\nfraction = {(k + 0.5) / 8000}\n' for k in (1, 2))
    (tmp_path / "edges.toml").write_text('name = "edges"\nop = "intersection"\n' + parts)
    res = filter_pool(many_shards / "pool", tmp_path / "e.npy", recipe=str(tmp_path / "edges.toml"), quiet=True)
    kept = {k: np.flatnonzero(b32 >= ref.datacomp_threshold(b32, (k + 0.5) / 8000)) for k in (1, 2)}
    assert res.thresholds == {f"k{k}.clip_score": float(ranked[k]) for k in (1, 2)}
    assert res.counts == {"pool": 8000, "k1.clip_score": len(kept[1]), "k2.clip_score": len(kept[2]),
                          "selected": len(kept[1])}
    assert len(kept[1]) < len(kept[2])
    pool = expected("union").pool
    assert (tmp_path / "e.npy").read_bytes() == _subset_bytes(tmp_path, pool, ref.combine("intersection", *kept.values()))


@pytest.mark.parametrize("case", ["clip_fraction", "vas_d", "union"])
def test_without_save_path_uses_a_temporary_work_dir(many_shards: Path, expected, tmp_path: Path, monkeypatch,
                                                     case: str) -> None:
    name, opts = _options(many_shards, tmp_path, case)
    exp = expected(case)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    res = filter_pool(many_shards / "pool", None, name, quiet=True, **opts)
    assert res.save_path is None and res.counts == exp.counts
    assert np.array_equal(res.uids, sort_uids(hex_to_uids([exp.pool.uids[i] for i in exp.rows])))
    assert list(scratch.iterdir()) == []  # removed at the end


def test_duplicate_across_shards_names_the_later_shard(many_shards: Path, tmp_path: Path) -> None:
    import shutil  # noqa: PLC0415

    pool = tmp_path / "pool"
    shutil.copytree(many_shards / "pool", pool)
    donor = pq.read_table(pool / "00000007.parquet").column("uid").to_pylist()
    for shard in ("00000021", "00000033"):
        table = pq.read_table(pool / f"{shard}.parquet")
        uids = table.column("uid").to_pylist()
        uids[17] = donor[5]
        pq.write_table(table.set_column(0, "uid", pa.array(uids)), pool / f"{shard}.parquet")
    with pytest.raises(VaralignError) as info:
        filter_pool(pool, tmp_path / "o.npy", "clip_score", arch="l14", fraction=0.3, quiet=True)
    error = str(info.value)
    assert "00000033.parquet" in error and "00000021.parquet" not in error and "duplicate uid" in error
    assert len(error.splitlines()) == 1
    assert not (tmp_path / "o.npy").exists()
