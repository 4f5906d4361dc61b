"""Pools and outputs in object storage, through a real S3 server (moto's, on 127.0.0.1), and Ray across two
nodes that share no path: the same subsets and scores as a local run, outputs whole or absent, a changed
object noticed, one-line errors for a missing bucket or missing credentials."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

moto_server = pytest.importorskip("moto.server", reason="moto[server] is part of the test extra")
s3fs = pytest.importorskip("s3fs", reason="s3fs is part of the test extra")

from varalign import filter_pool, storage  # noqa: E402
from varalign.cli import main  # noqa: E402

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(synth_pool):
    """A moto S3 server on 127.0.0.1 with the synthetic pool uploaded to s3://pool/pool/."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    saved = {k: os.environ.get(k) for k in [*CREDS, storage.ENV]}
    os.environ.update(CREDS)
    storage.configure({"client_kwargs": {"endpoint_url": endpoint}})
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("pool")
    fs.mkdir("out")
    fs.put(str(synth_pool / "pool") + "/", "pool/pool/", recursive=True)
    yield {"endpoint": endpoint, "fs": fs, "pool": "s3://pool/pool", "local": synth_pool}
    storage._options = None
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    # moto's in-process backend outlives the server: reset it, so the next module's fixture starts empty
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).close()
    server.stop()


CASES = {
    "clip_score": {"arch": "l14", "fraction": 0.3},
    "vas": {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "target_variance_name": "imagenet_1k"},
    "vas_d": {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "num_iters": 4},
    "basic_filter": {},
}


def _run(pool, out: Path, name: str, **extra):
    opts = CASES[name] | {"files_path": extra.pop("files_path")} if name == "vas" else CASES[name]
    return filter_pool(pool, out, name, quiet=True, save_scores=str(out.with_suffix(".parquet")), **opts, **extra)


@pytest.mark.parametrize("name", list(CASES))
def test_pool_in_s3_gives_the_local_subset_and_scores(s3, tmp_path, name) -> None:
    files = str(s3["local"] / "files")
    _run(s3["local"] / "pool", tmp_path / "local.npy", name, files_path=files)
    remote = _run(s3["pool"], tmp_path / "remote.npy", name, files_path=files)
    assert (tmp_path / "local.npy").read_bytes() == (tmp_path / "remote.npy").read_bytes()
    assert pq.read_table(tmp_path / "local.parquet").equals(pq.read_table(tmp_path / "remote.parquet"))
    manifest = json.loads(Path(remote.manifest_path).read_text())
    objects = manifest["inputs"]["objects"]
    assert len(objects) == 6 and all(len(o) == 3 and o[2] for o in objects)  # name, size, ETag of every shard


def test_outputs_in_s3_are_whole_verified_and_rerun_when_an_object_changes(s3, tmp_path, capsys) -> None:
    fs = s3["fs"]
    out, scores = "s3://out/run1/vas_d.npy", "s3://out/run1/vas_d_scores.parquet"
    argv = ["filter", "--name", "vas_d", "--metadata_dir", s3["pool"], "--save_path", out, "--save_scores", scores,
            "--arch", "l14", "--fraction", "0.45", "--fraction_vas", "0.3", "--num_iters", "4"]
    assert main(argv + ["--quiet"]) == 0
    filter_pool(s3["local"] / "pool", tmp_path / "l.npy", "vas_d", quiet=True, save_scores=str(tmp_path / "l.parquet"),
                **CASES["vas_d"])
    assert fs.cat_file(out[5:]) == (tmp_path / "l.npy").read_bytes()
    assert fs.cat_file(scores[5:]) == (tmp_path / "l.parquet").read_bytes()
    manifest = json.loads(fs.cat_file("out/run1/vas_d.manifest.json"))
    assert set(manifest["files"]) == {out, scores}
    assert sorted(fs.ls("out/run1", detail=False)) == ["out/run1/vas_d.manifest.json", "out/run1/vas_d.npy",
                                                       "out/run1/vas_d_scores.parquet"]
    capsys.readouterr()
    assert main(argv) == 0
    assert "up to date" in capsys.readouterr().err
    # a changed object of the pool (same name, new bytes: a new ETag) is noticed: the run is redone
    first = fs.cat_file("pool/pool/00000000.parquet")
    fs.pipe_file("pool/pool/00000000.parquet", first)  # same bytes, new upload: moto gives the same ETag
    table = pq.read_table(s3["local"] / "pool" / "00000000.parquet")
    local_copy = tmp_path / "changed.parquet"
    pq.write_table(table.replace_schema_metadata({"note": "rewritten"}), local_copy)
    fs.put_file(str(local_copy), "pool/pool/00000000.parquet")
    try:
        assert main(argv) == 0
        assert "up to date" not in capsys.readouterr().err
    finally:
        fs.pipe_file("pool/pool/00000000.parquet", first)


