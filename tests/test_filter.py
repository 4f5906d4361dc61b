"""End to end: `filter_pool` against slow brute-force versions of the reference algorithms."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from reference_impl import load_pool, top_k, vas_d_select, vas_loop, vas_select

from varalign import filter_pool, load_subset, vas_scores
from varalign.cli import main
from varalign.scores.vas_d import CandidateStore, vas_d_iterate, write_rows
from varalign.select import top_k_mask
from varalign.uids import UID_DTYPE, hex_to_uids, save_subset, sort_uids


def _uid_set(uids: list[str], rows: np.ndarray) -> np.ndarray:
    return sort_uids(hex_to_uids([uids[i] for i in rows]))


@pytest.fixture(scope="module")
def pool(synth_pool):
    uids, scores, feats = load_pool(synth_pool / "pool")
    target = np.load(synth_pool / "files" / "variance" / "variance_imagenet_1k.npy")
    return synth_pool, uids, scores, feats, target


def test_no_filter_keeps_every_uid(pool, tmp_path) -> None:
    root, uids, *_ = pool
    res = filter_pool(root / "pool", tmp_path / "all.npy", "no_filter", quiet=True)
    assert np.array_equal(np.load(tmp_path / "all.npy"), _uid_set(uids, np.arange(len(uids))))
    assert res.counts == {"pool": 3000, "selected": 3000}


@pytest.mark.parametrize("fraction", [0.3, 0.29, 1.0])
def test_clip_score_fraction_matches_datacomp(pool, tmp_path, fraction) -> None:
    root, uids, scores, *_ = pool
    filter_pool(root / "pool", tmp_path / "cs.npy", "clip_score", arch="l14", fraction=fraction, quiet=True)
    n = len(scores)
    t = -np.sort(-scores)[min(int(n * fraction), n - 1)]
    expected = _uid_set(uids, np.flatnonzero(scores >= t))
    assert np.array_equal(np.load(tmp_path / "cs.npy"), expected)


def test_clip_score_threshold_b32(synth_pool, tmp_path) -> None:
    uids, scores, _ = load_pool(synth_pool / "pool", "b32")
    filter_pool(synth_pool / "pool", tmp_path / "b.npy", "clip_score", arch="b32", threshold=0.3, quiet=True)
    assert np.array_equal(np.load(tmp_path / "b.npy"), _uid_set(uids, np.flatnonzero(scores >= np.float32(0.3))))


def test_vas_scores_match_row_loop(pool) -> None:
    *_, feats, target = pool
    fast = vas_scores(feats[:500].astype(np.float16), target)
    np.testing.assert_allclose(fast, vas_loop(feats[:500], target), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("workers", [1, 2])
def test_vas_matches_reference(pool, tmp_path, workers) -> None:
    root, uids, scores, feats, target = pool
    res = filter_pool(root / "pool", tmp_path / "vas.npy", "vas", arch="l14", fraction=0.45, fraction_vas=0.3,
                      target_variance_name="imagenet_1k", files_path=str(root / "files"), num_workers=workers,
                      quiet=True, save_scores=str(tmp_path / "scores.parquet"))
    expected = vas_select(scores, feats, target, 0.45, 0.3)
    assert np.array_equal(np.load(tmp_path / "vas.npy"), _uid_set(uids, expected))
    assert res.counts == {"pool": 3000, "clip_score": 1350, "vas": 900, "selected": 900}
    table = pq.read_table(tmp_path / "scores.parquet").to_pydict()
    assert table["uid"] == uids
    vas = np.array(table["vas"], dtype=np.float64)
    stage = np.array(table["kept_clip_score"])
    assert stage.sum() == 1350 and np.isnan(vas[~stage]).all()
    np.testing.assert_allclose(vas[stage], vas_loop(feats[stage], target), rtol=2e-5)
    assert np.array(table["selected"]).sum() == 900


def test_vas_threshold_variants(pool, tmp_path) -> None:
    root, uids, scores, feats, target = pool
    t_vas = float(np.median(vas_loop(feats, target)))
    filter_pool(root / "pool", tmp_path / "v.npy", "vas", arch="l14", threshold=0.25, threshold_vas=t_vas,
                target=str(root / "files" / "variance" / "variance_imagenet_1k.npy"), quiet=True)
    cand = np.flatnonzero(scores >= np.float32(0.25))
    vas = vas_scores(feats[cand], target)
    expected = cand[vas >= np.float32(t_vas)]
    assert np.array_equal(np.load(tmp_path / "v.npy"), _uid_set(uids, expected))


@pytest.mark.parametrize("num_iters", [1, 4, 7])
def test_vas_d_matches_plain_loop(pool, tmp_path, num_iters) -> None:
    root, uids, scores, feats, _ = pool
    res = filter_pool(root / "pool", tmp_path / "d.npy", "vas_d", arch="l14", fraction=0.45, fraction_vas=0.3,
                      num_iters=num_iters, quiet=True, save_scores=str(tmp_path / "d.parquet"))
    expected = vas_d_select(scores, feats, 0.45, 0.3, num_iters)
    assert np.array_equal(np.load(tmp_path / "d.npy"), _uid_set(uids, expected))
    removed_at = np.array(pq.read_table(tmp_path / "d.parquet").column("vas_d_removed_at"))
    assert (removed_at == num_iters).sum() == res.counts["selected"] == 900
    assert (removed_at == -1).sum() == 3000 - 1350
    assert np.array_equal(np.flatnonzero(removed_at == num_iters), expected)


def test_vas_d_overshooting_chunks_does_not_crash() -> None:
    """ceil() chunks can overshoot before the last iteration; the reference crashes, we stop at target."""
    rng = np.random.default_rng(3)
    f = rng.standard_normal((10, 16)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    gram = f.T.astype(np.float64) @ f
    res = vas_d_iterate(CandidateStore.from_array(f), gram, (gram / 10).astype(np.float32), 6, 3)
    assert res.chunk == 2 and res.keep.sum() == 6  # 10 -> 8 -> 6 -> 6 (reference: topk(6) of 4 rows)


@pytest.mark.parametrize("resident", [True, False])
def test_vas_d_on_a_torch_device_matches_numpy(tmp_path, resident: bool) -> None:
    """VAS-D rounds on a torch device (what --device cuda runs), with the candidates resident in the
    device's memory or streamed from the on-disk store every round, equal the numpy rounds, and a
    run resumed from a mid-way checkpoint on the device ends the same."""
    pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    f = rng.standard_normal((3000, 32)).astype(np.float16)
    f /= np.linalg.norm(f.astype(np.float32), axis=1, keepdims=True).astype(np.float16)
    store = CandidateStore.create(str(tmp_path / "cand.bin"), len(f), 32, np.dtype(np.float16))
    write_rows(store.path, 0, f)
    f32 = f.astype(np.float32)
    gram = f32.T.astype(np.float64) @ f32
    first = (gram / len(f)).astype(np.float32)
    cpu = vas_d_iterate(store, gram, first, 1000, 6, block_rows=512)
    saved = {}

    def checkpoint(state):
        if int(state["it"]) == 3:
            saved.update({k: np.copy(v) for k, v in state.items()})

    state_dir = tmp_path / "rounds"
    state_dir.mkdir()
    # flush_s=0: resident round state is written (and a checkpoint taken) after every round
    dev = vas_d_iterate(store, gram, first, 1000, 6, block_rows=512, device="torch-cpu", resident=resident,
                        checkpoint=checkpoint, state_dir=str(state_dir), flush_s=0)
    assert np.array_equal(cpu.keep, dev.keep) and np.array_equal(cpu.removed_at, dev.removed_at)
    np.testing.assert_allclose(dev.last_score, cpu.last_score, rtol=1e-5)
    # the round-3 checkpoint resumed over the state files as the finished run left them (a round reads
    # `removed_at >= it` as alive, so files newer than the checkpoint are consistent with it)
    resumed = vas_d_iterate(store, gram, first, 1000, 6, block_rows=512, device="torch-cpu", resident=resident,
                            state=saved, state_dir=str(state_dir))
    assert np.array_equal(resumed.keep, cpu.keep) and np.array_equal(resumed.removed_at, cpu.removed_at)
    # what the rounds report: rounds run, candidates scored over them (3000, 2666, ..., 1334: chunk 334),
    # residency; the resumed run counts only its own rounds
    assert dev.timing["rounds_run"] == 6 and dev.timing["resident"] is resident
    assert dev.timing["candidate_rounds"] == sum(3000 - 334 * i for i in range(6)) == cpu.timing["candidate_rounds"]
    assert resumed.timing["rounds_run"] == 3 and resumed.timing["candidate_rounds"] == sum(3000 - 334 * i
                                                                                           for i in range(3, 6))
    assert cpu.timing["resident"] is False and cpu.timing["rounds_s"] > 0


def _candidates(seed: int, rows: int, dim: int) -> tuple[CandidateStore, np.ndarray, np.ndarray]:
    """Random float16 candidates in memory, their Gram (float64) and the first target (their mean outer product)."""
    f = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float16)
    f32 = f.astype(np.float32)
    gram = f32.T.astype(np.float64) @ f32
    return CandidateStore.from_array(f), gram, (gram / rows).astype(np.float32)


def test_vas_d_resident_state_is_written_every_flush_s(tmp_path) -> None:
    """With the candidates resident, the round state stays on the device: by default (flush every 30 s) a short
    run writes the state files and checkpoints once, after the last round, while `on_round` sees every round;
    the subset equals the numpy rounds' with state blocks smaller than the pool (several per round)."""
    pytest.importorskip("torch")
    store, gram, first = _candidates(5, 2500, 16)
    cpu = vas_d_iterate(store, gram, first, 900, 5, block_rows=256, state_rows=512)
    saved: list[int] = []
    seen: list[int] = []
    dev = vas_d_iterate(store, gram, first, 900, 5, block_rows=256, state_rows=512, device="torch-cpu",
                        resident=True, checkpoint=lambda st: saved.append(int(st["it"])), on_round=seen.append)
    assert saved == [5] and seen == [0, 1, 2, 3, 4]
    assert np.array_equal(dev.removed_at, cpu.removed_at) and dev.keep.sum() == 900
    np.testing.assert_allclose(dev.last_score, cpu.last_score, rtol=1e-5)

    # a run stopped after round 2, within the flush interval, left no checkpoint: its rounds are lost and a new
    # run starts over, ending the same
    class Stop(Exception):
        pass

    def stop_at_2(it: int) -> None:
        if it == 2:
            raise Stop

    state_dir = tmp_path / "rounds"
    state_dir.mkdir()
    saved.clear()
    with pytest.raises(Stop):
        vas_d_iterate(store, gram, first, 900, 5, block_rows=256, state_rows=512, device="torch-cpu", resident=True,
                      checkpoint=lambda st: saved.append(int(st["it"])), on_round=stop_at_2, state_dir=str(state_dir))
    assert saved == []
    again = vas_d_iterate(store, gram, first, 900, 5, block_rows=256, state_rows=512, device="torch-cpu",
                          resident=True, state=None, state_dir=str(state_dir))
    assert np.array_equal(again.removed_at, cpu.removed_at)


