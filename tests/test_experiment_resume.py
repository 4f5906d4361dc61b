"""One resume scheme for embed, reshard, minicomp and the experiment loop (`workdir.Steps` on the work
directory), and their per-shard passes through the executor (`execute.py`)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from experiment_data import fake_uid, make_subset, make_train_shards

from varalign.errors import VaralignError
from varalign.pool import discover_shards
from varalign.workdir import MARKER, Steps, WorkDir

reshard_module = importlib.import_module("varalign.experiment.reshard")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    make_train_shards(root / "shards", n=300, per_shard=100)
    return root / "shards"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != "meta.json"}


def test_steps_record_files_key_and_redo(tmp_path: Path) -> None:
    out = tmp_path / "a.bin"
    out.write_bytes(b"12345")
    steps = Steps(WorkDir(tmp_path / "w", "plan"), "stage")
    assert steps.done("s") is None
    steps.finish("s", [out], {"rows": 5}, key="k1")
    assert (tmp_path / "w" / MARKER).exists()
    again = Steps(WorkDir(tmp_path / "w", "plan"), "stage")  # a new run on the same work dir
    assert again.done("s", "k1") == {"rows": 5}
    assert again.done("s", "k2") is None  # other inputs or settings: redone
    again.finish("s", [out], {"rows": 5}, key="k1")
    out.write_bytes(b"123")  # the output changed since: redone
    assert again.done("s", "k1") is None
    again.finish("s", [out], {}, key="k1")
    (tmp_path / "w" / "stage" / "s.npz").write_bytes(b"torn")  # a damaged record: redone
    assert Steps(WorkDir(tmp_path / "w", "plan"), "stage").done("s", "k1") is None
    Steps(WorkDir(tmp_path / "w", "plan"), "stage").finish("s", [out], {}, key="k1")
    assert Steps(WorkDir(tmp_path / "w", "other plan"), "stage").done("s", "k1") is None  # plan changed


def _embed_killed_on_the_second_shard(embed_module, shards: Path, out: Path, opts: dict,
                                      monkeypatch: pytest.MonkeyPatch):
    """Run embed into `out` with a Ctrl-C as its second shard starts; returns the real task function (the
    killed one stays patched in until the caller puts it back)."""
    real, calls = embed_module._embed_task, []

    def dies_on_the_second(unit, *args):
        calls.append(unit.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(unit, *args)

    monkeypatch.setattr(embed_module, "_embed_task", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        embed_module.embed([shards], out, **opts)
    return real


def test_embed_resumes_from_its_work_dir(shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("open_clip")
    embed_module = importlib.import_module("varalign.experiment.embed")
    opts = {"model": "varalign-tiny", "random_init": True, "arch": "b32", "batch_size": 64, "quiet": True}
    clean = embed_module.embed([shards], tmp_path / "clean", **opts)
    assert clean.reused == 0 and not (tmp_path / "clean" / embed_module.WORK_DIR).exists()

    real = _embed_killed_on_the_second_shard(embed_module, shards, tmp_path / "out", opts, monkeypatch)
    assert (tmp_path / "out" / embed_module.WORK_DIR / MARKER).exists()  # the finished shard is recorded
    # the killed run's pool is refused by every reader until embed has finished it
    with pytest.raises(VaralignError, match=r"embed.json: pool is incomplete: varalign embed has finished 1 of 3 "
                                            r"shards \(00000001 not yet\); run the same embed command again"):
        discover_shards(tmp_path / "out", need_npz=True)
    monkeypatch.setattr(embed_module, "_embed_task", real)
    resumed = embed_module.embed([shards], tmp_path / "out", **opts)
    assert resumed.reused == 1 and resumed.rows == 300  # the reused shard's rows counted too
    assert len(discover_shards(tmp_path / "out", need_npz=True)) == 3
    assert not (tmp_path / "out" / embed_module.WORK_DIR).exists()  # removed once the manifest names every shard
    assert _files(tmp_path / "out") == _files(tmp_path / "clean")
    import json

    assert set(json.loads((tmp_path / "out" / "embed.json").read_text())["shards"]) == {
        "00000000", "00000001", "00000002"}
    # a finished run: every shard reused (the manifest); a shard whose file went missing is redone
    (tmp_path / "out" / "00000001.npz").unlink()
    again = embed_module.embed([shards], tmp_path / "out", **opts)
    assert again.reused == 2 and _files(tmp_path / "out") == _files(tmp_path / "clean")


def test_embed_rerun_on_fewer_inputs_leaves_a_readable_pool(shards: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A run on three tars killed during its second; a run on the first tar alone then completes the folder as
    a pool of the shards finished with this config (the killed run's finished one included), and readers take
    it. --overwrite with another config still removes every shard an embed run wrote, finished or not."""
    pytest.importorskip("open_clip")
    import json

    embed_module = importlib.import_module("varalign.experiment.embed")
    opts = {"model": "varalign-tiny", "random_init": True, "arch": "b32", "batch_size": 64, "quiet": True}
    out = tmp_path / "out"
    real = _embed_killed_on_the_second_shard(embed_module, shards, out, opts, monkeypatch)
    monkeypatch.setattr(embed_module, "_embed_task", real)
    tars = sorted(shards.glob("*.tar"))
    done = embed_module.embed([tars[0]], out, **opts)
    assert done.shards == ["00000000"]
    manifest = json.loads((out / "embed.json").read_text())
    assert manifest["planned"] == sorted(manifest["shards"]) == ["00000000"]
    assert manifest["abandoned"] == ["00000001", "00000002"]
    assert [s.name for s in discover_shards(out, need_npz=True)] == ["00000000"]
    embed_module.embed([tars[0]], out, **opts, seed=3, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "00000000.npz", "00000000.parquet", "embed.json"]


