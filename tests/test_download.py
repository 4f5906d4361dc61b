"""`varalign download` against servers on 127.0.0.1: images with injected faults, and a Hub endpoint
(HF_ENDPOINT) so huggingface_hub itself fetches the metadata. No internet."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("img2dataset", reason="the [download] extra")

from varalign.cli import main  # noqa: E402
from varalign.download import DownloadOptions, download  # noqa: E402
from varalign.download.servers import (  # noqa: E402
    LocalServer,
    add_hub_repo,
    digit_images,
    encode,
    image_pool,
    wait_until,
    write_metadata,
)
from varalign.experiment.train import train_data_pattern  # noqa: E402
from varalign.uids import hex_to_uids, save_subset  # noqa: E402

# rows 0-9 are shard 0: one fault each; row 9 is row 8's image without its face box
FAULTS = {1: "404", 2: "500_once", 3: "slow", 4: "hash", 5: "not_image", 6: "redirect", 7: "close", 12: "gate"}
FAILED = {1: "http_4xx", 2: "http_5xx", 3: "timeout", 4: "hash_mismatch", 5: "not_an_image", 7: "connection_error"}
FACE, TWIN, LARGE, N = 8, 9, 10, 30
BOX = [0.25, 0.25, 0.75, 0.75]
# small shards, one process, no in-pass retries (so --retry_failed has work), a 1 s timeout against a 3 s delay
ARGS = ["--processes_count", "1", "--thread_count", "4", "--retries", "0", "--timeout", "1",
        "--number_sample_per_shard", "10"]


@dataclass
class Pool:
    server: LocalServer
    metadata: Path
    uids: list[str]
    images: list[bytes]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    images = [encode(img) for img in digit_images(N, size=96, seed=3)]
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    images[FACE] = images[TWIN] = encode(noise, ".png")  # fine texture: a blur shows
    images[LARGE] = encode(np.kron(digit_images(1, size=96)[0], np.ones((25, 25, 1), np.uint8)))  # 2400 px wide
    with LocalServer(max_seconds=600) as server:
        server.gate.set()  # open: only the kill test closes it
        cols = image_pool(server, images, FAULTS, faces={FACE: [BOX]}, delay=3.0)
        root = tmp_path_factory.mktemp("pool")
        write_metadata(cols, str(root / "metadata"), rows_per_file=15)  # 2 files -> shards of 10, 5, 10, 5 rows
        yield Pool(server, root / "metadata", cols["uid"], images)


@pytest.fixture(scope="module")
def full(pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("full")
    shutil.copytree(pool.metadata, data / "metadata")
    assert main(["download", "--data_dir", str(data), *ARGS, "--quiet"]) == 0
    return data


def samples(shards: Path) -> dict[str, dict]:
    """uid -> {"json", "jpg", "txt", "shard"} over every tar."""
    out: dict[str, dict] = {}
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for parts in members.values():
            meta = json.loads(parts["json"])
            assert meta["uid"] not in out, f"uid {meta['uid']} twice"
            out[meta["uid"]] = {**parts, "json": meta, "shard": tar_path.stem}
    return out


def decode(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def report(data: Path) -> dict:
    return json.loads((data / "download_report.json").read_text())


def test_full_download_keeps_exactly_the_good_images(pool: Pool, full: Path) -> None:
    got = samples(full / "shards")
    assert set(got) == {u for i, u in enumerate(pool.uids) if i not in FAILED}
    rep = report(full)
    want = {"success": N - len(FAILED), **{v: 1 for v in FAILED.values()}}
    assert {k: v for k, v in rep["outcomes"].items() if v} == want
    assert rep["urls"] == N and rep["success_rate"] == pytest.approx((N - len(FAILED)) / N)
    assert rep["verify_hash"] is True and rep["incomplete_shards"] == []
    assert [(s["shard"], s["urls"], s["success"]) for s in rep["shards"]] == [
        ("00000000", 10, 4), ("00000001", 5, 5), ("00000002", 10, 10), ("00000003", 5, 5)]
    assert rep["retryable_left"] == 3  # the 500, the timeout, the dropped connection
    stats = json.loads((full / "shards" / "00000000_stats.json").read_text())  # img2dataset's own count
    assert stats["successes"] == rep["shards"][0]["success"]
    # what was written is what the server sent for the rows that passed, captions and uids included
    for i in (0, 11, 29):
        s = got[pool.uids[i]]
        assert s["txt"].decode() == f"a photo of the digit number {i % 10}"
        assert s["json"]["sha256"] == hashlib.sha256(pool.images[i]).hexdigest()
    # DataComp's layout, shards readable by `varalign train`
    assert sorted(p.name for p in full.iterdir()) == [".varalign-download", "download_report.json", "metadata",
                                                      "shards"]
    pattern, count = train_data_pattern(str(full / "shards"))
    assert pattern.endswith("{00000000..00000003}.tar") and count == N - len(FAILED)


def test_redirect_followed_and_large_image_resized(pool: Pool, full: Path) -> None:
    got = samples(full / "shards")
    moved = got[pool.uids[6]]
    assert moved["json"]["sha256"] == hashlib.sha256(pool.images[6]).hexdigest()
    big = got[pool.uids[LARGE]]["json"]
    assert (big["original_width"], big["width"]) == (2400, 512)
    assert decode(got[pool.uids[LARGE]]["jpg"]).shape[1] == 512
    assert pool.server.count("/moved/6.jpg") >= 1


def test_faces_blurred_where_face_bboxes_says(pool: Pool, full: Path) -> None:
    got = samples(full / "shards")
    face = decode(got[pool.uids[FACE]]["jpg"]).astype(np.float64)
    twin = decode(got[pool.uids[TWIN]]["jpg"]).astype(np.float64)  # same bytes, no face box
    inner = (slice(32, 64), slice(32, 64))  # inside the box, away from its blurred edge
    corner = (slice(0, 12), slice(0, 12))
    assert face[inner].std() < 0.5 * twin[inner].std()
    assert np.abs(face[corner] - twin[corner]).mean() < 8.0
    assert got[pool.uids[FACE]]["json"]["face_bboxes"] == [BOX]


def test_subset_only_downloads_its_uids(pool: Pool, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "subset"
    shutil.copytree(pool.metadata, data / "metadata")
    keep = [0, 4, 8, 15, 22]
    absent = ["0" * 31 + "1", "f" * 32]
    save_subset(tmp_path / "a.npy", hex_to_uids([pool.uids[i] for i in keep[:3]] + absent[:1]))
    save_subset(tmp_path / "b.npy", hex_to_uids([pool.uids[i] for i in keep[2:]] + absent[1:]))
    before = {i: pool.server.count(f"/img/{i}.jpg") for i in range(N)}
    assert main(["download", "--data_dir", str(data), *ARGS, "--subset", str(tmp_path / "a.npy"),
                 str(tmp_path / "b.npy"), "--no_verify_hash"]) == 0
    # row 4's bytes differ from its sha256: kept, since this run opted out of the check
    assert set(samples(data / "shards")) == {pool.uids[i] for i in keep}
    asked = {i for i in range(N) if pool.server.count(f"/img/{i}.jpg") > before[i]}
    assert asked == set(keep)
    rep = report(data)
    assert rep["verify_hash"] is False
    assert rep["subset"]["uids"] == 7 and rep["subset"]["in_pool"] == 5 and rep["subset"]["not_in_pool"] == 2
    assert rep["outcomes"]["success"] == 5 and rep["urls"] == 5
    out, err = capsys.readouterr()
    assert "subset: 5 of its 7 uids are in the pool (2 not in the pool)" in err
    assert "to download: 5 URLs, about " in err
    table = out.splitlines()
    assert table[2].split() == ["success", "5", "100.0%"] and table[4].split() == ["total", "5"]
    assert table[6].split()[:4] == ["shard", "pass", "URLs", "success"]
    assert table[8].split() == ["00000000", "main", "5", "100.0%"] and len(table) == 10  # + the report's path


def _group_alive(pgid: int) -> bool:
    """Any live (not zombie) process in process group `pgid`."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_kill_9_then_resume_gives_the_uninterrupted_result(pool: Pool, full: Path, tmp_path: Path) -> None:
    server = pool.server
    data = tmp_path / "killed"
    shutil.copytree(pool.metadata, data / "metadata")
    cmd = ["download", "--data_dir", str(data), *ARGS, "--quiet"]
    server.requests.clear()  # the 500-once row fails again, as in the uninterrupted run
    server.gate.clear()  # row 12 (shard 1) trickles until the gate opens
    proc = subprocess.Popen([sys.executable, "-m", "varalign", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        started = wait_until(lambda: (data / "shards" / "00000000_stats.json").exists()
                             and server.count("/img/12.jpg") > 0, timeout=120)
        assert started
        proc.send_signal(signal.SIGKILL)  # the varalign process only, as `kill -9 PID` does
        proc.wait(timeout=30)
        runner = int((data / ".varalign-download" / "runner.pid").read_text())
        assert wait_until(lambda: not _group_alive(runner), timeout=30)  # img2dataset's processes followed
    finally:
        server.gate.set()
        if proc.poll() is None:
            proc.kill()
    shards = data / "shards"
    assert (shards / "00000001.tar").exists() and not (shards / "00000001_stats.json").exists()
    first = (shards / "00000000.tar").stat()
    asked = dict(server.requests)
    assert main(cmd) == 0
    assert set(samples(shards)) == set(samples(full / "shards"))
    assert {k: v for k, v in report(data)["outcomes"].items()} == report(full)["outcomes"]
    # the finished shard was kept, and none of its URLs was fetched again
    assert (shards / "00000000.tar").stat().st_mtime_ns == first.st_mtime_ns
    assert all(server.count(f"/img/{i}.jpg") == asked.get(f"/img/{i}.jpg") for i in range(10))
    assert sorted(p.name for p in shards.iterdir() if not p.name.startswith("_")) == sorted(
        f"{i:08d}{ext}" for i in range(4) for ext in (".tar", ".parquet", "_stats.json"))


def test_retry_failed_fetches_only_retryable_failures(pool: Pool, full: Path, tmp_path: Path) -> None:
    data = tmp_path / "retry"
    shutil.copytree(full, data)
    server = pool.server
    server.requests["/img/2.jpg"] = max(1, server.requests["/img/2.jpg"])  # its one 500 is spent: 200 now
    before = dict(server.requests)
    assert main(["download", "--data_dir", str(data), *ARGS, "--retry_failed", "--quiet"]) == 0
    asked = {i for i in range(N) if server.count(f"/img/{i}.jpg") > before.get(f"/img/{i}.jpg", 0)}
    assert asked == {2, 3, 7}  # the 500, the timeout, the dropped connection; not the 404 or hash mismatch
    got = samples(data / "shards")  # asserts no uid twice
    assert set(got) == set(samples(full / "shards")) | {pool.uids[2]}
    assert got[pool.uids[2]]["shard"] == "00000004"
    rep = report(data)
    assert rep["outcomes"]["success"] == N - len(FAILED) + 1 and rep["outcomes"]["http_5xx"] == 0
    assert rep["outcomes"]["timeout"] == 1 and rep["retryable_left"] == 2
    assert [s["pass"] for s in rep["shards"]] == ["main"] * 4 + ["retry"]
    assert not (data / ".varalign-download" / "retry").exists()


def _hub_env(server: LocalServer, home: Path) -> dict:
    return dict(os.environ, HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0", HF_HOME=str(home),
                HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")


def test_metadata_from_a_hub_endpoint(pool: Pool, tmp_path: Path) -> None:
    files = {p.name: p.read_bytes() for p in sorted(pool.metadata.glob("*.parquet"))}
    files.update({n.replace(".parquet", ".npz"): b"npz bytes " + n.encode() for n in list(files)})
    files["README.md"] = b"# a tiny pool"
    with LocalServer(max_seconds=120) as hub:
        add_hub_repo(hub, "mlfoundations/datacomp_small", files)
        add_hub_repo(hub, "mlfoundations/datacomp_xlarge", {f"part_{i}/{n}": b for i, (n, b) in
                                                            enumerate(sorted(files.items())) if n.endswith(".parquet")})
        env = _hub_env(hub, tmp_path / "hf_home")
        run = [sys.executable, "-m", "varalign", "download", "--skip_shards"]
        out = subprocess.run([*run, "--data_dir", str(tmp_path / "s"), "--download_npz"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        meta = tmp_path / "s" / "metadata"
        got = {p.name: p.read_bytes() for p in meta.iterdir() if p.is_file() and not p.name.startswith(".")}
        assert got == {n: b for n, b in files.items() if n != "README.md"}
        assert "2 metadata files, 30 URLs" in out.stderr
        assert not (tmp_path / "s" / ".varalign-download" / "hf").exists()
        calls = sum(hub.requests.values())
        again = subprocess.run([*run, "--data_dir", str(tmp_path / "s")], env=env, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0 and sum(hub.requests.values()) == calls  # complete: the Hub is not asked
        out = subprocess.run([*run, "--data_dir", str(tmp_path / "x"), "--scale", "xlarge"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert sorted(p.name for p in (tmp_path / "x" / "metadata").iterdir() if not p.name.startswith(".")) == [
            "00000000.parquet", "00000001.parquet"]  # part_* folders flattened, as DataComp does
        out = subprocess.run([*run, "--data_dir", str(tmp_path / "m"), "--scale", "medium"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot download the metadata from" in lines[0] and "datacomp_medium" in lines[0]


def _error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(["download", *args, *ARGS, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("varalign: error: ")
    return err[0]


def test_bad_inputs_fail_in_one_line(pool: Pool, full: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "d"
    (data / "metadata").mkdir(parents=True)
    (data / "metadata" / "00000000.parquet").write_bytes(b"not parquet at all")
    assert "00000000.parquet: not a readable parquet file" in _error(["--data_dir", str(data)], capsys)
    table = pq.read_table(pool.metadata / "00000000.parquet").drop_columns(["sha256"])
    pq.write_table(table, data / "metadata" / "00000000.parquet")
    assert "missing column(s) sha256" in _error(["--data_dir", str(data)], capsys)
    assert "--no_verify_hash" in _error(["--data_dir", str(data)], capsys)
    bad = tmp_path / "notes.npy"
    bad.write_bytes(b"uids!\n")
    msg = _error(["--data_dir", str(data), "--no_verify_hash", "--subset", str(bad)], capsys)
    assert f"{bad}: not a uid subset file" in msg
    save_subset(tmp_path / "elsewhere.npy", hex_to_uids(["ab" * 16]))
    msg = _error(["--data_dir", str(data), "--no_verify_hash", "--subset", str(tmp_path / "elsewhere.npy")], capsys)
    assert "none of the subset's 1 uids is in the pool" in msg
    (tmp_path / "file").write_text("x")
    assert "is a file" in _error(["--data_dir", str(tmp_path / "file")], capsys)
    assert not (data / "shards").exists()
    # a shards folder varalign did not write is left alone
    other = tmp_path / "other"
    shutil.copytree(pool.metadata, other / "metadata")
    (other / "shards").mkdir()
    (other / "shards" / "00000000.tar").write_bytes(b"someone's shard")
    assert "did not write" in _error(["--data_dir", str(other)], capsys)
    assert (other / "shards" / "00000000.tar").read_bytes() == b"someone's shard"
    # a started download keeps its settings; the finished shards are untouched
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (full / "shards").iterdir())
    assert "--image_size changed: 512 -> 256" in _error(["--data_dir", str(full), "--image_size", "256"], capsys)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (full / "shards").iterdir()) == before


def test_refuses_when_the_disk_looks_too_small(pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import varalign.download.run as run

    monkeypatch.setattr(run.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    data = tmp_path / "tiny"
    shutil.copytree(pool.metadata, data / "metadata")
    with pytest.raises(run.VaralignError, match=r"not enough disk space: about [\d.]+ KB needed, 1.0 KB free"):
        download(DownloadOptions(data_dir=str(data), quiet=True, number_sample_per_shard=10))
    assert not (data / "shards").exists()
    run._check_disk(DownloadOptions(data_dir=str(data), quiet=True, force=True), data, 30, 10**6)  # --force: go on


def test_outcome_classification() -> None:
    from varalign.download.outcomes import classify

    cases = {("success", None): "success", ("failed_to_download", "HTTP Error 404: Not Found"): "http_4xx",
             ("failed_to_download", "HTTP Error 503: Service Unavailable"): "http_5xx",
             ("failed_to_download", "<urlopen error timed out>"): "timeout",
             ("failed_to_download", "The read operation timed out"): "timeout",
             ("failed_to_download", "<urlopen error [Errno 111] Connection refused>"): "connection_error",
             ("failed_to_download", "<urlopen error [Errno -2] Name or service not known>"): "connection_error",
             ("failed_to_download", "Remote end closed connection without response"): "connection_error",
             ("failed_to_download", "hash mismatch"): "hash_mismatch",
             ("failed_to_download", "<urlopen error [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed>"):
                 "other",
             ("failed_to_download", "Use of image disallowed by X-Robots-Tag directive"): "disallowed",
             ("failed_to_resize", "Image decoding error"): "not_an_image",
             ("failed_to_resize", "image too small"): "failed_resize"}
    assert {k: classify(*k) for k in cases} == cases



def test_a_users_download_report_is_never_replaced(pool: Pool, full: Path, tmp_path: Path, capsys) -> None:
    """A download_report.json varalign did not write stops the run before any work, untouched; the one an
    earlier download wrote is replaced (the re-run over `full`)."""
    data = tmp_path / "data"
    shutil.copytree(pool.metadata, data / "metadata")
    (data / "download_report.json").write_text('{"mine": true}\n')
    assert main(["download", "--data_dir", str(data), *ARGS, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "is not a varalign download_report.json: not overwritten" in err and err.count("\n") == 1
    assert (data / "download_report.json").read_text() == '{"mine": true}\n' and not (data / "shards").exists()
    before = report(full)
    assert main(["download", "--data_dir", str(full), *ARGS, "--quiet"]) == 0
    assert report(full)["settings"] == before["settings"]