def test_vas_d_resident_targets_equal_the_streamed_rounds(tmp_path) -> None:
    """Resident on a device, the rounds subtract the removed rows' Grams in the streamed rounds' blocks and
    order on that device: every round's Gram of the kept rows is bit for bit the streamed one, whatever the
    state block size."""
    pytest.importorskip("torch")
    store, gram, first = _candidates(9, 6000, 24)
    runs = {}
    for label, resident, state_rows in (("streamed", False, 1024), ("resident", True, 1024),
                                        ("resident, one state block", True, 8192)):
        grams: list[np.ndarray] = []
        res = vas_d_iterate(store, gram, first, 2000, 6, block_rows=256, state_rows=state_rows, device="torch-cpu",
                            resident=resident, flush_s=0, checkpoint=lambda st, g=grams: g.append(st["gram_keep"]))
        runs[label] = (res.removed_at, grams)
    removed, grams = runs["streamed"]
    assert len(grams) == 6
    for label in ("resident", "resident, one state block"):
        assert np.array_equal(runs[label][0], removed), label
        assert all(np.array_equal(a, b) for a, b in zip(runs[label][1], grams, strict=True)), label


@pytest.mark.parametrize("device, resident", [("cpu", None), ("torch-cpu", True)])
def test_vas_d_resume_undoes_removals_written_after_the_checkpoint(tmp_path, device, resident) -> None:
    """State files that hold removals of rounds after the checkpoint (a run killed between its writes and its
    checkpoint; rerun elsewhere, a float tie may go the other way) are rewound to the checkpoint's round: the
    resumed run ends as an uninterrupted one, not with candidates that a later round of another run removed."""
    if device != "cpu":
        pytest.importorskip("torch")
    store, gram, first = _candidates(4, 3000, 16)
    saved = {}

    def checkpoint(state):
        if int(state["it"]) == 2:
            saved.update({k: np.copy(v) for k, v in state.items()})

    state_dir = tmp_path / "rounds"
    state_dir.mkdir()
    whole = vas_d_iterate(store, gram, first, 1000, 6, block_rows=256, device=device, resident=resident,
                          checkpoint=checkpoint, state_dir=str(state_dir), flush_s=0)
    assert int(saved["it"]) == 2
    # what another run's later rounds could have left: survivors marked as removed in round 4 (still alive in
    # round 2, so the files agree with the checkpoint's count)
    removed = np.fromfile(state_dir / "removed_at.i32", dtype=np.int32)
    survivors = np.flatnonzero(removed == 6)[:50]
    removed[survivors] = 4
    removed.tofile(state_dir / "removed_at.i32")
    resumed = vas_d_iterate(store, gram, first, 1000, 6, block_rows=256, device=device, resident=resident,
                            state=saved, state_dir=str(state_dir), flush_s=0)
    assert resumed.timing["rounds_run"] == 4  # resumed, not started over
    assert np.array_equal(resumed.removed_at, whole.removed_at) and resumed.keep.sum() == 1000


