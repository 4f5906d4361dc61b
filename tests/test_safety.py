"""Never lose a user's data: ownership of the work directory, outputs that would clobber inputs,
group-atomic outputs (a kill between any two renames), concurrent runs, I/O faults, deflate bombs,
and option validation. Every refusal is one line naming the file, exit 1, and nothing touched."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from varalign import VaralignError, filter_pool
from varalign.atomic import manifest_path
from varalign.cli import main
from varalign.guard import lock, lock_file_for
from varalign.synth import make_pool, make_target
from varalign.workdir import MARKER


@pytest.fixture(scope="module")
def pool_src(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    make_pool(root / "pool", num_samples=4000, num_shards=4, seed=5)
    make_target(root / "target.npy", seed=5, n=500)
    return root


@pytest.fixture
def ws(pool_src: Path, tmp_path: Path) -> Path:
    """A private copy of the pool and target (tests may break them)."""
    shutil.copytree(pool_src / "pool", tmp_path / "pool")
    shutil.copy(pool_src / "target.npy", tmp_path / "target.npy")
    return tmp_path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, *names: str) -> str:
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("varalign: error: "), err
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def _vas(ws: Path, out: Path, *extra: str) -> list[str]:
    return ["filter", "--name", "vas", "--metadata_dir", str(ws / "pool"), "--save_path", str(out), "--arch", "l14",
            "--fraction", "0.5", "--fraction_vas", "0.3", "--target", str(ws / "target.npy"), "--num_workers", "1",
            "--quiet", *extra]


def _no_hidden_leftovers(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".lock", ".pending"))
            or "varalign-work" in p.name]
    assert left == [], left


# ----------------------------------------------------------------------------- ownership of the work dir


@pytest.mark.parametrize("where", ["pool", "users_folder", "output_folder", "target_folder"])
def test_work_dir_that_holds_data_is_refused_and_nothing_is_touched(ws: Path, capsys, where: str) -> None:
    users = ws / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("precious")
    out = ws / "out" / "s.npy"
    out.parent.mkdir()
    work = {"pool": ws / "pool", "users_folder": users, "output_folder": out.parent, "target_folder": ws}[where]
    before = _snapshot(ws)
    code, err = _cli(_vas(ws, out, "--work_dir", str(work)), capsys)
    _one_line_error(code, err, work)
    assert _snapshot(ws) == before  # not one byte changed, nothing created


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/fd: Linux")
def test_removed_work_files_are_not_held_open(ws: Path, capsys) -> None:
    """After a run, no file of its (removed) work directory is still open in the process: the disk space of
    its pool-wide arrays is given back at once, not when the garbage collector gets to a reference cycle
    (a process running many filters: the demo, minicomp, the Python API)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        for i in range(2):
            code, err = _cli(_vas(ws, ws / f"s{i}.npy", "--work_dir", str(ws / f"w{i}")), capsys)
            assert code == 0, err
        held = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if str(ws) in target or "varalign-work" in target:
                    held.append(target)
    finally:
        gc.enable()
    assert not (ws / "w0").exists() and held == [], held


def test_user_given_empty_work_dir_is_emptied_not_removed(ws: Path, capsys) -> None:
    work = ws / "work"
    work.mkdir()
    code, err = _cli(_vas(ws, ws / "s.npy", "--work_dir", str(work)), capsys)
    assert code == 0, err
    assert work.is_dir() and list(work.iterdir()) == []


def test_new_work_dir_is_removed_and_marked_while_it_lives(ws: Path, capsys) -> None:
    work = ws / "w"
    code, err = _cli(_vas(ws, ws / "s.npy", "--work_dir", str(work), "--keep_work_dir"), capsys)
    assert code == 0, err
    marker = json.loads((work / MARKER).read_text())
    assert marker["tool"] == "varalign" and len(marker["token"]) == 16
    code, err = _cli(_vas(ws, ws / "t.npy", "--work_dir", str(work)), capsys)  # reused, then removed
    assert code == 0, err
    assert not work.exists()


def test_work_dir_whose_marker_was_replaced_is_not_removed(ws: Path) -> None:
    from varalign.workdir import WorkDir

    w = WorkDir(ws / "w", "plan")
    (ws / "w" / MARKER).write_text(json.dumps({"tool": "varalign", "token": "someone else"}))
    with pytest.raises(VaralignError, match="marker changed"):
        w.remove()
    assert (ws / "w").exists()


