"""Out-of-core engine: per-shard selection equals selection on concatenated arrays, and `filter_pool`
writes byte-identical outputs to the in-memory engine (tests/inmemory_filter.py) on many-shard pools."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import inmemory_filter
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from varalign import filter_pool
from varalign.errors import VaralignError
from varalign.select import threshold_at_rank, threshold_at_rank_parts, top_k_mask, top_k_parts
from varalign.synth import make_pool, make_target
from varalign.uids import UID_DTYPE, first_shared, merge_runs, save_run, save_subset, sort_uids, stream_subset


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


@pytest.mark.parametrize("kind", range(4))
def test_top_k_and_threshold_over_parts_match_concatenated(kind: int) -> None:
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


# -- filter_pool vs the in-memory engine ----------------------------------------------------------------
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
    from varalign.uids import hex_to_uids  # noqa: PLC0415

    given = [u for p in sorted((root / "pool").glob("*.parquet"))[8:] for u in pq.read_table(p).column("uid")
             .to_pylist()[::3]] + uids[:50]  # shards 0-2 and 4-7 contribute nothing
    save_subset(root / "given.npy", hex_to_uids(given))
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


@pytest.mark.parametrize("case", list(CASES))
def test_same_outputs_as_in_memory_engine(many_shards: Path, tmp_path: Path, monkeypatch, case: str) -> None:
    import varalign.uids  # noqa: PLC0415

    monkeypatch.setattr(varalign.uids, "MERGE_BUDGET", 97)  # many merge steps over the 40 runs
    name, opts = _options(many_shards, tmp_path, case)
    pool = many_shards / "pool"
    old = inmemory_filter.filter_pool(pool, tmp_path / "old.npy", name, quiet=True,
                                      save_scores=str(tmp_path / "old.parquet"), **opts)
    new = filter_pool(pool, tmp_path / "new.npy", name, quiet=True, save_scores=str(tmp_path / "new.parquet"),
                      **opts)
    assert (tmp_path / "new.npy").read_bytes() == (tmp_path / "old.npy").read_bytes()
    assert np.array_equal(new.uids, old.uids) and new.counts == old.counts and new.thresholds == old.thresholds
    a, b = pq.read_table(tmp_path / "old.parquet"), pq.read_table(tmp_path / "new.parquet")
    assert a.schema.equals(b.schema) and a.equals(b)
    assert pq.ParquetFile(tmp_path / "new.parquet").num_row_groups == 40
    manifest = json.loads((tmp_path / "new.manifest.json").read_text())
    assert manifest["output"]["uids"] == len(old.uids) and manifest["counts"] == old.counts
    assert not (tmp_path / ".new.varalign-work").exists()


@pytest.mark.parametrize("case", ["clip_fraction", "vas_d", "union"])
def test_without_save_path_uses_a_temporary_work_dir(many_shards: Path, tmp_path: Path, monkeypatch,
                                                     case: str) -> None:
    name, opts = _options(many_shards, tmp_path, case)
    old = inmemory_filter.filter_pool(many_shards / "pool", None, name, quiet=True, **opts)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    new = filter_pool(many_shards / "pool", None, name, quiet=True, **opts)
    assert np.array_equal(new.uids, old.uids) and new.counts == old.counts
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
    errors = []
    for engine in (inmemory_filter.filter_pool, filter_pool):
        with pytest.raises(VaralignError) as info:
            engine(pool, tmp_path / "o.npy", "clip_score", arch="l14", fraction=0.3, quiet=True)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "00000033.parquet" in errors[1] and len(errors[1].splitlines()) == 1