@pytest.mark.parametrize("k", [0, 1, 7, 20, 33, 40])
def test_device_top_k_breaks_ties_like_top_k_mask(k: int) -> None:
    """The resident rounds' top-k on the device keeps what `select.top_k_mask` keeps of the alive values: ties
    at the cut to the earliest, -0.0 equal to +0.0, whichever side (k or n - k + 1) torch.topk is asked for."""
    torch = pytest.importorskip("torch")
    from varalign.scores.vas_d import _device_top_k
    from varalign.select import top_k_mask

    values = np.array([0.5, -0.0, 0.0, 0.5, 1.0, 0.5, 2.0, 0.0, -1.0, 0.5] * 5, dtype=np.float32)
    alive = np.ones(len(values), dtype=bool)
    alive[[3, 11, 12, 30, 47]] = False
    n = int(alive.sum())
    want = np.zeros(len(values), dtype=bool)
    want[np.flatnonzero(alive)[top_k_mask(values[alive], k)]] = True
    for tie_rows in (1 << 20, 8, 1):  # the ties looked for in one block, or across several
        got = _device_top_k(torch, torch.from_numpy(values), torch.from_numpy(alive), n, k, tie_rows=tie_rows)
        assert got.sum() == min(k, n) and np.array_equal(got.numpy(), want), tie_rows


