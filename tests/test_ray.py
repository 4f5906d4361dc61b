"""The Ray executor runs the same plan as the local one and writes the same subset file."""

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is part of the test extra: pip install -e '.[test]'")

from varalign import filter_pool  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a running cluster
    yield
    ray.shutdown()


@pytest.mark.parametrize("name, opts", [
    ("clip_score", {"arch": "l14", "fraction": 0.3}),
    ("vas", {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "target_variance_name": "imagenet_1k"}),
    ("vas_d", {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "num_iters": 4}),
])
def test_ray_equals_local(local_ray, synth_pool, tmp_path, name, opts) -> None:
    files = str(synth_pool / "files")
    local = filter_pool(synth_pool / "pool", tmp_path / "local.npy", name, files_path=files, quiet=True,
                        save_scores=str(tmp_path / "local.parquet"), **opts)
    remote = filter_pool(synth_pool / "pool", tmp_path / "ray.npy", name, files_path=files, quiet=True,
                         executor="ray", save_scores=str(tmp_path / "ray.parquet"), **opts)
    assert (tmp_path / "local.npy").read_bytes() == (tmp_path / "ray.npy").read_bytes()
    assert local.counts == remote.counts
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "local.parquet").equals(pq.read_table(tmp_path / "ray.parquet"))


def test_ray_reports_bad_input_in_one_line(local_ray, tmp_path, capsys) -> None:
    from conftest import random_shard, write_pool

    from varalign.cli import main

    shard = random_shard(np.random.default_rng(0), 20)
    shard["l14_img"][5, 3] = np.nan
    pool = write_pool(tmp_path / "pool", [shard])
    (tmp_path / "t.npy").write_bytes(b"")
    np.save(tmp_path / "t.npy", np.eye(768, dtype=np.float32))
    code = main(["filter", "--name", "vas", "--metadata_dir", str(pool), "--save_path", str(tmp_path / "o.npy"),
                 "--arch", "l14", "--fraction", "0.5", "--fraction_vas", "0.2", "--target", str(tmp_path / "t.npy"),
                 "--executor", "ray", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "00000000.npz" in err and "NaN" in err


@pytest.mark.parametrize("mode", ["exact", "lowrank"])
def test_vas_d_rounds_run_as_ray_tasks(local_ray, synth_pool, tmp_path, monkeypatch, mode) -> None:
    """Every pass of VAS-D goes through the executor: the embedding pass, the projection (low-rank) and
    every round's block scoring are Ray tasks, and the subset is the local one."""
    from varalign.execute import RayExecutor

    calls: list[tuple[str, int]] = []
    original = RayExecutor.map

    def spy(self, fn, tasks, desc, *args, **kwargs):
        calls.append((desc, len(tasks)))
        return original(self, fn, tasks, desc, *args, **kwargs)

    monkeypatch.setattr(RayExecutor, "map", spy)
    opts = {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "num_iters": 3, "vas_d_mode": mode,
            "vas_d_rank": 16}
    filter_pool(synth_pool / "pool", tmp_path / "local.npy", "vas_d", quiet=True, **opts)
    filter_pool(synth_pool / "pool", tmp_path / "ray.npy", "vas_d", quiet=True, executor="ray", **opts)
    assert (tmp_path / "local.npy").read_bytes() == (tmp_path / "ray.npy").read_bytes()
    rounds = [n for desc, n in calls if desc == "vas_d rounds"]
    assert len(rounds) == 3 and all(n >= 1 for n in rounds)
    assert any(desc == "vas_d (npz)" for desc, _ in calls)
    assert any(desc == "vas_d (projection)" for desc, _ in calls) == (mode == "lowrank")


def test_a_ray_varalign_starts_shares_this_machines_disk(synth_pool, tmp_path) -> None:
    """The one-node Ray varalign starts itself shares this machine's filesystem (VAS-D's workers write the
    candidate store in place, as the local executor's do: same subset); a Ray started by someone else, or
    a cluster given by address, is never assumed to share one (results travel through Ray's object store)."""
    import json
    import subprocess
    import sys

    script = f"""
import json, ray
from varalign import filter_pool
from varalign.execute import RayExecutor
opts = dict(arch="l14", fraction=0.45, fraction_vas=0.3, num_iters=4, quiet=True)
filter_pool({str(synth_pool / "pool")!r}, {str(tmp_path / "local.npy")!r}, "vas_d", **opts)
filter_pool({str(synth_pool / "pool")!r}, {str(tmp_path / "ray.npy")!r}, "vas_d", executor="ray", num_workers=2, **opts)
ours = RayExecutor().shared_filesystem
ray.shutdown()
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
print(json.dumps([ours, RayExecutor().shared_filesystem]))
ray.shutdown()
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [True, False]
    assert (tmp_path / "local.npy").read_bytes() == (tmp_path / "ray.npy").read_bytes()