def test_embed_that_wrote_no_shard_does_not_block_the_corrected_run(shards: Path, tmp_path: Path) -> None:
    """A wrong --pretrained fails before the folder is marked; a run that marked it but wrote no shard (its
    model failed on a Ray worker, or it was stopped first) is replaced by the corrected one without --overwrite.
    Once a shard is written, another config needs --overwrite."""
    pytest.importorskip("open_clip")
    import json

    embed_module = importlib.import_module("varalign.experiment.embed")
    out = tmp_path / "out"
    np.save(tmp_path / "not_a_model.npy", np.zeros(3))
    opts = {"model": "varalign-tiny", "arch": "b32", "batch_size": 64, "quiet": True}
    with pytest.raises(VaralignError, match="cannot load open_clip model"):
        embed_module.embed([shards], out, pretrained=str(tmp_path / "not_a_model.npy"), **opts)
    assert not (out / "embed.json").exists()
    out.mkdir(exist_ok=True)
    (out / "embed.json").write_text(json.dumps({"config": {"model": "other"}, "shards": {},
                                                "planned": ["00000000", "00000001", "00000002"]}))
    done = embed_module.embed([shards], out, random_init=True, **opts)
    assert done.rows == 300 and json.loads((out / "embed.json").read_text())["config"]["random_init"] is True
    with pytest.raises(VaralignError, match="embedded with another model/config"):
        embed_module.embed([shards], out, random_init=True, seed=1, **opts)


def test_reshard_interrupted_keeps_the_shards_indexed(shards: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    make_subset(tmp_path / "s.npy", [fake_uid(i) for i in range(0, 300, 3)])
    reshard_module.reshard(shards, tmp_path / "clean", tmp_path / "s.npy", shard_size=16, num_workers=1, quiet=True)

    def interrupted(job):
        raise KeyboardInterrupt

    monkeypatch.setattr(reshard_module, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reshard_module.reshard(shards, tmp_path / "out", tmp_path / "s.npy", shard_size=16, num_workers=1, quiet=True)
    work = tmp_path / "out" / reshard_module.WORK_DIR
    assert (work / MARKER).exists() and len(list((work / "index").glob("*.done"))) == 3
    monkeypatch.undo()
    indexed = []
    real = reshard_module._index_shard
    monkeypatch.setattr(reshard_module, "_index_shard", lambda *a: indexed.append(a[0]) or real(*a))
    # the same command again (no --overwrite: the folder holds this unfinished reshard, its marker and no meta.json)
    r = reshard_module.reshard(shards, tmp_path / "out", tmp_path / "s.npy", shard_size=16, num_workers=1,
                               quiet=True)
    assert indexed == [] and r.output_samples == 100  # every input shard's index reused
    assert not work.exists()
    assert _files(tmp_path / "out") == _files(tmp_path / "clean")


def test_reshard_on_ray_equals_local(shards: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    make_subset(tmp_path / "s.npy", [fake_uid(i) for i in range(0, 300, 2)] + [fake_uid(7)] * 2)
    local = reshard_module.reshard(shards, tmp_path / "local", tmp_path / "s.npy", shard_size=32, num_workers=2,
                                   quiet=True)
    try:
        remote = reshard_module.reshard(shards, tmp_path / "ray", tmp_path / "s.npy", shard_size=32, num_workers=2,
                                        quiet=True, executor="ray")
    finally:
        ray.shutdown()
    assert (local.output_samples, local.found_unique) == (remote.output_samples, remote.found_unique)
    assert _files(tmp_path / "ray") == _files(tmp_path / "local")


def test_synthetic_pool_same_with_processes(tmp_path: Path) -> None:
    from varalign.synth import make_pool

    make_pool(tmp_path / "one", num_samples=900, num_shards=3, num_workers=1)
    make_pool(tmp_path / "two", num_samples=900, num_shards=3, num_workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert np.load(tmp_path / "one" / "00000000.npz")["l14_img"].shape == (300, 768)


def test_embed_on_ray_equals_local(shards: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    pytest.importorskip("open_clip")
    import pyarrow.parquet as pq

    from varalign.experiment.embed import embed

    opts = {"model": "varalign-tiny", "random_init": True, "arch": "b32", "batch_size": 64, "quiet": True}
    embed([shards], tmp_path / "local", **opts)
    try:
        r = embed([shards], tmp_path / "ray", executor="ray", **opts)  # one Ray task per shard
    finally:
        ray.shutdown()
    assert r.rows == 300 and sorted(_files(tmp_path / "ray")) == sorted(_files(tmp_path / "local"))
    for i in range(3):  # torch's thread count may move the last bits of the embeddings; nothing else differs
        a, b = np.load(tmp_path / "local" / f"{i:08d}.npz"), np.load(tmp_path / "ray" / f"{i:08d}.npz")
        assert np.allclose(a["b32_img"], b["b32_img"], atol=2e-3) and np.allclose(a["b32_txt"], b["b32_txt"], atol=2e-3)
        ta, tb = pq.read_table(tmp_path / "local" / f"{i:08d}.parquet"), pq.read_table(tmp_path / "ray" / f"{i:08d}.parquet")
        assert ta.drop(["clip_b32_similarity_score"]).equals(tb.drop(["clip_b32_similarity_score"]))