def test_vas_d_residency_rule(monkeypatch, capsys) -> None:
    """Candidates stay on an accelerator when they fit beside the rounds' working set (with their round state)
    and 5% slack:
    DataComp-medium's exact VAS-D candidates (128M × 45% rows of 768 float16) fit an H200, not an 80 GB
    H100, where they are read from the host every round and a note says so."""
    torch = pytest.importorskip("torch")
    from varalign import backend

    rows, dim = 57_600_000, 768
    nbytes = rows * dim * 2
    work = backend.ResidentRows.work_bytes(dim, 16384, 1 << 20, rows)
    # the scoring step (4·16384 rows × 768 × 14 B: 0.70 GB) and the round state kept on the device (20 B a
    # candidate: 1.15 GB)
    assert 1.85e9 < work < 2.0e9
    assert backend.ResidentRows.fits(nbytes, work, free=140_000_000_000, total=143_700_000_000)
    assert not backend.ResidentRows.fits(nbytes, work, free=84_000_000_000, total=85_000_000_000)
    assert not backend.ResidentRows.fits(nbytes, work, free=nbytes + work, total=143_700_000_000)  # no slack

    class FakeCuda:  # an accelerator of 85 GB with 84 GB free: only the decision is exercised
        type = "cuda"

    monkeypatch.setattr(backend, "torch_device", lambda device: (torch, FakeCuda()))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev: (84_000_000_000, 85_000_000_000))
    read = lambda a, b: pytest.fail("rows that do not fit must not be copied")  # noqa: E731
    assert backend.ResidentRows.load(read, rows, dim, np.dtype(np.float16), "cuda", 16384) is None
    err = capsys.readouterr().err
    assert "57,600,000 VAS-D candidates (88.5 GB) do not fit" in err and "84.0 GB free" in err


def _vas_d_in_memory(f: np.ndarray, target_count: int, num_iters: int) -> tuple[np.ndarray, np.ndarray]:
    """The rounds as the reference states them, every array in memory: (removed_at, last score)."""
    m = len(f)
    f32 = f.astype(np.float32)
    gram = f32.T.astype(np.float64) @ f32
    target = (gram / m).astype(np.float32)
    chunk = int(np.ceil((m - target_count) / num_iters))
    alive, removed_at = np.ones(m, dtype=bool), np.full(m, num_iters, dtype=np.int32)
    last, n_alive = np.full(m, np.nan, dtype=np.float32), m
    for it in range(num_iters):
        idx = np.flatnonzero(alive)
        scores = ((f32[idx] @ target) * f32[idx]).sum(axis=1)
        last[idx] = scores
        k = target_count if it == num_iters - 1 else max(target_count, n_alive - chunk)
        removed = idx[~top_k_mask(scores, k)]
        alive[removed], removed_at[removed], n_alive = False, it, k
        if it < num_iters - 1 and len(removed):
            gram -= f32[removed].T.astype(np.float64) @ f32[removed]
            target = (gram / n_alive).astype(np.float32)
    return removed_at, last