# ----------------------------------------------------------------------------- outputs against inputs


def _collisions(ws: Path) -> dict[str, tuple[list[str], Path]]:
    shard = ws / "pool" / "00000000.parquet"
    given = ws / "given.npy"
    return {
        "save_path_is_a_shard": (["--save_path", str(shard)], shard),
        "save_path_is_the_target": (["--save_path", str(ws / "target.npy")], ws / "target.npy"),
        "save_path_is_given_uids": (["--save_path", str(given), "--given_uids_path", str(given)], given),
        "scores_is_save_path": (["--save_scores", str(ws / "s.npy")], ws / "s.npy"),
        "scores_is_the_manifest": (["--save_scores", str(ws / "s.manifest.json")], ws / "s.manifest.json"),
        "scores_inside_the_pool": (["--save_scores", str(ws / "pool" / "scores.parquet")],
                                   ws / "pool" / "scores.parquet"),
        "symlink_to_the_target": (["--save_path", str(ws / "link.npy")], ws / "link.npy"),
        "hard_link_to_a_shard": (["--save_path", str(ws / "hard.npy")], ws / "hard.npy"),
    }


@pytest.mark.parametrize("case", list(_collisions(Path("/x"))))
def test_output_that_is_an_input_or_another_output_is_refused(ws: Path, capsys, case: str) -> None:
    from varalign.uids import save_subset

    flags, named = _collisions(ws)[case]
    subset = filter_pool(ws / "pool", None, "clip_score", arch="l14", fraction=0.8, quiet=True).uids
    save_subset(ws / "given.npy", subset)
    (ws / "link.npy").symlink_to(ws / "target.npy")
    os.link(sorted((ws / "pool").glob("*.npz"))[0], ws / "hard.npy")
    argv = _vas(ws, ws / "s.npy")
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    before = _snapshot(ws)
    code, err = _cli(argv, capsys)
    _one_line_error(code, err, named)
    assert _snapshot(ws) == before


def test_existing_file_varalign_did_not_write_is_not_overwritten(ws: Path, capsys) -> None:
    out = ws / "s.npy"
    out.write_bytes(b"the user's own file")
    code, err = _cli(_vas(ws, out), capsys)
    _one_line_error(code, err, out, "--overwrite")
    assert out.read_bytes() == b"the user's own file"
    code, err = _cli(_vas(ws, out, "--overwrite"), capsys)
    assert code == 0, err
    assert np.load(out).dtype.names == ("f0", "f1")


# ----------------------------------------------------------------------------- up to date means verified


