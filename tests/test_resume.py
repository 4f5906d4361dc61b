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
    assert len(list(work.glob("scan-*/*.done"))) == 12  # finished shard tasks are on disk

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
    assert len(list(work.glob("scan-*/*.done"))) == 12
    res = filter_pool(big_pool, tmp_path / "b.npy", "clip_score", arch="l14", fraction=0.3, work_dir=str(work),
                      keep_work_dir=True, quiet=True)
    import json

    manifest = json.loads((tmp_path / "b.manifest.json").read_text())
    assert manifest["resumed_tasks"] == 12
    assert np.array_equal(res.uids, np.load(tmp_path / "a.npy"))