def test_vas_d_rounds_fill_a_large_executor_with_several_state_blocks(tmp_path) -> None:
    """A round scores several consecutive state blocks in one call of the executor when it has many workers
    (about 4 block tasks a worker, at most MAX_GROUP state blocks), one state block a call with few: the same
    removal rounds and scores either way, and as the in-memory rounds."""
    from varalign.scores.vas_d import MAX_GROUP

    rng = np.random.default_rng(9)
    f = rng.standard_normal((2600, 16)).astype(np.float16)
    f32 = f.astype(np.float32)
    gram = f32.T.astype(np.float64) @ f32
    store = CandidateStore.create(str(tmp_path / "cand.bin"), len(f), 16, np.dtype(np.float16))
    write_rows(store.path, 0, f)
    expected_removed, expected_last = _vas_d_in_memory(f, 700, 3)

    def spy(workers: int, calls: list[int]):
        def run(fn, tasks):
            calls.append(len(tasks))
            return [fn(*t) for t in tasks]
        run.workers = workers
        return run

    # 2,600 candidates, block tasks of 128 rows (21): in state blocks of 256 rows (2 tasks each, 11 blocks),
    # 1 worker wants 4 tasks a call (2 state blocks), 3 workers 12 (6 state blocks); in state blocks of 128 rows
    # (21), 1,000 workers get MAX_GROUP state blocks a call
    assert MAX_GROUP == 16
    for workers, state_rows, per_call in ((1, 256, [4, 4, 4, 4, 4, 1]), (3, 256, [12, 9]), (1000, 256, [21]),
                                          (1000, 128, [16, 5]), (1, 1 << 20, [21])):
        calls: list[int] = []
        res = vas_d_iterate(store, gram, (gram / len(f)).astype(np.float32), 700, 3, block_rows=128,
                            state_rows=state_rows, mapper=spy(workers, calls))
        assert calls == per_call * 3, (workers, calls)  # each of the 3 rounds
        assert np.array_equal(res.removed_at, expected_removed), workers
        np.testing.assert_allclose(res.last_score, expected_last, rtol=1e-6)


def test_vas_d_rounds_state_in_blocks_match_the_in_memory_rounds(tmp_path) -> None:
    """The rounds keep their per-candidate state in flat files, `state_rows` candidates at a time, and find
    each round's top-k by histogram passes: the same removal rounds as every array in memory, whatever the
    state block (ties included: a quarter of the rows are exact duplicates), and a round killed half way
    (its `removed_at` writes partly done) resumes to the same result; a checkpoint that does not match the
    files is not resumed from."""
    rng = np.random.default_rng(5)
    f = rng.standard_normal((2600, 16)).astype(np.float16)
    f[::4] = f[1::4][: len(f[::4])]  # exact ties in every round
    f32 = f.astype(np.float32)
    gram = f32.T.astype(np.float64) @ f32
    store = CandidateStore.from_array(f)
    expected_removed, expected_last = _vas_d_in_memory(f, 700, 5)
    grams = []
    for state_rows in (256, 1000, 1 << 20):
        res = vas_d_iterate(store, gram, (gram / len(f)).astype(np.float32), 700, 5, block_rows=128,
                            state_rows=state_rows, checkpoint=lambda st: grams.append(st["gram_keep"].copy())
                            if int(st["it"]) == 4 else None)
        assert np.array_equal(res.removed_at, expected_removed), state_rows
        np.testing.assert_allclose(res.last_score, expected_last, rtol=1e-6)
        assert res.keep.sum() == 700
    # the removed rows' Grams are subtracted in the same blocks whatever the state block: the same bits
    assert all(np.array_equal(g, grams[0]) for g in grams[1:])
    # kill in round 2 after some of its removals were written: resume from the round-2 checkpoint
    state_dir = tmp_path / "rounds"
    state_dir.mkdir()
    saved = {}

    class Killed(Exception):
        pass

    def checkpoint(state):
        if int(state["it"]) == 2:
            saved.update({k: np.copy(v) for k, v in state.items()})
        if int(state["it"]) == 3:
            raise Killed
    with pytest.raises(Killed):
        vas_d_iterate(store, gram, (gram / len(f)).astype(np.float32), 700, 5, block_rows=128, state_rows=256,
                      state_dir=str(state_dir), checkpoint=checkpoint)
    removed = np.fromfile(state_dir / "removed_at.i32", dtype=np.int32)
    removed[np.flatnonzero(removed == 2)[::2]] = 5  # half of round 2's writes undone: a torn round
    removed.tofile(state_dir / "removed_at.i32")
    res = vas_d_iterate(store, gram, (gram / len(f)).astype(np.float32), 700, 5, block_rows=128, state_rows=256,
                        state_dir=str(state_dir), state=saved)
    assert np.array_equal(res.removed_at, expected_removed)
    # a checkpoint next to state files that do not match it (another run's fresh files: every candidate
    # alive, as after an upgrade or a lost round of writes) is not resumed from: the rounds start over
    np.full(len(f), 5, dtype=np.int32).tofile(state_dir / "removed_at.i32")
    res = vas_d_iterate(store, gram, (gram / len(f)).astype(np.float32), 700, 5, block_rows=128, state_rows=256,
                        state_dir=str(state_dir), state=dict(saved))
    assert np.array_equal(res.removed_at, expected_removed)
    # nor is a checkpoint of the earlier format (every candidate's state inside it, no state_format)
    old = {k: v for k, v in saved.items() if k != "state_format"}
    np.full(len(f), 5, dtype=np.int32).tofile(state_dir / "removed_at.i32")
    res = vas_d_iterate(store, gram, (gram / len(f)).astype(np.float32), 700, 5, block_rows=128, state_rows=256,
                        state_dir=str(state_dir), state=old)
    assert np.array_equal(res.removed_at, expected_removed)