def test_changed_output_is_never_trusted_as_up_to_date(ws: Path, capsys) -> None:
    out = ws / "s.npy"
    assert _cli(_vas(ws, out), capsys)[0] == 0
    good = out.read_bytes()
    capsys.readouterr()
    assert main(_vas(ws, out)) == 0 and out.read_bytes() == good
    assert "(up to date: nothing redone)" in capsys.readouterr().out  # said even with --quiet
    out.write_bytes(good[: len(good) // 2])  # truncated behind varalign's back
    code, err = _cli(_vas(ws, out), capsys)
    _one_line_error(code, err, out)  # not "up to date", and not silently replaced
    assert _cli(_vas(ws, out, "--overwrite"), capsys)[0] == 0
    assert out.read_bytes() == good


def test_outputs_with_the_same_stem_have_their_own_manifests(ws: Path) -> None:
    a, b = ws / "x.npy", ws / "x.bin"
    filter_pool(ws / "pool", a, "clip_score", arch="l14", fraction=0.3, quiet=True)
    filter_pool(ws / "pool", b, "clip_score", arch="l14", fraction=0.5, quiet=True)
    assert manifest_path(a) != manifest_path(b)
    for out, frac in ((a, 0.3), (b, 0.5)):
        m = json.loads(manifest_path(out).read_text())
        assert m["options"]["fraction"] == frac and str(out.absolute()) in m["files"]


def test_output_whose_manifest_name_another_output_holds_is_refused(ws: Path, capsys) -> None:
    """`--save_path x` after `--save_path x.npy`: both would use x.manifest.json. The second is refused (even
    with --overwrite) while x.npy is there, so x.npy keeps its manifest; once it is moved away, it runs."""
    a, b = ws / "x.npy", ws / "x"
    assert manifest_path(a) == manifest_path(b)
    assert _cli(_vas(ws, a), capsys)[0] == 0
    before = _snapshot(ws)
    for extra in ((), ("--overwrite",)):
        code, err = _cli(_vas(ws, b, *extra), capsys)
        _one_line_error(code, err, manifest_path(a), "x.npy")
        assert "manifest of another varalign output" in err
        assert _snapshot(ws) == before
    assert _cli(_vas(ws, a), capsys)[0] == 0  # x.npy itself is still up to date with its own manifest
    (ws / "sub").mkdir()
    assert _cli(_vas(ws, ws / "sub" / ".." / "x.npy"), capsys)[0] == 0  # the same file spelled otherwise
    (ws / "link").symlink_to(ws, target_is_directory=True)
    assert _cli(_vas(ws, ws / "link" / "x.npy"), capsys)[0] == 0  # or reached through a symlinked folder
    (ws / "copy").mkdir()
    for name in ("x.npy", "x.manifest.json"):  # a copy of the output with its manifest: re-run there
        shutil.copy(ws / name, ws / "copy" / name)
    assert _cli(_vas(ws, ws / "copy" / "x.npy", "--overwrite"), capsys)[0] == 0
    (ws / "moved").mkdir()
    a.rename(ws / "moved" / "x.npy")
    assert _cli(_vas(ws, b), capsys)[0] == 0
    assert str(b.absolute()) in json.loads(manifest_path(b).read_text())["files"]


# ----------------------------------------------------------------------------- a kill between renames

_KILL_AT = textwrap.dedent("""
    import os, signal, sys
    import varalign.atomic as atomic
    n, calls, real = int(sys.argv[1]), [0], os.replace
    def replace(a, b):
        if str(b).endswith((".npy", ".parquet", ".json", ".pending")) and "-work" not in str(b):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)
    atomic.os.replace = replace
    from varalign.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4])
def test_kill_between_any_two_renames(ws: Path, kill_at: int) -> None:
    """Commit = pending manifest, scores, subset, manifest (4 renames). Kill before each: the next run
    never calls the half-committed outputs up to date, never refuses them as foreign, and ends with
    exactly what an uninterrupted run writes."""
    out, scores = ws / "o" / "s.npy", ws / "o" / "s.parquet"
    old = _vas(ws, out, "--save_scores", str(scores))
    old[old.index("--fraction_vas") + 1] = "0.2"
    assert subprocess.run([sys.executable, "-m", "varalign", *old]).returncode == 0  # an earlier result
    new = _vas(ws, out, "--save_scores", str(scores))
    ref = ws / "ref"
    ref_argv = _vas(ws, ref / "s.npy", "--save_scores", str(ref / "s.parquet"))
    assert subprocess.run([sys.executable, "-m", "varalign", *ref_argv]).returncode == 0
    killed = subprocess.run([sys.executable, "-c", _KILL_AT, str(kill_at), *new])
    assert killed.returncode == -signal.SIGKILL
    rerun = subprocess.run([sys.executable, "-m", "varalign", *new], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert out.read_bytes() == (ref / "s.npy").read_bytes()
    assert scores.read_bytes() == (ref / "s.parquet").read_bytes()
    manifest = json.loads(manifest_path(out).read_text())
    assert manifest["options"]["fraction_vas"] == 0.3
    _no_hidden_leftovers(out.parent)
    # and once complete, the next run verifies and does nothing
    stamp = manifest_path(out).stat().st_mtime_ns
    again = subprocess.run([sys.executable, "-m", "varalign", *[a for a in new if a != "--quiet"]], capture_output=True, text=True)
    assert again.returncode == 0 and "up to date" in again.stderr
    assert manifest_path(out).stat().st_mtime_ns == stamp


def test_stale_temp_files_of_a_killed_run_are_removed(ws: Path, capsys) -> None:
    out = ws / "s.npy"
    stale = [ws / ".s.npy.varalign-abc12345.tmp", ws / ".s.manifest.json.varalign-zz_99xyz.tmp"]
    for p in stale:
        p.write_bytes(b"half a subset")
    unrelated = ws / ".s.npy.mine.tmp"
    unrelated.write_bytes(b"not ours")
    assert _cli(_vas(ws, out), capsys)[0] == 0
    assert not any(p.exists() for p in stale) and unrelated.exists()


# ----------------------------------------------------------------------------- concurrent runs


def test_second_run_on_the_same_output_is_refused_with_the_first_ones_pid(ws: Path, capsys) -> None:
    out = ws / "s.npy"
    with lock(lock_file_for(out.absolute()), "the output"):
        code, err = _cli(_vas(ws, out), capsys)
    line = _one_line_error(code, err, out)
    assert f"pid {os.getpid()}" in line
    assert not out.exists()
    assert _cli(_vas(ws, out), capsys)[0] == 0  # the lock went with its holder


def test_two_real_runs_on_one_work_dir(ws: Path) -> None:
    """A slow VAS-D run holds its work dir; a second run with another output but the same --work_dir is
    refused at once (naming the pid) and the first finishes with the right output."""
    work = ws / "w"
    slow = ["filter", "--name", "vas_d", "--metadata_dir", str(ws / "pool"), "--save_path", str(ws / "a.npy"),
            "--arch", "l14", "--fraction", "0.9", "--fraction_vas", "0.1", "--num_iters", "3000",
            "--num_workers", "1", "--work_dir", str(work), "--quiet"]
    first = subprocess.Popen([sys.executable, "-m", "varalign", *slow])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(work.glob("*/rounds.npz")):
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the second could start"
        second = _vas(ws, ws / "b.npy", "--work_dir", str(work))
        r = subprocess.run([sys.executable, "-m", "varalign", *second], capture_output=True, text=True)
        assert r.returncode == 1 and f"pid {first.pid}" in r.stderr and len(r.stderr.splitlines()) == 1
        assert not (ws / "b.npy").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
    assert first.returncode == 130  # SIGTERM unwinds like Ctrl-C: exit 130, work kept for resume
    assert (work / MARKER).exists() and not (ws / "a.npy").exists()
    _no_hidden_leftovers(ws)


# ----------------------------------------------------------------------------- I/O faults

_FSIZE = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG, like a full disk
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    from varalign.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_full_disk_on_the_output_leaves_nothing_and_names_the_file(ws: Path) -> None:
    out = ws / "o" / "s.npy"
    argv = _vas(ws, out, "--save_scores", str(ws / "o" / "s.parquet"))
    r = subprocess.run([sys.executable, "-c", _FSIZE, "20000", *argv], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("varalign: error: ") and "too large" in lines[0].lower()
    assert str(ws / "o") in lines[0]
    assert sorted(p.name for p in (ws / "o").iterdir()) == []  # no output, no temp, no work dir, no lock


def test_read_only_output_folder_is_refused_before_any_work(ws: Path, capsys) -> None:
    ro = ws / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            # root ignores the mode: make the filesystem refuse instead, through a file in place of a folder
            ro.chmod(0o755)
            shutil.rmtree(ro)
            ro.write_text("a file")
        code, err = _cli(_vas(ws, ro / "s.npy"), capsys)
        _one_line_error(code, err, ro)
    finally:
        if ro.is_dir():
            ro.chmod(0o755)


@pytest.mark.parametrize("length", [300, 240, 250])
def test_file_name_too_long_is_one_line(ws: Path, capsys, length: int) -> None:
    """Too long for the output itself, or for the names the commit derives from it (the lock, the manifest,
    the pending manifest): one line naming the output, before any work."""
    out = ws / ("x" * (length - 4) + ".npy")
    code, err = _cli(_vas(ws, out), capsys)
    _one_line_error(code, err, "too long", out.name)
    assert ".lock" not in err
    _no_hidden_leftovers(ws)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_damaged_finished_task_is_redone(ws: Path, damage: str, grouped: bool, monkeypatch) -> None:
    """A damaged result file is redone: one task's (each saved alone) or its group's (small shards' results
    are saved together: the group is all or nothing)."""
    import varalign.engine.run as run_mod

    if not grouped:
        monkeypatch.setattr(run_mod, "SAVE_ROWS", 1)
    work = ws / "w"
    ref = filter_pool(ws / "pool", ws / "a.npy", "clip_score", arch="l14", fraction=0.3, work_dir=str(work),
                      keep_work_dir=True, quiet=True)
    files = sorted(work.glob("scan-*/*.npz"))
    assert len(files) == (1 if grouped else 4)
    victim = files[-1 if grouped else 1]
    data = victim.read_bytes()
    victim.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                        "garbage": data[:-40] + b"\xff" * 40}[damage])
    res = filter_pool(ws / "pool", ws / "b.npy", "clip_score", arch="l14", fraction=0.3, work_dir=str(work),
                      keep_work_dir=True, quiet=True)
    assert np.array_equal(res.uids, ref.uids)
    resumed = json.loads(manifest_path(ws / "b.npy").read_text())["resumed_tasks"]
    assert resumed == (0 if grouped else 3)  # 4 shards: the group, or one shard, redone


# ----------------------------------------------------------------------------- deflate bombs


def _bomb_npz(path: Path, rows: int, dim: int, inflated: int) -> None:
    """An npz whose `l14_img` member declares `rows x dim` float16 but inflates to `inflated` bytes."""
    header = np.lib.format.header_data_from_array_1_0(np.zeros((rows, dim), np.float16))
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    head = buf.getvalue()
    # full flushes end byte-aligned blocks with no back-references, so one 16 MiB block repeats freely
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = comp.compress(head) + comp.flush(zlib.Z_FULL_FLUSH)
    block = comp.compress(bytes(1 << 24)) + comp.flush(zlib.Z_FULL_FLUSH)
    data = first + block * (inflated >> 24) + b"\x03\x00"  # an empty final block
    declared = len(head) + rows * dim * 2
    crc = zlib.crc32(head + bytes(rows * dim * 2))
    name = b"l14_img.npy"
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(data), declared, len(name), 0)
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(data), declared,
                          len(name), 0, 0, 0, 0, 0, 0)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central) + len(name),
                      len(local) + len(name) + len(data), 0)
    path.write_bytes(local + name + data + central + name + end)


_MEMLIMIT = textwrap.dedent("""
    import resource, sys
    import numpy, pyarrow, pyarrow.parquet  # loaded before the limit: it bounds what the run allocates
    from varalign.cli import main
    used = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    limit = used + int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.exit(main(sys.argv[2:]))
""")


def test_deflate_bomb_is_stopped_after_one_block_under_a_memory_limit(ws: Path) -> None:
    victim = sorted((ws / "pool").glob("*.npz"))[0]
    with zipfile.ZipFile(victim) as zf:
        info = zf.getinfo("l14_img.npy")
    rows = int(np.load(victim)["l14_img"].shape[0])
    assert info.file_size  # the pool's own member, replaced by a bomb with the same declared size
    _bomb_npz(victim, rows, 768, 3 << 30)  # 3 GiB of zeros behind a ~1.5 MB declaration
    argv = _vas(ws, ws / "s.npy")
    r = subprocess.run([sys.executable, "-c", _MEMLIMIT, str(1 << 30), *argv], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "inflates beyond its declared size" in lines[0] and victim.name in lines[0], r.stderr
    assert not (ws / "s.npy").exists()


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("flags,words", [
    (["--threshold", "nan"], "--threshold"),
    (["--threshold", "inf"], "--threshold"),
    (["--threshold_vas", "nan"], "--threshold_vas"),
    (["--fraction", "nan"], "--fraction"),
    (["--batch_size", "0"], "--batch_size"),
    (["--num_workers", "0"], "--num_workers"),
    (["--vas_d_rank", "-3"], "--vas_d_rank"),
    (["--temperature", "nan"], "--temperature"),
    (["--average_num", "0"], "--average_num"),
    (["--target_variance_name", "imagenet_1k"], "--target_variance_name"),
])
def test_bad_or_conflicting_options_are_refused(ws: Path, capsys, flags: list[str], words: str) -> None:
    argv = ["filter", "--name", "clip_score", "--metadata_dir", str(ws / "pool"), "--save_path", str(ws / "s.npy"),
            "--arch", "l14", "--quiet"]
    if "--threshold" not in flags:
        argv += ["--fraction", "0.3"] if "--fraction" not in flags else []
    if words == "--target_variance_name":
        argv[argv.index("clip_score")] = "vas"
        argv += ["--fraction_vas", "0.2", "--target", str(ws / "target.npy"), "--files_path", str(ws)]
    if words == "--threshold_vas":
        argv[argv.index("clip_score")] = "vas"
        argv += ["--target", str(ws / "target.npy")]
    code, err = _cli(argv + flags, capsys)
    _one_line_error(code, err, words)
    assert not (ws / "s.npy").exists()


@pytest.mark.parametrize("kind", ["bool", "string"])
def test_score_column_must_be_floating_point(ws: Path, capsys, kind: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = sorted((ws / "pool").glob("*.parquet"))[0]
    t = pq.read_table(shard)
    col = t.column("clip_l14_similarity_score").to_numpy()
    new = pa.array(col > 0.2) if kind == "bool" else pa.array([f"{v:.4f}" for v in col])
    t = t.set_column(t.schema.get_field_index("clip_l14_similarity_score"), "clip_l14_similarity_score", new)
    pq.write_table(t, shard)
    argv = ["filter", "--name", "clip_score", "--metadata_dir", str(ws / "pool"), "--save_path", str(ws / "s.npy"),
            "--arch", "l14", "--fraction", "0.3", "--quiet"]
    code, err = _cli(argv, capsys)
    _one_line_error(code, err, shard, "floating point")


def test_num_iters_above_the_rows_to_drop_is_capped_with_a_note(ws: Path, capsys) -> None:
    base = ["filter", "--name", "vas_d", "--metadata_dir", str(ws / "pool"), "--arch", "l14", "--fraction", "0.5",
            "--fraction_vas", "0.49", "--num_workers", "1"]
    code, err = _cli(base + ["--save_path", str(ws / "a.npy"), "--num_iters", "100000", "--quiet"], capsys)
    assert code == 0 and "--num_iters 100000 capped at 40" in err, err
    code, err = _cli(base + ["--save_path", str(ws / "b.npy"), "--num_iters", "40", "--quiet"], capsys)
    assert code == 0 and "capped" not in err
    assert (ws / "a.npy").read_bytes() == (ws / "b.npy").read_bytes()
    stage = json.loads(manifest_path(ws / "a.npy").read_text())["stages"]["vas_d"]
    assert stage["num_iters_run"] == 40
    # where the time went, in the manifest: 40 rounds over the candidates, each dropping one
    t = stage["timing"]
    assert t["rounds_run"] == 40 and t["resident"] is False and t["collect_s"] >= 0 and t["rounds_s"] > 0
    assert t["project_s"] == 0  # exact mode: no low-rank projection
    assert t["candidate_rounds"] == sum(t["candidates"] - i for i in range(40))
    # nothing to drop (VAS-D keeps what the CLIP stage kept): said so, not "drops 0 rows, at least one per round"
    equal = [*base[:-4], "--fraction_vas", "0.5", "--num_workers", "1", "--num_iters", "10", "--save_path",
             str(ws / "c.npy"), "--quiet"]
    code, err = _cli(equal, capsys)
    assert code == 0 and "VAS-D has no row to drop (the previous stage kept exactly 2,000)" in err, err
    assert "drops 0" not in err


def test_no_warnings_on_stderr(ws: Path, capsys) -> None:
    """A stage that keeps nothing divides 0 by 0 somewhere: the user sees results, not RuntimeWarnings."""
    argv = ["filter", "--name", "vas", "--metadata_dir", str(ws / "pool"), "--save_path", str(ws / "s.npy"),
            "--arch", "l14", "--threshold", "5", "--threshold_vas", "0", "--target", str(ws / "target.npy"),
            "--save_scores", str(ws / "s.parquet"), "--quiet"]
    r = subprocess.run([sys.executable, "-W", "default", "-m", "varalign", *argv], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- the other commands


def test_target_outputs_are_guarded_and_the_alias_round_trips(ws: Path, capsys) -> None:
    feats = ws / "feats"
    feats.mkdir()
    np.save(feats / "a.npy", np.random.default_rng(0).standard_normal((50, 768)).astype(np.float32))
    before = _snapshot(ws)
    code, err = _cli(["target", str(feats / "a.npy"), "--save_path", str(feats / "a.npy"), "--quiet"], capsys)
    _one_line_error(code, err, feats / "a.npy")
    code, err = _cli(["target", str(feats), "--save_path", str(feats / "t.npy"), "--quiet"], capsys)
    _one_line_error(code, err, "inside the input folder")
    (ws / "mine.npy").write_bytes(b"user data")
    code, err = _cli(["target", str(feats), "--save_path", str(ws / "mine.npy"), "--quiet"], capsys)
    _one_line_error(code, err, ws / "mine.npy", "--overwrite")
    assert _snapshot(ws) == before | {"mine.npy": b"user data"}
    # `--name imagenet-1k` is stored under the canonical name, where `filter` looks for it
    code, err = _cli(["target", str(ws / "pool"), "--files_path", str(ws / "files"), "--name", "imagenet-1k",
                      "--quiet"], capsys)
    assert code == 0, err
    code, err = _cli(["filter", "--name", "vas", "--metadata_dir", str(ws / "pool"), "--save_path",
                      str(ws / "s.npy"), "--arch", "l14", "--fraction", "0.5", "--fraction_vas", "0.3",
                      "--target_variance_name", "imagenet-1k", "--files_path", str(ws / "files"), "--quiet"], capsys)
    assert code == 0, err
    again = ["target", str(ws / "pool"), "--files_path", str(ws / "files"), "--name", "imagenet_1k", "--quiet"]
    assert _cli(again, capsys)[0] == 0  # its own earlier output is replaced without --overwrite


def test_report_output_is_guarded(ws: Path, capsys) -> None:
    sub = ws / "s.npy"
    filter_pool(ws / "pool", sub, "clip_score", arch="l14", fraction=0.3, quiet=True)
    base = ["report", "--metadata_dir", str(ws / "pool"), "--selections", str(sub), "--top", "2"]
    code, err = _cli(base + ["--output", str(sub)], capsys)
    _one_line_error(code, err, sub)
    code, err = _cli(base + ["--output", str(manifest_path(sub))], capsys)
    _one_line_error(code, err, manifest_path(sub))
    page = ws / "index.html"
    page.write_text("<html>the user's page</html>")
    code, err = _cli(base + ["--output", str(page)], capsys)
    _one_line_error(code, err, page, "--overwrite")
    assert page.read_text() == "<html>the user's page</html>"
    ours = ws / "r.html"
    assert _cli(base + ["--output", str(ours)], capsys)[0] == 0
    assert _cli(base + ["--output", str(ours)], capsys)[0] == 0  # a varalign report is regenerated in place
    _no_hidden_leftovers(ws)


def test_embed_output_directory_is_guarded(ws: Path, capsys) -> None:
    imgs = ws / "imgs"
    imgs.mkdir()
    (imgs / "a.txt").write_text("a caption")
    (imgs / "a.png").write_bytes(b"not decoded before the checks")
    base = ["embed", str(imgs), "--model_config", str(ws / "none.json"), "--random_init", "--quiet"]
    code, err = _cli(base + ["--output_dir", str(imgs)], capsys)
    _one_line_error(code, err, imgs)
    mine = ws / "mine"
    mine.mkdir()
    (mine / "00000000.parquet").write_bytes(b"the user's shard")
    code, err = _cli(base + ["--output_dir", str(mine), "--overwrite"], capsys)
    _one_line_error(code, err, mine, "not touched")
    assert (mine / "00000000.parquet").read_bytes() == b"the user's shard"


def test_interrupt_message_says_whether_anything_was_written(ws: Path, capsys, monkeypatch) -> None:
    """filter's outputs appear together or not at all; embed's shards appear one by one: Ctrl-C says which."""
    import importlib

    import varalign.engine as engine_module

    embed_module = importlib.import_module("varalign.experiment.embed")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_module, "filter_pool", stop)
    monkeypatch.setattr(embed_module, "embed", stop)
    code, err = _cli(_vas(ws, ws / "s.npy"), capsys)
    assert code == 130 and "no output was written" in err
    code, err = _cli(["embed", str(ws), "--output_dir", str(ws / "o"), "--model", "m", "--random_init"], capsys)
    assert code == 130 and "the output is incomplete" in err and "no output was written" not in err
