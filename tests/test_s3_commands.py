"""target, report, reshard, embed and download with their inputs and outputs in object storage (moto's S3
server on 127.0.0.1, the `s3` fixture of test_s3.py): the local run's outputs, whole objects, one-line errors."""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("moto.server", reason="moto[server] is part of the test extra")
s3fs = pytest.importorskip("s3fs", reason="s3fs is part of the test extra")

from test_s3 import s3, two_node_ray  # noqa: E402, F401 - the module's S3 server, the synthetic pool uploaded

from varalign import filter_pool, storage  # noqa: E402
from varalign.cli import main  # noqa: E402


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("varalign: error: "), err
    return err


# ---- target --------------------------------------------------------------------------------------

def test_target_takes_storage_options(s3, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    """The endpoint comes from --storage_options alone (nothing configured before the command)."""
    saved = storage.options()
    monkeypatch.setattr(storage, "_options", None)
    monkeypatch.delenv(storage.ENV)
    try:
        assert main(["target", s3["pool"], "--save_path", "s3://out/targets/opt.npy", "--quiet",
                     "--storage_options", json.dumps({"client_kwargs": {"endpoint_url": s3["endpoint"]}})]) == 0
        assert main(["target", str(s3["local"] / "pool"), "--save_path", str(tmp_path / "t.npy"), "--quiet"]) == 0
        assert s3["fs"].cat_file("out/targets/opt.npy") == (tmp_path / "t.npy").read_bytes()
        err = one_line_error(["target", s3["pool"], "--save_path", str(tmp_path / "u.npy"), "--storage_options",
                              "{not json"], capsys)
        assert "--storage_options" in err
    finally:
        storage.configure(saved)


# ---- report --------------------------------------------------------------------------------------

def _normalized(page: str, *pairs: tuple[str, str]) -> str:
    for remote, here in pairs:
        page = page.replace(remote, here)
    page = re.sub(r'<meta name="varalign-sha256" content="[0-9a-f]{64}">', "SEAL", page)  # differs with the text
    return re.sub(r"generated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "generated T", page)


def test_report_reads_and_writes_urls(s3, tmp_path, capsys) -> None:  # noqa: F811
    fs, pool = s3["fs"], str(s3["local"] / "pool")
    local = tmp_path / "sel"
    filter_pool(pool, local / "cs.npy", "clip_score", arch="l14", fraction=0.3, quiet=True,
                save_scores=str(local / "cs_scores.parquet"))
    for name in ("cs.npy", "cs.manifest.json", "cs_scores.parquet"):
        fs.put_file(str(local / name), f"out/report/sel/{name}")
    assert main(["report", "--metadata_dir", pool, "--selections", str(local / "cs.npy"), "--scores",
                 str(local / "cs_scores.parquet"), "--output", str(tmp_path / "r.html")]) == 0
    argv = ["report", "--metadata_dir", s3["pool"], "--selections", "s3://out/report/sel/cs.npy", "--scores",
            "s3://out/report/sel/cs_scores.parquet", "--output", "s3://out/report/r.html"]
    assert main(argv) == 0
    remote = fs.cat_file("out/report/r.html").decode()
    pairs = (("s3://out/report/sel", str(local)), (s3["pool"], pool))
    assert _normalized(remote, *pairs) == _normalized((tmp_path / "r.html").read_text(), *pairs)
    assert fs.ls("out/report", detail=False) == ["out/report/r.html", "out/report/sel"]  # no temp object left
    assert main(argv) == 0  # our own report is replaced; anything else is not
    fs.pipe_file("out/report/mine.html", b"<html>not varalign's</html>")
    err = one_line_error(argv[:-1] + ["s3://out/report/mine.html"], capsys)
    assert "s3://out/report/mine.html" in err and "not a varalign report" in err
    assert fs.cat_file("out/report/mine.html") == b"<html>not varalign's</html>"


def test_report_finds_the_scores_a_remote_manifest_names(s3, tmp_path, capsys) -> None:  # noqa: F811
    out = "s3://out/report2/cs.npy"
    filter_pool(s3["pool"], out, "clip_score", arch="l14", fraction=0.3, quiet=True,
                save_scores="s3://out/report2/cs_scores.parquet")
    assert main(["report", "--metadata_dir", s3["pool"], "--selections", out, "--output",
                 str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "no per-sample scores" not in page and page.count("<svg") == 1 and "Highest" in page
    err = one_line_error(["report", "--metadata_dir", "s3://no-such-bucket/pool", "--selections", out,
                          "--output", str(tmp_path / "x.html")], capsys)
    assert "s3://no-such-bucket/pool" in err
    err = one_line_error(["report", "--metadata_dir", s3["pool"], "--selections", out,
                          "--output", "s3://no-such-bucket/x.html"], capsys)
    assert "no-such-bucket" in err and "not found" in err
    assert not Path(tmp_path / "x.html").exists()


# ---- reshard -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(s3, tmp_path_factory):  # noqa: F811
    """60 webdataset samples in 3 tars, in the bucket at s3://pool/shards, and a subset of 25 (one uid twice)."""
    from experiment_data import fake_uid, make_subset, make_train_shards

    root = tmp_path_factory.mktemp("shards")
    make_train_shards(root / "in", n=60, per_shard=20)
    uids = [fake_uid(i) for i in range(60)]
    make_subset(root / "s.npy", uids[3:20] + uids[41:47] + [uids[50]] * 2 + ["f" * 32])
    s3["fs"].put(str(root / "in") + "/", "pool/shards/", recursive=True)
    s3["fs"].put_file(str(root / "s.npy"), "pool/subsets/s.npy")
    return root


def _reshard_argv(i: str, o: str, s: str, *extra: str) -> list[str]:
    return ["reshard", "-i", i, "-o", o, "-s", s, "--shard-size", "8", "-j", "2", "-q", *extra]


def test_reshard_from_and_to_urls(s3, shards, tmp_path, capsys, monkeypatch) -> None:  # noqa: F811
    fs = s3["fs"]
    assert main(_reshard_argv(str(shards / "in"), str(tmp_path / "local"), str(shards / "s.npy"))) == 0
    local = sorted(p.name for p in (tmp_path / "local").iterdir())
    argv = _reshard_argv("s3://pool/shards", "s3://out/resharded", "s3://pool/subsets/s.npy")
    monkeypatch.setattr(storage, "move", _fail)  # every shard uploaded, then the run dies: none under its name
    with pytest.raises(RuntimeError):
        main(argv)
    assert not [n for n in fs.ls("out/resharded", detail=False) if n.endswith((".tar", "_stats.json", "meta.json"))]
    monkeypatch.undo()
    assert main(argv) == 0  # the same command resumes the unfinished reshard (its marker, no meta.json)
    assert main(argv) == 1 and "pass --overwrite" in capsys.readouterr().err  # now a finished one: not replaced
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(n.rsplit("/", 1)[-1] for n in fs.ls("out/resharded", detail=False)) == local
    for name in local:  # the same bytes; the stats name their input shards (URLs here)
        here, there = (tmp_path / "local" / name).read_bytes(), fs.cat_file(f"out/resharded/{name}")
        if name.endswith("_stats.json"):
            here, there = (json.loads(here.replace(str(shards / "in").encode(), b"s3://pool/shards")),
                           json.loads(there))
        if name != "meta.json":
            assert here == there, name
    meta = json.loads(fs.cat_file("out/resharded/meta.json"))
    want = json.loads((tmp_path / "local" / "meta.json").read_text())
    for key in ("input_samples", "output_samples", "output_shard_count", "not_found", "found_unique"):
        assert meta[key] == want[key], key
    assert meta["output_samples"] == 25 and meta["args"]["input_dir"] == "s3://pool/shards"


class _NoSharedFiles:
    """An executor whose tasks cannot read the driver's files, as on a cluster without a shared filesystem:
    the driver's work directory is moved away while each task runs (results come back as on Ray)."""

    name, shared_filesystem, num_workers = "no-shared-fs", False, 1

    def __init__(self, hide: Path) -> None:
        self.hide, self.calls = hide, 0

    def put(self, obj):
        return obj

    def map(self, fn, tasks, desc, quiet=False, on_result=None, bar=None):
        self.tasks = [*getattr(self, "tasks", []), *tasks]
        out = []
        for i, task in enumerate(tasks):
            away = self.hide.with_name(self.hide.name + ".away")
            self.hide.rename(away)
            try:
                out.append(fn(*task))
            finally:
                away.rename(self.hide)
            self.calls += 1
            if on_result is not None:
                on_result(i, out[-1])
        return out


def test_reshard_tasks_need_no_shared_filesystem(s3, shards, tmp_path, monkeypatch) -> None:  # noqa: F811
    """URL in, URL out: no task of either pass reads the driver's work directory (the subset and each
    shard's index travel with the tasks); the output equals the local run's."""
    rs = importlib.import_module("varalign.experiment.reshard")  # the module (the package exports the function)
    fs = s3["fs"]
    assert main(_reshard_argv(str(shards / "in"), str(tmp_path / "local"), str(shards / "s.npy"))) == 0
    executors = []

    def make(name, workers, address, processes=False):
        executors.append(_NoSharedFiles(rs._work_root("s3://out/noshared")))
        return executors[-1]

    monkeypatch.setattr(rs, "make_executor", make)
    assert main(_reshard_argv("s3://pool/shards", "s3://out/noshared", "s3://pool/subsets/s.npy")) == 0
    assert executors and executors[0].calls == 3 + 4  # 3 input shards indexed, 25 samples in 4 shards of 8
    # the write jobs carry only their pieces' rows of the indexes: the 24 matched uids once, plus at most
    # one row repeated at each of the 3 boundaries between output shards
    rows = [len(piece[1]["uids"]) for (job,) in executors[0].tasks[3:] for piece in job[3]]
    assert 24 <= sum(rows) <= 24 + 3, rows
    for p in sorted((tmp_path / "local").glob("*.tar")):
        assert fs.cat_file(f"out/noshared/{p.name}") == p.read_bytes(), p.name


def test_reshard_with_ray_on_two_nodes(s3, shards, tmp_path) -> None:  # noqa: F811
    """`reshard --executor ray` from and to the bucket on a two-node Ray cluster (Ray's cluster utilities):
    the local run's shards, byte for byte."""
    fs = s3["fs"]
    assert main(_reshard_argv(str(shards / "in"), str(tmp_path / "local"), str(shards / "s.npy"))) == 0
    with two_node_ray() as address:
        assert main(_reshard_argv("s3://pool/shards", "s3://out/ray", "s3://pool/subsets/s.npy", "--executor", "ray",
                                  "--ray_address", address)) == 0
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert sorted(n.rsplit("/", 1)[-1] for n in fs.ls("out/ray", detail=False)) == names
    for p in sorted((tmp_path / "local").glob("*.tar")):
        assert fs.cat_file(f"out/ray/{p.name}") == p.read_bytes(), p.name


def _fail(*args, **kwargs):
    raise RuntimeError("killed before the shards were moved onto their names")


def test_reshard_never_touches_objects_it_did_not_write(s3, shards, capsys) -> None:  # noqa: F811
    fs = s3["fs"]
    fs.pipe_file("out/theirs/00000000.tar", b"not ours")
    argv = _reshard_argv("s3://pool/shards", "s3://out/theirs", "s3://pool/subsets/s.npy", "--overwrite")
    err = one_line_error(argv, capsys)
    assert "s3://out/theirs" in err and "holds no varalign reshard output" in err
    assert fs.cat_file("out/theirs/00000000.tar") == b"not ours"
    err = one_line_error(_reshard_argv("s3://pool/shards", "s3://no-such-bucket/o", "s3://pool/subsets/s.npy"),
                         capsys)
    assert "no-such-bucket" in err and "not found" in err
    err = one_line_error(_reshard_argv("s3://no-such-bucket/in", "s3://out/o", "s3://pool/subsets/s.npy"), capsys)
    assert "s3://no-such-bucket/in" in err


# ---- embed ---------------------------------------------------------------------------------------

def test_embed_from_and_to_urls(s3, shards, tmp_path, capsys) -> None:  # noqa: F811
    """The shards of s3://pool/shards embedded into s3://out/embedded: the local run's files, byte for byte."""
    pytest.importorskip("open_clip")
    pytest.importorskip("torch")
    fs = s3["fs"]
    model = ["--model", "varalign-tiny", "--random_init", "--arch", "b32", "--batch_size", "32", "--quiet"]
    assert main(["embed", str(shards / "in" / "00000000.tar"), str(shards / "in" / "00000001.tar"),
                 "--output_dir", str(tmp_path / "local"), *model]) == 0
    argv = ["embed", "s3://pool/shards/00000000.tar", "s3://pool/shards/00000001.tar", "--output_dir",
            "s3://out/embedded", *model]
    assert main(argv) == 0
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == ["00000000.npz", "00000000.parquet", "00000001.npz", "00000001.parquet", "embed.json"]
    assert sorted(n.rsplit("/", 1)[-1] for n in fs.ls("out/embedded", detail=False)) == names
    for name in names:
        assert fs.cat_file(f"out/embedded/{name}") == (tmp_path / "local" / name).read_bytes(), name
    capsys.readouterr()
    assert main(argv[:-1]) == 0 and "(2 reused)" in capsys.readouterr().out  # finished shards are reused
    # a run killed after its first shard, whose object is then replaced: the resumed run embeds it again
    import importlib

    emb = importlib.import_module("varalign.experiment.embed")
    real, calls = emb.write_npz, []

    def killed_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    killed = ["embed", *argv[1:3], "--output_dir", "s3://out/killed", *model]
    emb.write_npz = killed_on_second
    try:
        assert main(killed) != 0  # the CLI turns the interrupt into an exit status
    finally:
        emb.write_npz = real
    assert fs.exists("out/killed/00000000.npz") and not fs.exists("out/killed/00000001.npz")
    fs.pipe_file("out/killed/00000000.npz", (tmp_path / "local" / "00000001.npz").read_bytes())
    capsys.readouterr()
    assert main(killed) == 0 and "(0 reused)" in capsys.readouterr().out
    for name in names:
        assert fs.cat_file(f"out/killed/{name}") == (tmp_path / "local" / name).read_bytes(), name
    fs.pipe_file("out/notours/readme.txt", b"the user's")
    err = one_line_error(["embed", "s3://pool/shards", "--output_dir", "s3://out/notours", *model], capsys)
    assert "s3://out/notours" in err and "not empty" in err
    err = one_line_error(["embed", "s3://no-such-bucket/shards", "--output_dir", str(tmp_path / "x"), *model], capsys)
    assert "s3://no-such-bucket/shards" in err


# ---- download ------------------------------------------------------------------------------------

def test_download_into_and_from_urls(s3, tmp_path, capsys) -> None:  # noqa: F811
    """Metadata in the bucket, a subset's images written by img2dataset into s3://out/dl/shards: the samples
    and the report of the same download into a local folder."""
    pytest.importorskip("img2dataset", reason="the [download] extra")
    from test_download import ARGS, samples

    from varalign.download.servers import LocalServer, digit_images, encode, image_pool, write_metadata
    from varalign.uids import hex_to_uids, save_subset

    fs = s3["fs"]
    with LocalServer(max_seconds=300) as server:
        cols = image_pool(server, [encode(img) for img in digit_images(12, size=48, seed=5)], {3: "404"})
        write_metadata(cols, str(tmp_path / "metadata"), rows_per_file=6)
        save_subset(tmp_path / "sub.npy", hex_to_uids([cols["uid"][i] for i in (0, 2, 3, 7, 8, 11)]))
        fs.put(str(tmp_path / "metadata") + "/", "pool/dlmeta/", recursive=True)
        fs.put_file(str(tmp_path / "sub.npy"), "pool/dlsub.npy")
        assert main(["download", "--data_dir", str(tmp_path / "local"), "--metadata_dir", str(tmp_path / "metadata"),
                     "--subset", str(tmp_path / "sub.npy"), *ARGS, "--quiet"]) == 0
        assert main(["download", "--data_dir", "s3://out/dl", "--metadata_dir", "s3://pool/dlmeta",
                     "--subset", "s3://pool/dlsub.npy", *ARGS, "--quiet"]) == 0
    fs.get("out/dl/shards/", str(tmp_path / "remote") + "/", recursive=True)
    here, there = samples(tmp_path / "local" / "shards"), samples(tmp_path / "remote")
    assert len(here) == 5 and here == there
    reports = [json.loads((tmp_path / "local" / "download_report.json").read_text()),
               json.loads(fs.cat_file("out/dl/download_report.json"))]
    for key in ("outcomes", "urls", "shards", "subset"):
        assert reports[0][key] == reports[1][key] if key != "subset" else \
            reports[0][key]["in_pool"] == reports[1][key]["in_pool"]
    assert sorted(n.rsplit("/", 1)[-1] for n in fs.ls("out/dl", detail=False)) == ["download_report.json", "shards"]
    err = one_line_error(["download", "--data_dir", "s3://no-such-bucket/dl", "--metadata_dir", "s3://pool/dlmeta",
                          *ARGS, "--quiet"], capsys)
    assert "no-such-bucket" in err and "not found" in err


def test_download_metadata_from_the_hub_into_a_url(s3, synth_pool, tmp_path) -> None:  # noqa: F811
    """--skip_shards with --metadata_dir a URL: each Hub file uploaded as an object, the completion marker last;
    --storage_options through the command line (a fresh process)."""
    pytest.importorskip("huggingface_hub", reason="the [download] extra")
    import subprocess
    import sys

    from varalign.download.servers import LocalServer, add_hub_repo

    files = {p.name: p.read_bytes() for p in sorted((synth_pool / "pool").glob("*.parquet"))}
    with LocalServer(max_seconds=120) as hub:
        add_hub_repo(hub, "mlfoundations/datacomp_small", {**files, "README.md": b"# tiny"})
        env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"),
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
        env.pop(storage.ENV)
        out = subprocess.run([sys.executable, "-m", "varalign", "download", "--skip_shards", "--data_dir",
                              str(tmp_path / "d"), "--metadata_dir", "s3://out/hubmeta", "--no_verify_hash",
                              "--skip_bbox_blurring", "--storage_options", json.dumps(storage.options())],
                             env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    fs = s3["fs"]
    fs.invalidate_cache()
    got = {n.rsplit("/", 1)[-1]: fs.cat_file(n) for n in fs.ls("out/hubmeta", detail=False)}
    assert json.loads(got.pop(".varalign_metadata.json"))["files"] == sorted(files)
    assert got == files and "3 metadata files, 3,000 URLs" in out.stderr
    assert not list((tmp_path / "d").rglob("*.parquet"))  # each file removed here once uploaded


# ---- a permission error --------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _iam_user(iam, name: str, statements: list[dict]) -> dict[str, str]:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="p",
                        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def test_write_refused_by_the_policy_is_one_line_and_writes_nothing(synth_pool, tmp_path) -> None:
    """A moto server of its own that enforces IAM (INITIAL_NO_AUTH_ACTION_COUNT: the 6 IAM calls that make the
    two users are the only unauthenticated ones); the reader may get and list but not put."""
    import subprocess
    import sys
    import time
    import urllib.request

    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="6", AWS_ACCESS_KEY_ID="testing",
               AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "moto server did not start in 30 s"
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                           aws_secret_access_key="testing")
        admin = _iam_user(iam, "admin", [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}])
        # moto names HeadBucket's permission s3:HeadBucket (AWS: s3:ListBucket)
        reader = _iam_user(iam, "reader", [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:HeadBucket"], "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "*"}])
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=admin["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=admin["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket="perm-pool")
        for f in sorted((synth_pool / "pool").iterdir()):
            s3.upload_file(str(f), "perm-pool", f"pool/{f.name}")
        before = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="perm-pool")["Contents"])
        run = subprocess.run([sys.executable, "-m", "varalign", "filter", "--name", "clip_score", "--arch", "l14",
                              "--fraction", "0.3", "--metadata_dir", "s3://perm-pool/pool", "--save_path",
                              "s3://perm-pool/out.npy", "--quiet", "--storage_options",
                              json.dumps({"client_kwargs": {"endpoint_url": url}})],
                             env={k: v for k, v in {**env, **reader}.items() if k != storage.ENV},
                             capture_output=True, text=True, timeout=120)
        after = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="perm-pool")["Contents"])
        # a key the server does not know: the same 403 status, but the credentials are wrong, not the policy
        unknown = {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000", "AWS_SECRET_ACCESS_KEY": "x" * 40}
        bad_key = subprocess.run([sys.executable, "-m", "varalign", "filter", "--name", "clip_score", "--arch", "l14",
                                  "--fraction", "0.3", "--metadata_dir", "s3://perm-pool/pool", "--save_path",
                                  str(tmp_path / "local.npy"), "--quiet", "--storage_options",
                                  json.dumps({"client_kwargs": {"endpoint_url": url}})],
                                 env={k: v for k, v in {**env, **unknown}.items() if k != storage.ENV},
                                 capture_output=True, text=True, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    err = run.stderr.strip()
    assert run.returncode == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("varalign: error: s3://perm-pool/out.npy: ") and "permission denied" in err
    assert "Access Denied" in err and after == before  # nothing written, not even the pending manifest
    err = bad_key.stderr.strip()
    assert bad_key.returncode == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("varalign: error: s3://perm-pool/pool") and "no usable credentials (InvalidAccessKeyId" in err
    assert not (tmp_path / "local.npy").exists()