def test_given_uids_rewritten_in_place_is_read_again(pool, tmp_path) -> None:
    """One process (the Python API), the same --given_uids_path rewritten between two runs: the second run
    restricts the pool to the new uids, not to the first run's."""
    root, uids, *_ = pool
    for step in (2, 3):
        save_subset(tmp_path / "given.npy", hex_to_uids(uids[::step]))
        res = filter_pool(root / "pool", tmp_path / f"g{step}.npy", "no_filter",
                          given_uids_path=str(tmp_path / "given.npy"), quiet=True)
        assert res.counts["pool"] == len(uids[::step])


def test_given_uids_restricts_pool_first(pool, tmp_path) -> None:
    root, uids, scores, *_ = pool
    rows = np.arange(0, 3000, 2)
    save_subset(tmp_path / "given.npy", hex_to_uids([uids[i] for i in rows]))
    res = filter_pool(root / "pool", tmp_path / "g.npy", "clip_score", arch="l14", fraction=0.5,
                      given_uids_path=str(tmp_path / "given.npy"), quiet=True)
    sub = scores[rows]
    t = -np.sort(-sub)[int(len(sub) * 0.5)]
    assert res.counts["pool"] == 1500
    assert np.array_equal(np.load(tmp_path / "g.npy"), _uid_set(uids, rows[sub >= t]))