_KILL_AT_PUT = textwrap.dedent("""
    import os, signal, sys
    from varalign import storage
    n, calls, real = int(sys.argv[1]), [0], storage.put_file
    def put_file(local_path, url):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(local_path, url)
    storage.put_file = put_file
    from varalign.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_kill_between_uploads_never_leaves_a_half_commit(s3, tmp_path, kill_at) -> None:
    """Uploads: pending manifest, subset, scores, then the manifest (a server-side copy). Killed before each
    put, the bucket holds no partial object, and the same command then ends with the full result (and removes the
    killed run's local temp file)."""
    fs = s3["fs"]
    prefix = f"out/kill{kill_at}"
    argv = ["filter", "--name", "clip_score", "--metadata_dir", s3["pool"], "--save_path", f"s3://{prefix}/s.npy",
            "--save_scores", f"s3://{prefix}/s.parquet", "--arch", "l14", "--fraction", "0.3", "--quiet"]
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"), TMPDIR=str(tmp_path / "tmp"))
    killed = subprocess.run([sys.executable, "-c", _KILL_AT_PUT, str(kill_at), *argv], env=env)
    assert killed.returncode == -signal.SIGKILL
    uploads = tmp_path / "tmp" / "varalign-uploads"
    assert [p.name for p in uploads.iterdir()] != []  # the killed run's temp, on its way to the bucket
    assert not fs.exists(f"{prefix}/s.manifest.json")
    filter_pool(s3["local"] / "pool", tmp_path / "l.npy", "clip_score", arch="l14", fraction=0.3, quiet=True,
                save_scores=str(tmp_path / "l.parquet"))
    for name, local in (("s.npy", "l.npy"), ("s.parquet", "l.parquet")):
        if fs.exists(f"{prefix}/{name}"):  # a put is all or nothing
            assert fs.cat_file(f"{prefix}/{name}") == (tmp_path / local).read_bytes()
    rerun = subprocess.run([sys.executable, "-m", "varalign", *argv], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert fs.cat_file(f"{prefix}/s.npy") == (tmp_path / "l.npy").read_bytes()
    assert fs.exists(f"{prefix}/s.manifest.json") and not fs.exists(f"{prefix}/.s.manifest.json.pending")
    assert list(uploads.iterdir()) == []  # the next run removed the dead run's temp (and its own)


def test_one_line_errors(s3, tmp_path, capsys, monkeypatch) -> None:
    def error(argv: list[str]) -> str:
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1 and err.startswith("varalign: error: "), err
        return err

    base = ["filter", "--name", "clip_score", "--arch", "l14", "--fraction", "0.3", "--quiet"]
    err = error(base + ["--metadata_dir", "s3://no-such-bucket/pool", "--save_path", str(tmp_path / "a.npy")])
    assert "s3://no-such-bucket/pool" in err and "no objects under this prefix, or no such bucket" in err
    err = error(base + ["--metadata_dir", s3["pool"], "--save_path", "s3://no-such-bucket/a.npy"])
    assert "no-such-bucket" in err and "not found" in err
    assert not (tmp_path / "a.npy").exists()
    # no credentials anywhere: botocore refuses to sign
    for k in CREDS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        err = error(base + ["--metadata_dir", "s3://pool/pool", "--save_path", str(tmp_path / "b.npy")])
        assert "credentials" in err.lower()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_ray_on_two_nodes_reads_the_pool_from_s3(s3, tmp_path) -> None:
    """A Ray cluster of two nodes (Ray's own cluster utilities, on this machine): every task reads its shard
    from the bucket and returns its result through Ray; VAS-D's candidates travel as Ray objects. The
    subsets equal the local executor's."""
    with two_node_ray() as address:
        for name in ("clip_score", "vas_d"):
            local = filter_pool(s3["local"] / "pool", tmp_path / f"{name}-local.npy", name, quiet=True, **CASES[name])
            remote = filter_pool(s3["pool"], tmp_path / f"{name}-ray.npy", name, quiet=True, executor="ray",
                                 ray_address=address, **CASES[name])
            assert np.array_equal(np.asarray(local.uids), np.asarray(remote.uids))
            assert (tmp_path / f"{name}-local.npy").read_bytes() == (tmp_path / f"{name}-ray.npy").read_bytes()


@contextlib.contextmanager
def two_node_ray():
    """A Ray cluster of two one-CPU nodes (Ray's cluster utilities) whose workers reach the S3 server; its
    address, the driver connected."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {storage.ENV: os.environ[storage.ENV], **CREDS}})
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_target_and_given_uids_as_urls(s3, tmp_path, monkeypatch) -> None:
    """Small inputs given as URLs are fetched once (keyed by ETag) and give the local run's subset; a changed
    object is fetched again and replaces the cached copy (one copy per URL)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fs = s3["fs"]
    local_target = s3["local"] / "files" / "variance" / "variance_imagenet_1k.npy"
    fs.put_file(str(local_target), "pool/inputs/target.npy")
    given = tmp_path / "given.npy"
    every = filter_pool(s3["local"] / "pool", None, "no_filter", quiet=True).uids
    np.save(given, np.asarray(every)[::2])
    fs.put_file(str(given), "pool/inputs/given.npy")
    opts = {"arch": "l14", "fraction": 0.5, "fraction_vas": 0.3}
    local = filter_pool(s3["local"] / "pool", tmp_path / "l.npy", "vas", target=str(local_target),
                        given_uids_path=str(given), quiet=True, **opts)
    remote = filter_pool(s3["pool"], tmp_path / "r.npy", "vas", target="s3://pool/inputs/target.npy",
                         given_uids_path="s3://pool/inputs/given.npy", quiet=True, **opts)
    assert np.array_equal(np.asarray(local.uids), np.asarray(remote.uids)) and len(remote.uids) > 0
    cached = tmp_path / "cache" / "varalign" / "inputs"
    assert sorted(len(list(d.iterdir())) for d in cached.iterdir()) == [1, 1]  # target and given, once each
    np.save(given, np.asarray(every)[::3])
    fs.put_file(str(given), "pool/inputs/given.npy")
    local = filter_pool(s3["local"] / "pool", tmp_path / "l3.npy", "vas", target=str(local_target),
                        given_uids_path=str(given), quiet=True, **opts)
    remote = filter_pool(s3["pool"], tmp_path / "r3.npy", "vas", target="s3://pool/inputs/target.npy",
                         given_uids_path="s3://pool/inputs/given.npy", quiet=True, **opts)
    assert np.array_equal(np.asarray(local.uids), np.asarray(remote.uids))
    assert sorted(len(list(d.iterdir())) for d in cached.iterdir()) == [1, 1]  # the old version's copy went


def test_target_from_a_pool_in_s3_to_s3(s3, tmp_path) -> None:
    from varalign.target import build_target

    local = build_target([s3["local"] / "pool"], tmp_path / "t.npy", quiet=True)
    remote = build_target([s3["pool"]], "s3://out/targets/t.npy", quiet=True)
    assert local["rows"] == remote["rows"] == 3000
    assert s3["fs"].cat_file("out/targets/t.npy") == (tmp_path / "t.npy").read_bytes()
    assert s3["fs"].exists("out/targets/t.manifest.json")


def test_storage_errors_classified_by_type_before_text() -> None:
    """A typed error decides (a dropped connection is a storage error whatever numbers its message holds);
    an untyped one is read for an S3 error code or HTTP status as a whole word."""
    class ReadTimeoutError(Exception):  # botocore's and aiohttp's transient errors are named like this
        pass

    class NoCredentialsError(Exception):
        pass

    url = "s3://b/k"
    cases = {ConnectionResetError("reset by peer after 404 bytes"): "storage error",
             ReadTimeoutError("read timeout on 403.example after 404 ms"): "storage error",
             FileNotFoundError("b/k"): "not found", PermissionError("AccessDenied"): "permission denied",
             NoCredentialsError("Unable to locate credentials"): "no usable credentials",
             OSError("An error occurred (NoSuchBucket)"): "not found",
             OSError("HTTP 403 Forbidden"): "permission denied",
             OSError("SignatureDoesNotMatch"): "no usable credentials",
             OSError("wrote 14040 of 14041 bytes"): "storage error"}
    # botocore's own exceptions, and s3fs's translation of a ClientError (a PermissionError whose cause holds
    # the service's code): a wrong key or an expired token is a credentials problem, AccessDenied a refusal
    exceptions = pytest.importorskip("botocore.exceptions")
    s3errors = pytest.importorskip("s3fs.errors")

    def client_error(code: str, message: str):
        return exceptions.ClientError({"Error": {"Code": code, "Message": message},
                                       "ResponseMetadata": {"HTTPStatusCode": 403}}, "GetObject")

    cases |= {exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:9/403"): "storage error",
              exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9"): "storage error",
              exceptions.NoCredentialsError(): "no usable credentials",
              s3errors.translate_boto_error(client_error("InvalidAccessKeyId", "The AWS Access Key Id you provided "
                                                         "does not exist in our records.")): "no usable credentials",
              s3errors.translate_boto_error(client_error("ExpiredToken", "The provided token has expired.")):
                  "no usable credentials",
              s3errors.translate_boto_error(client_error("AccessDenied", "Access Denied")): "permission denied",
              s3errors.translate_boto_error(client_error("NoSuchKey", "The specified key does not exist.")):
                  "not found"}
    try:  # raised `from None` while handling an expired token: the suppressed context is not its reason
        try:
            raise client_error("ExpiredToken", "The provided token has expired.")
        except exceptions.ClientError:
            raise FileNotFoundError("b/k") from None
    except FileNotFoundError as exc:
        cases[exc] = "not found"
    try:  # raised inside the handler without a cause (as some s3fs paths do): the context's code counts
        try:
            raise client_error("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist.")
        except exceptions.ClientError:
            raise PermissionError("Forbidden")  # noqa: B904
    except PermissionError as exc:
        cases[exc] = "no usable credentials"
    for exc, reason in cases.items():
        err = storage.remote_error(exc, url)
        assert err.reason.startswith(reason), (exc, err.reason)
        assert url in str(err) and len(str(err).splitlines()) == 1


def test_pending_manifest_put_failing_on_the_way_replaces_no_output(s3, tmp_path, capsys, monkeypatch) -> None:
    """The first put (the pending manifest) stores its object, then the connection drops: the error says no
    output was replaced (not that nothing was written), no output object exists, and the same command then
    finishes the whole result over the stray pending manifest."""
    fs = s3["fs"]
    prefix = "out/dropped"
    argv = ["filter", "--name", "clip_score", "--metadata_dir", s3["pool"], "--save_path", f"s3://{prefix}/s.npy",
            "--arch", "l14", "--fraction", "0.3", "--quiet"]
    real_put = storage.put_file

    def put_then_drop(local_path: str, url: str) -> None:
        real_put(local_path, url)
        if url.endswith(".pending"):
            raise storage.remote_error(ConnectionResetError("Connection reset by peer after 404 bytes"), url)

    monkeypatch.setattr(storage, "put_file", put_then_drop)
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"s3://{prefix}/s.npy" in err, err
    assert "no output was replaced" in err and "nothing was written" not in err, err
    fs.invalidate_cache()
    assert fs.exists(f"{prefix}/.s.manifest.json.pending") and not fs.exists(f"{prefix}/s.npy")
    monkeypatch.setattr(storage, "put_file", real_put)
    assert main(argv) == 0
    fs.invalidate_cache()
    filter_pool(s3["local"] / "pool", tmp_path / "l.npy", "clip_score", arch="l14", fraction=0.3, quiet=True)
    assert fs.cat_file(f"{prefix}/s.npy") == (tmp_path / "l.npy").read_bytes()
    assert fs.exists(f"{prefix}/s.manifest.json") and not fs.exists(f"{prefix}/.s.manifest.json.pending")
