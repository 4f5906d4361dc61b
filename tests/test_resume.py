"""Resume: a run killed with SIGKILL continues where it stopped and writes byte-identical output."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from varalign import filter_pool
from varalign.synth import make_pool


def _finished_scan_tasks(work: Path) -> int:
    """How many shard tasks of the scan have their result in the work dir (alone or in a group file)."""
    import json

    from varalign.workdir import WorkDir

    wd = WorkDir(work, json.loads((work / "plan.json").read_text())["plan"])
    return len(wd.finished(next(work.glob("scan-*")).name))


@pytest.fixture(scope="module")
def big_pool(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    make_pool(root / "pool", num_samples=12_000, num_shards=12, seed=3)
    return root / "pool"


def _argv(pool: Path, out: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "varalign", "filter", "--name", "vas_d", "--metadata_dir", str(pool),
            "--save_path", str(out), "--arch", "l14", "--fraction", "0.45", "--fraction_vas", "0.3",
            "--num_iters", "60", "--num_workers", "1", "--work_dir", str(work), "--quiet"]


def test_kill_minus_nine_then_resume_is_byte_identical(big_pool, tmp_path) -> None:
    clean = tmp_path / "clean.npy"
    subprocess.run(_argv(big_pool, clean, tmp_path / "w0"), check=True)

    out, work = tmp_path / "resumed.npy", tmp_path / "w1"
    proc = subprocess.Popen(_argv(big_pool, out, work))
    deadline = time.time() + 120
    rounds = None
    while time.time() < deadline:  # kill once VAS-D has finished a few rounds
        found = list(work.glob("*/rounds.npz"))
        if found:
            rounds = found[0]
            with np.load(rounds) as st:
                if int(st["it"]) >= 3:
                    break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the pool bigger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert _finished_scan_tasks(work) == 12  # finished shard tasks are on disk

    subprocess.run(_argv(big_pool, out, work), check=True)
    assert out.read_bytes() == clean.read_bytes()
    assert not work.exists()  # removed after success


def test_rerun_with_same_inputs_does_no_work(big_pool, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "cs.npy"
    first = filter_pool(big_pool, out, "clip_score", arch="l14", fraction=0.3)
    before = out.stat().st_mtime_ns

    from varalign.engine.run import Run

    monkeypatch.setattr(Run, "scan", lambda self: pytest.fail("re-run did work"))
    second = filter_pool(big_pool, out, "clip_score", arch="l14", fraction=0.3)
    assert "up to date" in capsys.readouterr().err
    assert np.array_equal(first.uids, second.uids) and out.stat().st_mtime_ns == before
    monkeypatch.undo()
    third = filter_pool(big_pool, out, "clip_score", arch="l14", fraction=0.25, quiet=True)  # new config: recomputed
    assert len(third.uids) < len(first.uids)


def test_work_dir_reuses_finished_shards(big_pool, tmp_path) -> None:
    work = tmp_path / "w"
    filter_pool(big_pool, tmp_path / "a.npy", "clip_score", arch="l14", fraction=0.3, work_dir=str(work),
                keep_work_dir=True, quiet=True)
    assert _finished_scan_tasks(work) == 12
    assert len(list(work.glob("scan-*/*.done"))) == 1  # small shards' results: one group file
    res = filter_pool(big_pool, tmp_path / "b.npy", "clip_score", arch="l14", fraction=0.3, work_dir=str(work),
                      keep_work_dir=True, quiet=True)
    import json

    manifest = json.loads((tmp_path / "b.manifest.json").read_text())
    assert manifest["resumed_tasks"] == 12
    assert np.array_equal(res.uids, np.load(tmp_path / "a.npy"))


def test_group_file_round_trip_and_torn_group(tmp_path) -> None:
    """Small shards' results are saved together (one file, one member per array key); each task reads back
    its own arrays (0-d, empty, 2-d, structured, and keys only some tasks have); a torn group is redone."""
    from varalign.workdir import WorkDir

    res = {f"s{i}": {"a": np.arange(i), "b": np.float32(i), "c": np.ones((i, 3)),
                     "d": np.array([(i, i + 1)] * i, dtype="u8,u8")} for i in range(5)}
    res["s2"]["only"] = np.zeros(2)
    WorkDir(tmp_path / "w", "plan").save_many("ph", res)
    assert len(list((tmp_path / "w" / "ph").glob("*.npz"))) == 1
    again = WorkDir(tmp_path / "w", "plan")
    assert again.finished("ph") == sorted(res)
    for name, arrays in res.items():
        got = again.load("ph", name)
        assert sorted(got) == sorted(arrays)
        for k, v in arrays.items():
            assert got[k].dtype == np.asarray(v).dtype and got[k].shape == np.shape(v) and np.array_equal(got[k], v)
    assert again.read("ph", "s3", "c").shape == (3, 3)
    group = next((tmp_path / "w" / "ph").glob("*.npz"))
    group.write_bytes(group.read_bytes()[:100])  # torn
    torn = WorkDir(tmp_path / "w", "plan")
    assert not any(torn.has("ph", n) for n in res) and torn.finished("ph") == []