def test_cli_writes_subset_and_manifest(pool, tmp_path, capsys) -> None:
    root, uids, scores, feats, target = pool
    out = tmp_path / "uids" / "vas.npy"
    code = main(["filter", "--name", "vas", "--metadata_dir", str(root / "pool"), "--save_path", str(out),
                 "--arch", "l14", "--fraction", "0.45", "--fraction_vas", "0.3", "--target_variance_name",
                 "imagenet_1k", "--files_path", str(root / "files"), "--num_workers", "2", "--quiet"])
    assert code == 0
    assert "selected 900" in capsys.readouterr().out
    arr = load_subset(out)
    assert arr.dtype == UID_DTYPE and len(arr) == 900
    manifest = json.loads((tmp_path / "uids" / "vas.manifest.json").read_text())
    assert manifest["counts"] == {"pool": 3000, "clip_score": 1350, "vas": 900, "selected": 900}
    assert manifest["inputs"]["shards"] == 3 and manifest["stages"]["vas"]["target_sha256"]
    assert manifest["options"]["fraction_vas"] == 0.3 and "numpy" in manifest["versions"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_list_methods(capsys) -> None:
    assert main(["filter", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("no_filter", "clip_score", "vas", "vas_d"))


def test_top_k_helper_agrees_with_select() -> None:
    from varalign.select import top_k_mask

    s = np.random.default_rng(0).integers(0, 9, 300).astype(np.float32)
    assert np.array_equal(np.flatnonzero(top_k_mask(s, 50)), top_k(s, 50))


def test_vas_d_lowrank_full_rank_equals_exact_and_low_rank_agrees(pool, tmp_path) -> None:
    root, uids, scores, feats, _ = pool
    kw = dict(arch="l14", fraction=0.45, fraction_vas=0.3, num_iters=5, quiet=True)
    exact = filter_pool(root / "pool", None, "vas_d", **kw)
    full = filter_pool(root / "pool", None, "vas_d", vas_d_mode="lowrank", vas_d_rank=768, **kw)
    assert np.array_equal(exact.uids, full.uids)
    low = filter_pool(root / "pool", None, "vas_d", vas_d_mode="lowrank", vas_d_rank=64, **kw)
    a, b = set(exact.uids.tolist()), set(low.uids.tolist())
    assert len(low.uids) == 900 and len(a & b) / len(a | b) >= 0.95


def test_vas_d_bad_rank_is_an_error(pool) -> None:
    from varalign.errors import VaralignError

    with pytest.raises(VaralignError, match="rank must be an integer"):
        filter_pool(pool[0] / "pool", None, "vas_d", arch="l14", fraction=0.45, fraction_vas=0.3, num_iters=2,
                    vas_d_mode="lowrank", vas_d_rank=1000)


@pytest.mark.parametrize("name, opts", [
    ("vas", {"fraction_vas": 0.3, "target_variance_name": "imagenet_1k"}),
    ("vas_d", {"fraction_vas": 0.3, "num_iters": 3}),
    ("vas_d", {"fraction_vas": 0.3, "num_iters": 3, "vas_d_mode": "lowrank", "vas_d_rank": 16}),
])
def test_torch_backend_gives_the_same_uids(pool, name, opts) -> None:
    """The torch path (what --device cuda runs) on torch's CPU device equals numpy/BLAS."""
    root = pool[0]
    kw = dict(arch="l14", fraction=0.45, files_path=str(root / "files"), quiet=True, **opts)
    cpu = filter_pool(root / "pool", None, name, **kw)
    via_torch = filter_pool(root / "pool", None, name, device="torch-cpu", **kw)
    assert np.array_equal(cpu.uids, via_torch.uids)


def test_cuda_without_gpu_is_a_clear_error(pool) -> None:
    from varalign.errors import VaralignError

    with pytest.raises(VaralignError, match="no CUDA device"):
        filter_pool(pool[0] / "pool", None, "vas_d", arch="l14", fraction=0.45, fraction_vas=0.3, num_iters=2,
                    device="cuda")


def test_all_finite_on_every_float16_bit_pattern() -> None:
    """The two-reduction NaN/inf test agrees with np.isfinite on all 65,536 float16 values, alone and
    hidden among finite ones; float32/float64 blocks use max/min."""
    from varalign.backend import all_finite, first_nonfinite_row  # noqa: PLC0415

    values = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.isfinite(values.astype(np.float32))
    alone = np.array([all_finite(values[i : i + 1]) for i in range(len(values))])
    assert np.array_equal(alone, finite)
    block = np.full((4, 6), 0.5, dtype=np.float16)
    for v in values[~finite][::97]:
        block[2, 3] = v
        assert not all_finite(block) and first_nonfinite_row(block) == 2
    block[2, 3] = -0.0
    assert all_finite(block) and first_nonfinite_row(block) is None
    for dtype in (np.float32, np.float64):
        for v, ok in ((np.nan, False), (np.inf, False), (-np.inf, False), (-3.0, True)):
            a = np.zeros((3, 4), dtype=dtype)
            a[1, 2] = v
            assert all_finite(a) is ok and first_nonfinite_row(a) == (None if ok else 1)


def test_device_on_a_method_that_cannot_use_it_is_a_note(synth_pool, tmp_path, capsys) -> None:
    """--device reaches vas, vas_d, negcliploss, normsim and image_based; other methods (the caption rules)
    say in one line that they stay on the CPU."""
    pytest.importorskip("torch")
    from varalign.cli import main

    base = ["filter", "--metadata_dir", str(synth_pool / "pool"), "--device", "torch-cpu", "--quiet"]
    code = main(base + ["--name", "laion2b", "--save_path", str(tmp_path / "n.npy")])
    err = capsys.readouterr().err
    assert code == 0 and "note: --device torch-cpu: laion2b run(s) on the CPU" in err
    assert "negcliploss" in err and "image_based" in err  # the list of methods that use the device
    code = main(base + ["--name", "vas", "--arch", "l14", "--fraction", "0.45", "--fraction_vas", "0.3",
                        "--target_variance_name", "imagenet_1k", "--files_path", str(synth_pool / "files"),
                        "--save_path", str(tmp_path / "v.npy")])
    assert code == 0 and "note" not in capsys.readouterr().err


def test_parquet_row_count_from_the_footer(tmp_path) -> None:
    """The footer's row count as pyarrow reads it, for files written every which way; anything else is
    left to pyarrow (which says what is wrong)."""
    import pyarrow as pa  # noqa: PLC0415

    from varalign.errors import VaralignError  # noqa: PLC0415
    from varalign.pool import Shard, footer_rows, parquet_rows, read_columns  # noqa: PLC0415

    n = 3000
    table = pa.table({"uid": [f"{i:032x}" for i in range(n)], "score": np.arange(n, dtype=np.float32),
                      "tags": [[str(i)] * (i % 3) for i in range(n)], "pos": [{"x": i, "y": None} for i in range(n)],
                      "kv": pa.array([[("a", i)] for i in range(n)], type=pa.map_(pa.string(), pa.int64())),
                      "flag": [i % 2 == 0 for i in range(n)]})
    table = table.replace_schema_metadata({"note": "x" * 5000})
    variants = {"plain": {}, "row_groups": {"row_group_size": 77}, "v2_pages": {"data_page_version": "2.0"},
                "no_stats": {"write_statistics": False}, "no_dict": {"use_dictionary": False},
                "v1": {"version": "1.0"}, "zstd": {"compression": "zstd"}}
    for name, kwargs in variants.items():
        pq.write_table(table, tmp_path / f"{name}.parquet", **kwargs)
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    for path in sorted(tmp_path.glob("*.parquet")):
        assert footer_rows(path) == pq.ParquetFile(path).metadata.num_rows == parquet_rows(path), path.name
    data = (tmp_path / "plain.parquet").read_bytes()
    for bad, content in {"garbage": b"PAR1" + bytes(range(256)) * 4 + b"PAR1", "short": b"PAR1PAR1",
                         "truncated": data[: len(data) // 2], "no_magic": data[:-4] + b"PARE"}.items():
        path = tmp_path / f"{bad}.bad"
        path.write_bytes(content)
        assert footer_rows(path) is None, bad
        with pytest.raises(VaralignError, match="not a readable parquet file"):
            parquet_rows(path)
    assert footer_rows(tmp_path / "missing.parquet") is None
    # a valid tail (length, magic) over a damaged footer: never a row count read from garbage
    length = int.from_bytes(data[-8:-4], "little")
    head, footer = data[: -8 - length], data[-8 - length: -8]
    rng = np.random.default_rng(0)
    damaged = {"zeroed": bytes(length), "random": rng.integers(0, 256, length, dtype=np.uint8).tobytes(),
               "ff_after_half": footer[: length // 2] + b"\xff" * (length - length // 2),
               "ff_tail": footer[:-8] + b"\xff" * 8, "no_stop": footer[:-1] + b"\x15",
               "ff_head": b"\xff" * 8 + footer[8:], "schema_cut": footer[:40] + bytes(length - 40)}
    for bad, new_footer in damaged.items():
        path = tmp_path / f"{bad}.footer"
        path.write_bytes(head + new_footer + len(new_footer).to_bytes(4, "little") + b"PAR1")
        assert footer_rows(path) is None, bad
        with pytest.raises(VaralignError, match="not a readable parquet file"):
            parquet_rows(path)
    # damaged inside the row groups' column chunks, start and end intact (no key-value metadata, so the
    # middle of the footer is column chunks): counted here, and reading the shard's columns (pyarrow's
    # full parse) fails with the file's name
    pq.write_table(table.select(["uid", "score"]).replace_schema_metadata(None), tmp_path / "small.pq",
                   store_schema=False)
    data = (tmp_path / "small.pq").read_bytes()
    length = int.from_bytes(data[-8:-4], "little")
    head, footer = data[: -8 - length], data[-8 - length: -8]
    mid = footer[: length // 2] + b"\xff" * 16 + footer[length // 2 + 16:]
    path = tmp_path / "mid.footer"
    path.write_bytes(head + mid + data[-8:])
    assert footer_rows(path) == n
    with pytest.raises(VaralignError, match=r"mid\.footer"):
        read_columns(Shard("mid", str(path), None, n), ["uid"])
