"""Bad inputs: every one gives a one-line `varalign: error:` naming the file, exit 1, and writes nothing."""

from __future__ import annotations

import copy
import functools
import os
import struct
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import random_shard, write_pool

from varalign import VaralignError, filter_pool
from varalign.cli import main
from varalign.uids import UID_DTYPE, hex_to_uids

ROWS = 50
DIM = 768
P0, P1 = "00000000.parquet", "00000001.parquet"
N0, N1 = "00000000.npz", "00000001.npz"
EMB_METHODS = ["vas", "vas_d"]
ALL_METHODS = ["no_filter", "clip_score", "vas", "vas_d"]
STAGE_FLAGS = {
    "no_filter": [],
    "clip_score": ["--fraction", "0.5"],
    "vas": ["--fraction", "0.5", "--fraction_vas", "0.3"],
    "vas_d": ["--fraction", "0.5", "--fraction_vas", "0.3", "--num_iters", "2"],
}


def _touch(path: str) -> None:
    """What a malicious pickle would run: must never be called."""
    Path(path).write_text("executed")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (_touch, (self.marker,))


def _sym_target(dim: int = DIM) -> np.ndarray:
    return _sym_target_cached(dim).copy()


@functools.lru_cache(maxsize=2)
def _sym_target_cached(dim: int) -> np.ndarray:
    a = np.random.default_rng(3).standard_normal((dim, dim)).astype(np.float32) / dim
    return (a @ a.T + np.eye(dim, dtype=np.float32)).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _clean_shards() -> list[dict]:
    rng = np.random.default_rng(0)
    return [random_shard(rng, ROWS, DIM) for _ in range(2)]


class Env:
    """A tiny pool (2 shards x 50 rows, l14), a valid target, and an empty output dir."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.pool = tmp_path / "pool"
        self.out = tmp_path / "out"
        self.target = tmp_path / "target.npy"
        np.save(self.target, _sym_target())

    def shards(self) -> list[dict]:
        return copy.deepcopy(_clean_shards())

    def write(self, edit: Callable[[list[dict]], None] | None = None, compress: bool = True) -> Path:
        shards = self.shards()
        if edit is not None:
            edit(shards)
        return write_pool(self.pool, shards, compress=compress)

    def argv(self, method: str, flags: list[str] | None = None, target: Path | str | None = None,
             quiet: bool = True) -> list[str]:
        argv = ["filter", "--name", method, "--metadata_dir", str(self.pool),
                "--save_path", str(self.out / "subset.npy"), "--save_scores", str(self.out / "scores.parquet"),
                "--num_workers", "1"]
        if method != "no_filter":
            argv += ["--arch", "l14"]
        argv += STAGE_FLAGS[method] if flags is None else flags
        if method == "vas":
            argv += ["--target", str(target or self.target)]
        return argv + (["--quiet"] if quiet else [])

    def assert_clean(self) -> None:
        """No output, no manifest, no scores, no temp files or work dirs anywhere we write."""
        if self.out.exists():
            assert sorted(p.name for p in self.out.iterdir()) == []
        for folder in (self.pool, self.tmp):
            if folder.exists():
                left = [p.name for p in folder.iterdir()
                        if p.name.endswith(".tmp") or p.name.startswith((".varalign-", "."))]
                assert left == []

    def assert_written(self) -> None:
        assert (self.out / "subset.npy").exists()
        assert (self.out / "subset.manifest.json").exists()


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def cli_error(env: Env, capsys: pytest.CaptureFixture, argv: list[str], *names: str) -> str:
    """Run the CLI, expect exit 1 with one `varalign: error:` line naming every `names`; nothing written.

    Returns the line with the tmp dir replaced by `<tmp>`."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("varalign: error: "), line
    for name in names:
        assert name in line, line
    env.assert_clean()
    return line.replace(str(env.tmp), "<tmp>")  # keyword checks must not match the test's tmp dir name


def cli_ok(env: Env, capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "error" not in err
    env.assert_written()
    return err


# ----------------------------------------------------------------------------- the clean pool works


@pytest.mark.parametrize("method", ALL_METHODS)
def test_clean_pool_works(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    env.write()
    cli_ok(env, capsys, env.argv(method))
    assert (env.out / "scores.parquet").exists()
    assert not [p for p in env.out.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------- parquet / npz pairing


@pytest.mark.parametrize("method", EMB_METHODS)
def test_parquet_without_npz_is_an_error_for_embedding_methods(env: Env, capsys: pytest.CaptureFixture,
                                                               method: str) -> None:
    env.write()
    (env.pool / N1).unlink()
    line = cli_error(env, capsys, env.argv(method), P1)
    assert "npz" in line


@pytest.mark.parametrize("method", ["no_filter", "clip_score"])
def test_parquet_without_npz_is_fine_for_clip_score(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    env.write()
    for p in env.pool.glob("*.npz"):
        p.unlink()
    cli_ok(env, capsys, env.argv(method))
    kept = len(np.load(env.out / "subset.npy"))
    assert kept == 2 * ROWS if method == "no_filter" else kept >= ROWS + 1  # DataComp keeps >= the rank-N·f score


@pytest.mark.parametrize("method", ALL_METHODS)
def test_npz_without_parquet_is_always_an_error(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    env.write()
    (env.pool / P1).unlink()
    line = cli_error(env, capsys, env.argv(method), N1)
    assert "parquet" in line


@pytest.mark.parametrize("method", EMB_METHODS)
@pytest.mark.parametrize("npz_rows", [ROWS - 1, ROWS + 1])
def test_row_count_mismatch(env: Env, capsys: pytest.CaptureFixture, method: str, npz_rows: int) -> None:
    def edit(shards: list[dict]) -> None:
        rng = np.random.default_rng(9)
        shards[1]["l14_img"] = rng.standard_normal((npz_rows, DIM)).astype(np.float16)

    env.write(edit)
    line = cli_error(env, capsys, env.argv(method), N1)
    assert "row" in line


# ----------------------------------------------------------------------------- missing columns / keys


@pytest.mark.parametrize("method", ALL_METHODS)
def test_missing_uid_column(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    env.write(lambda s: s[0].pop("uid"))
    line = cli_error(env, capsys, env.argv(method), P0)
    assert "'uid'" in line


@pytest.mark.parametrize("method", ["clip_score", "vas", "vas_d"])
def test_missing_score_column(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    env.write(lambda s: s[1].pop("clip_l14_similarity_score"))
    cli_error(env, capsys, env.argv(method), P1, "clip_l14_similarity_score")


@pytest.mark.parametrize("method", EMB_METHODS)
def test_missing_npz_key(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    env.write(lambda s: s[0].pop("l14_img"))
    cli_error(env, capsys, env.argv(method), N0, "l14_img")


# ----------------------------------------------------------------------------- dims


def test_target_dim_does_not_match_embeddings(env: Env, capsys: pytest.CaptureFixture) -> None:
    env.write()
    small = env.tmp / "t512.npy"
    np.save(small, _sym_target(512))
    line = cli_error(env, capsys, env.argv("vas", target=small), "t512.npy")
    assert "512" in line and "768" in line


@pytest.mark.parametrize("method", EMB_METHODS)
def test_embedding_dim_does_not_match_arch(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    def edit(shards: list[dict]) -> None:
        shards[1]["l14_img"] = np.random.default_rng(2).standard_normal((ROWS, 512)).astype(np.float16)

    env.write(edit)
    line = cli_error(env, capsys, env.argv(method), N1)
    assert "512" in line


# ----------------------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("method", EMB_METHODS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_embedding_in_a_row_the_clip_stage_drops(env: Env, capsys: pytest.CaptureFixture, method: str,
                                                          bad: float) -> None:
    def edit(shards: list[dict]) -> None:
        shards[0]["clip_l14_similarity_score"][7] = -1.0  # lowest score: never kept by the CLIP stage
        shards[0]["l14_img"][7, 100] = bad

    env.write(edit)
    line = cli_error(env, capsys, env.argv(method), N0)
    assert "row 7" in line


@pytest.mark.parametrize("method", EMB_METHODS)
def test_nonfinite_embedding_in_a_shard_the_clip_stage_drops_entirely(env: Env, capsys: pytest.CaptureFixture,
                                                                     method: str) -> None:
    def edit(shards: list[dict]) -> None:
        shards[1]["clip_l14_similarity_score"][:] = -1.0  # fraction 0.5 keeps exactly shard 0
        shards[1]["l14_img"][3, 0] = np.nan

    env.write(edit)
    cli_error(env, capsys, env.argv(method), N1)


@pytest.mark.parametrize("method", ["clip_score", "vas", "vas_d"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_clip_score(env: Env, capsys: pytest.CaptureFixture, method: str, bad: float) -> None:
    def edit(shards: list[dict]) -> None:
        shards[1]["clip_l14_similarity_score"][11] = bad

    env.write(edit)
    line = cli_error(env, capsys, env.argv(method), P1, "clip_l14_similarity_score")
    assert "row 11" in line


def test_null_clip_score(env: Env, capsys: pytest.CaptureFixture) -> None:
    def edit(shards: list[dict]) -> None:
        col = shards[0]["clip_l14_similarity_score"].tolist()
        col[4] = None
        shards[0]["clip_l14_similarity_score"] = pa.array(col, type=pa.float32())

    env.write(edit)
    line = cli_error(env, capsys, env.argv("clip_score"), P0, "clip_l14_similarity_score")
    assert "row 4" in line


# ----------------------------------------------------------------------------- uids


def _good_uid(shards: list[dict], i: int = 0, row: int = 5) -> str:
    return shards[i]["uid"][row]


UID_EDITS = {
    "too_short": lambda u: u[:31],
    "too_long": lambda u: u + "0",
    "non_hex": lambda u: "g" + u[1:],
    "space": lambda u: u[:10] + " " + u[11:],
    "non_ascii": lambda u: "é" + u[2:],
    "null": lambda u: None,
}


@pytest.mark.parametrize("method", ["no_filter", "clip_score", "vas"])
@pytest.mark.parametrize("kind", list(UID_EDITS))
def test_malformed_uid(env: Env, capsys: pytest.CaptureFixture, method: str, kind: str) -> None:
    def edit(shards: list[dict]) -> None:
        shards[1]["uid"][5] = UID_EDITS[kind](shards[1]["uid"][5])

    env.write(edit)
    line = cli_error(env, capsys, env.argv(method), P1)
    assert "uid" in line and "row 5" in line
    assert ("null uid" in line) == (kind == "null")


def test_uid_column_not_strings(env: Env, capsys: pytest.CaptureFixture) -> None:
    def edit(shards: list[dict]) -> None:
        shards[0]["uid"] = np.arange(ROWS)

    env.write(edit)
    line = cli_error(env, capsys, env.argv("clip_score"), P0)
    assert "uid" in line


@pytest.mark.parametrize("method", ALL_METHODS)
def test_duplicate_uid_within_a_shard(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    def edit(shards: list[dict]) -> None:
        shards[1]["uid"][9] = shards[1]["uid"][2]

    env.write(edit)
    line = cli_error(env, capsys, env.argv(method), P1)
    assert "duplicate" in line


@pytest.mark.parametrize("method", ALL_METHODS)
def test_duplicate_uid_across_shards(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    def edit(shards: list[dict]) -> None:
        shards[1]["uid"][4] = shards[0]["uid"][3].upper()  # same number, other spelling

    env.write(edit)
    line = cli_error(env, capsys, env.argv(method), P1)
    assert "duplicate" in line


# ----------------------------------------------------------------------------- flags


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "nan"])
@pytest.mark.parametrize("method", ["clip_score", "vas", "vas_d"])
def test_fraction_out_of_range(env: Env, capsys: pytest.CaptureFixture, method: str, value: str) -> None:
    env.write()
    flags = [f"--fraction={value}"] + STAGE_FLAGS[method][2:]
    cli_error(env, capsys, env.argv(method, flags), "--fraction")


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5"])
@pytest.mark.parametrize("method", EMB_METHODS)
def test_fraction_vas_out_of_range(env: Env, capsys: pytest.CaptureFixture, method: str, value: str) -> None:
    env.write()
    flags = ["--fraction", "0.5", f"--fraction_vas={value}"] + (["--num_iters", "2"] if method == "vas_d" else [])
    cli_error(env, capsys, env.argv(method, flags), "--fraction_vas")


@pytest.mark.parametrize("method", EMB_METHODS)
def test_fraction_vas_above_fraction(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    env.write()
    flags = ["--fraction", "0.3", "--fraction_vas", "0.5"] + (["--num_iters", "2"] if method == "vas_d" else [])
    cli_error(env, capsys, env.argv(method, flags), "--fraction_vas", "--fraction ")


@pytest.mark.parametrize("method", ["clip_score", "vas", "vas_d"])
@pytest.mark.parametrize("which", ["both", "neither"])
def test_fraction_and_threshold(env: Env, capsys: pytest.CaptureFixture, method: str, which: str) -> None:
    env.write()
    rest = STAGE_FLAGS[method][2:]
    stage = ["--fraction", "0.5", "--threshold", "0.2"] if which == "both" else []
    cli_error(env, capsys, env.argv(method, stage + rest), "--fraction", "--threshold")


def test_fraction_vas_and_threshold_vas_both(env: Env, capsys: pytest.CaptureFixture) -> None:
    env.write()
    flags = ["--fraction", "0.5", "--fraction_vas", "0.3", "--threshold_vas", "1.0"]
    cli_error(env, capsys, env.argv("vas", flags), "--fraction_vas", "--threshold_vas")


def test_num_gpus_is_a_note_not_an_error(env: Env, capsys: pytest.CaptureFixture) -> None:
    env.write()
    err = cli_ok(env, capsys, env.argv("clip_score", quiet=False) + ["--num_gpus", "4"])
    assert "varalign: note: --num_gpus 4 ignored" in err


# ----------------------------------------------------------------------------- targets


def _bad_targets() -> dict[str, np.ndarray]:
    good = _sym_target()
    asym = good.copy()
    asym[0, 1] += 1.0
    with_nan = good.copy()
    with_nan[5, 5] = np.nan
    with_inf = good.copy()
    with_inf[2, 3] = with_inf[3, 2] = np.inf
    return {"non_square": good[:, :700], "one_d": good[0], "three_d": good[None], "asym": asym,
            "nan": with_nan, "inf": with_inf, "strings": np.array(["a", "b"])}


@pytest.mark.parametrize("kind", list(_bad_targets()))
def test_bad_target(env: Env, capsys: pytest.CaptureFixture, kind: str) -> None:
    env.write()
    path = env.tmp / f"bad_{kind}.npy"
    np.save(path, _bad_targets()[kind])
    cli_error(env, capsys, env.argv("vas", target=path), path.name)


def test_target_npy_with_pickle_is_refused(env: Env, capsys: pytest.CaptureFixture) -> None:
    env.write()
    path = env.tmp / "objects.npy"
    marker = env.tmp / "marker"
    np.save(path, np.array([_Evil(str(marker))], dtype=object), allow_pickle=True)
    cli_error(env, capsys, env.argv("vas", target=path), path.name)
    assert not marker.exists()


@pytest.mark.parametrize("garbage", [b"", b"\x93NUMPY garbage", os.urandom(300)])
def test_target_unreadable(env: Env, capsys: pytest.CaptureFixture, garbage: bytes) -> None:
    env.write()
    path = env.tmp / "garbage.npy"
    path.write_bytes(garbage)
    cli_error(env, capsys, env.argv("vas", target=path), path.name)


def test_target_missing(env: Env, capsys: pytest.CaptureFixture) -> None:
    env.write()
    cli_error(env, capsys, env.argv("vas", target=env.tmp / "nope.npy"), "nope.npy")


def test_target_variance_name_missing(env: Env, capsys: pytest.CaptureFixture) -> None:
    env.write()
    files = env.tmp / "files"
    (files / "variance").mkdir(parents=True)
    argv = env.argv("vas")
    i = argv.index("--target")
    argv[i : i + 2] = ["--target_variance_name", "imagenet_1k", "--files_path", str(files)]
    cli_error(env, capsys, argv, "variance", "imagenet_1k")


def test_target_pt_loads(env: Env, capsys: pytest.CaptureFixture) -> None:
    torch = pytest.importorskip("torch")
    env.write()
    cli_ok(env, capsys, env.argv("vas"))
    want = np.load(env.out / "subset.npy")
    for p in env.out.iterdir():
        p.unlink()
    pt = env.tmp / "variance_x.pt"
    torch.save(torch.from_numpy(np.load(env.target)), pt)
    cli_ok(env, capsys, env.argv("vas", target=pt))
    assert np.array_equal(np.load(env.out / "subset.npy"), want)


@pytest.mark.parametrize("kind", ["custom_class", "dict_with_object"])
def test_target_pt_with_pickled_object_is_refused(env: Env, capsys: pytest.CaptureFixture, kind: str) -> None:
    torch = pytest.importorskip("torch")
    env.write()
    marker = env.tmp / "marker"
    evil = _Evil(str(marker))
    obj = evil if kind == "custom_class" else {"image_features": torch.eye(DIM), "extra": evil}
    pt = env.tmp / "evil.pt"
    torch.save(obj, pt)
    line = cli_error(env, capsys, env.argv("vas", target=pt), "evil.pt")
    assert "weights_only" in line and "unsupported" in line.lower() and "\x1b" not in line
    assert not marker.exists()


def test_target_pt_not_a_tensor(env: Env, capsys: pytest.CaptureFixture) -> None:
    torch = pytest.importorskip("torch")
    env.write()
    pt = env.tmp / "list.pt"
    torch.save([1.0, 2.0], pt)
    line = cli_error(env, capsys, env.argv("vas", target=pt), "list.pt")
    assert "tensor" in line


@pytest.mark.parametrize("garbage", [b"", b"PK\x03\x04", os.urandom(500)])
def test_target_pt_garbage(env: Env, capsys: pytest.CaptureFixture, garbage: bytes) -> None:
    pytest.importorskip("torch")
    env.write()
    pt = env.tmp / "garbage.pt"
    pt.write_bytes(garbage)
    cli_error(env, capsys, env.argv("vas", target=pt), "garbage.pt")


def test_target_pt_without_torch(env: Env, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    env.write()
    pt = env.tmp / "variance_x.pt"
    pt.write_bytes(b"whatever")
    monkeypatch.setitem(sys.modules, "torch", None)
    line = cli_error(env, capsys, env.argv("vas", target=pt), "variance_x.pt", "torch", ".npy")
    assert "install" in line


# ----------------------------------------------------------------------------- unreadable / corrupt files


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("how", ["garbage", "empty", "truncated"])
def test_corrupt_parquet(env: Env, capsys: pytest.CaptureFixture, method: str, how: str) -> None:
    env.write()
    path = env.pool / P1
    data = path.read_bytes()
    path.write_bytes({"garbage": os.urandom(len(data)), "empty": b"", "truncated": data[: len(data) // 2]}[how])
    message = cli_error(env, capsys, env.argv(method), P1).split(P1, 1)[1]
    assert "parquet" in message


def test_unreadable_parquet(env: Env, capsys: pytest.CaptureFixture) -> None:
    """A path that cannot be read as a file (chmod 000 does not stop root, so use a directory)."""
    env.write()
    (env.pool / P0).unlink()
    (env.pool / P0).mkdir()
    message = cli_error(env, capsys, env.argv("clip_score"), P0)
    assert "not a readable parquet file" in message


@pytest.mark.parametrize("method", EMB_METHODS)
@pytest.mark.parametrize("how", ["garbage", "empty", "truncated"])
def test_corrupt_npz_file(env: Env, capsys: pytest.CaptureFixture, method: str, how: str) -> None:
    env.write()
    path = env.pool / N1
    data = path.read_bytes()
    path.write_bytes({"garbage": os.urandom(len(data)), "empty": b"", "truncated": data[: len(data) // 2]}[how])
    message = cli_error(env, capsys, env.argv(method), N1).split(N1, 1)[1]
    assert "npz" in message


def _member_span(path: Path, key: str) -> tuple[int, int]:
    """File offset and size of a member's stored (possibly compressed) bytes."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key + ".npy")
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


@pytest.mark.parametrize("method", EMB_METHODS)
@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("where", [0.5, 0.95])
def test_corrupt_npz_member_data(env: Env, capsys: pytest.CaptureFixture, method: str, compress: bool,
                                 where: float) -> None:
    env.write(compress=compress)
    path = env.pool / N0
    start, size = _member_span(path, "l14_img")
    data = bytearray(path.read_bytes())
    pos = start + int(size * where)
    for i in range(pos, pos + 8):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))
    message = cli_error(env, capsys, env.argv(method), N0).split(N0, 1)[1]  # the tmp dir name says "corrupt"
    assert "corrupt npz" in message and "l14_img" in message


@pytest.mark.parametrize("method", EMB_METHODS)
def test_npz_member_needing_pickle_is_refused(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    env.write()
    marker = env.tmp / "marker"
    path = env.pool / N0
    path.unlink()
    objs = np.empty(ROWS, dtype=object)
    objs[:] = [_Evil(str(marker)) for _ in range(ROWS)]
    np.savez(path, l14_img=objs)
    line = cli_error(env, capsys, env.argv(method), N0, "l14_img")
    assert "pickle" in line
    assert not marker.exists()


@pytest.mark.parametrize("method", EMB_METHODS)
def test_npz_member_not_float(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    def edit(shards: list[dict]) -> None:
        shards[0]["l14_img"] = np.zeros((ROWS, DIM), dtype=np.int16)

    env.write(edit)
    cli_error(env, capsys, env.argv(method), N0, "l14_img")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_missing_metadata_dir(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    cli_error(env, capsys, env.argv(method), "pool")


def test_metadata_dir_without_parquets(env: Env, capsys: pytest.CaptureFixture) -> None:
    env.pool.mkdir()
    cli_error(env, capsys, env.argv("clip_score"), "pool")


def _given(env: Env, uids: np.ndarray | None = None) -> Path:
    path = env.tmp / "given.npy"
    if uids is not None:
        np.save(path, uids)
    return path


@pytest.mark.parametrize("method", ALL_METHODS)
def test_missing_given_uids_file(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    env.write()
    argv = env.argv(method) + ["--given_uids_path", str(env.tmp / "nope.npy")]
    cli_error(env, capsys, argv, "nope.npy")


@pytest.mark.parametrize("bad", ["int64", "u8_2d", "u4,u4", "raw_odd_bytes", "empty_file", "pickle", "magic_only",
                                 "truncated"])
def test_subset_file_with_the_wrong_dtype(env: Env, capsys: pytest.CaptureFixture, bad: str) -> None:
    env.write()
    path = env.tmp / "given.npy"
    uids = hex_to_uids(env.shards()[0]["uid"][:10])
    if bad == "int64":
        np.save(path, np.arange(10, dtype=np.int64))
    elif bad == "u8_2d":
        np.save(path, np.stack([uids["f0"], uids["f1"]], axis=1))
    elif bad == "u4,u4":
        np.save(path, np.zeros(10, dtype="u4,u4"))
    elif bad == "raw_odd_bytes":
        path.write_bytes(os.urandom(33))
    elif bad == "empty_file":
        path.write_bytes(b"")
    elif bad == "magic_only":
        path.write_bytes(b"\x93NUMPY")
    elif bad == "truncated":
        np.save(path, uids)
        path.write_bytes(path.read_bytes()[:-24])
    else:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    argv = env.argv("clip_score") + ["--given_uids_path", str(path)]
    cli_error(env, capsys, argv, "given.npy")


def test_given_uids_works(env: Env, capsys: pytest.CaptureFixture) -> None:
    env.write()
    uids = hex_to_uids(env.shards()[0]["uid"][:10])
    path = env.tmp / "given.bin"
    path.write_bytes(np.sort(uids).tobytes())
    err = cli_ok(env, capsys, env.argv("no_filter") + ["--given_uids_path", str(path)])
    assert np.array_equal(np.sort(np.load(env.out / "subset.npy")), np.sort(uids.astype(UID_DTYPE)))
    assert "none of the uids" not in err


def test_given_uids_none_in_the_pool_is_an_empty_subset_with_a_note(env: Env, capsys: pytest.CaptureFixture) -> None:
    """uids of another pool: not an error (an empty subset is a subset), but a note says it."""
    env.write()
    path = env.tmp / "other.npy"
    np.save(path, hex_to_uids(["f" * 32, "e" * 32]))
    err = cli_ok(env, capsys, env.argv("no_filter") + ["--given_uids_path", str(path)])
    assert len(np.load(env.out / "subset.npy")) == 0
    assert f"varalign: note: none of the uids in {path} is in the pool: the subset is empty" in err


# ----------------------------------------------------------------------------- outputs and parallel runs


@pytest.mark.parametrize("which", ["save_path", "save_scores"])
@pytest.mark.parametrize("how", ["is_a_dir", "parent_is_a_file"])
def test_unwritable_output(env: Env, capsys: pytest.CaptureFixture, which: str, how: str) -> None:
    env.write()
    env.out.mkdir()
    name = "subset.npy" if which == "save_path" else "scores.parquet"
    argv = env.argv("clip_score")
    if how == "is_a_dir":
        (env.out / name).mkdir()
        bad = env.out / name
    else:
        (env.out / "file").write_text("x")
        bad = env.out / "file" / name
        argv[argv.index(str(env.out / name))] = str(bad)
    capsys.readouterr()
    assert main(argv) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("varalign: error: ") and str(bad) in lines[0]
    assert sorted(p.name for p in env.out.iterdir()) == [name if how == "is_a_dir" else "file"]


@pytest.mark.parametrize("method", EMB_METHODS)
def test_error_in_a_parallel_run_leaves_nothing(env: Env, capsys: pytest.CaptureFixture, method: str) -> None:
    def edit(shards: list[dict]) -> None:
        shards[1]["l14_img"][40, 1] = np.nan

    env.write(edit)
    argv = env.argv(method)
    argv[argv.index("--num_workers") + 1] = "2"
    cli_error(env, capsys, argv, N1)


# ----------------------------------------------------------------------------- the Python API


def test_api_missing_npz(env: Env) -> None:
    env.write()
    (env.pool / N0).unlink()
    with pytest.raises(VaralignError, match=P0):
        filter_pool(env.pool, env.out / "subset.npy", "vas_d", arch="l14", fraction=0.5, fraction_vas=0.3,
                    num_iters=2, quiet=True)
    env.assert_clean()


def test_api_malformed_uid(env: Env) -> None:
    env.write(lambda s: s[0]["uid"].__setitem__(3, "xyz"))
    with pytest.raises(VaralignError, match=r"00000000\.parquet.*malformed uid 'xyz' at row 3"):
        filter_pool(env.pool, env.out / "subset.npy", "clip_score", arch="l14", fraction=0.5, quiet=True)
    env.assert_clean()


def test_api_nan_embedding(env: Env) -> None:
    def edit(shards: list[dict]) -> None:
        shards[1]["clip_l14_similarity_score"][0] = -1.0
        shards[1]["l14_img"][0, 0] = np.nan

    env.write(edit)
    with pytest.raises(VaralignError, match=N1) as info:
        filter_pool(env.pool, env.out / "subset.npy", "vas", arch="l14", fraction=0.5, fraction_vas=0.3,
                    target=str(env.target), save_scores=str(env.out / "s.parquet"), quiet=True)
    assert "\n" not in str(info.value)
    env.assert_clean()


def test_api_bad_fraction(env: Env) -> None:
    env.write()
    with pytest.raises(VaralignError, match="--fraction"):
        filter_pool(env.pool, env.out / "subset.npy", "clip_score", arch="l14", fraction=1.5)
    env.assert_clean()


def test_api_pt_with_pickled_object(env: Env) -> None:
    torch = pytest.importorskip("torch")
    env.write()
    marker = env.tmp / "marker"
    pt = env.tmp / "evil.pt"
    torch.save({"image_features": _Evil(str(marker))}, pt)
    with pytest.raises(VaralignError, match="evil.pt") as info:
        filter_pool(env.pool, env.out / "subset.npy", "vas", arch="l14", fraction=0.5, fraction_vas=0.3,
                    target=str(pt), quiet=True)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    env.assert_clean()


# ----------------------------------------------------------------------------- varalign target


class TargetEnv(Env):
    def assert_clean(self) -> None:
        super().assert_clean()
        assert not (self.out / "target.npy").exists()
        assert not (self.out / "target.manifest.json").exists()


@pytest.fixture
def tenv(tmp_path: Path) -> TargetEnv:
    return TargetEnv(tmp_path)


def _target_argv(env: Env, *inputs: Path | str) -> list[str]:
    return ["target", *map(str, inputs), "--save_path", str(env.out / "target.npy"), "--quiet"]


def test_target_cli_works(tenv: TargetEnv, capsys: pytest.CaptureFixture) -> None:
    a = tenv.tmp / "a.npy"
    np.save(a, np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
    capsys.readouterr()
    assert main(_target_argv(tenv, a)) == 0
    assert np.load(tenv.out / "target.npy").shape == (8, 8)
    assert (tenv.out / "target.manifest.json").exists()


@pytest.mark.parametrize("how", ["is_a_dir", "parent_is_a_file"])
def test_target_cli_unwritable_output(tenv: TargetEnv, capsys: pytest.CaptureFixture, how: str) -> None:
    a = tenv.tmp / "a.npy"
    np.save(a, np.ones((4, 8), dtype=np.float32))
    tenv.out.mkdir()
    if how == "is_a_dir":
        bad = tenv.out / "t.npy"
        bad.mkdir()
    else:
        (tenv.out / "file").write_text("x")
        bad = tenv.out / "file" / "t.npy"
    capsys.readouterr()
    assert main(["target", str(a), "--save_path", str(bad), "--quiet"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("varalign: error: ") and str(bad) in lines[0]
    assert sorted(p.name for p in tenv.out.iterdir()) == [bad.name if how == "is_a_dir" else "file"]


def test_target_cli_one_d_input(tenv: TargetEnv, capsys: pytest.CaptureFixture) -> None:
    a = tenv.tmp / "flat.npy"
    np.save(a, np.ones(16, dtype=np.float32))
    cli_error(tenv, capsys, _target_argv(tenv, a), "flat.npy")


def test_target_cli_missing_input(tenv: TargetEnv, capsys: pytest.CaptureFixture) -> None:
    a = tenv.tmp / "a.npy"
    np.save(a, np.ones((4, 8), dtype=np.float32))
    cli_error(tenv, capsys, _target_argv(tenv, a, tenv.tmp / "missing.npy"), "missing.npy")


def test_target_cli_mismatched_dims(tenv: TargetEnv, capsys: pytest.CaptureFixture) -> None:
    a, b = tenv.tmp / "a.npy", tenv.tmp / "b.npy"
    np.save(a, np.ones((4, 8), dtype=np.float32))
    np.save(b, np.ones((4, 6), dtype=np.float32))
    line = cli_error(tenv, capsys, _target_argv(tenv, a, b), "b.npy")
    assert "6" in line and "8" in line


def test_target_cli_nan_input(tenv: TargetEnv, capsys: pytest.CaptureFixture) -> None:
    a = tenv.tmp / "a.npy"
    arr = np.ones((4, 8), dtype=np.float32)
    arr[2, 1] = np.nan
    np.save(a, arr)
    line = cli_error(tenv, capsys, _target_argv(tenv, a), "a.npy")
    assert "row 2" in line


def test_target_cli_pickle_input(tenv: TargetEnv, capsys: pytest.CaptureFixture) -> None:
    a = tenv.tmp / "obj.npy"
    marker = tenv.tmp / "marker"
    np.save(a, np.array([_Evil(str(marker))], dtype=object), allow_pickle=True)
    cli_error(tenv, capsys, _target_argv(tenv, a), "obj.npy")
    assert not marker.exists()


def test_target_cli_empty_folder(tenv: TargetEnv, capsys: pytest.CaptureFixture) -> None:
    folder = tenv.tmp / "nothing"
    folder.mkdir()
    cli_error(tenv, capsys, _target_argv(tenv, folder), "nothing")


def test_target_cli_pool_without_npz(tenv: TargetEnv, capsys: pytest.CaptureFixture) -> None:
    tenv.write()
    (tenv.pool / N1).unlink()
    cli_error(tenv, capsys, _target_argv(tenv, tenv.pool), P1)


def test_target_cli_pool_with_corrupt_npz(tenv: TargetEnv, capsys: pytest.CaptureFixture) -> None:
    tenv.write()
    path = tenv.pool / N1
    start, size = _member_span(path, "l14_img")
    data = bytearray(path.read_bytes())
    for i in range(start + size // 2, start + size // 2 + 8):
        data[i] ^= 0x55
    path.write_bytes(bytes(data))
    message = cli_error(tenv, capsys, _target_argv(tenv, tenv.pool), N1).split(N1, 1)[1]
    assert "corrupt npz" in message


def test_target_cli_pool_with_nan(tenv: TargetEnv, capsys: pytest.CaptureFixture) -> None:
    tenv.write(lambda s: s[0]["l14_img"].__setitem__((6, 6), np.inf))
    line = cli_error(tenv, capsys, _target_argv(tenv, tenv.pool), N0)
    assert "row 6" in line


@pytest.mark.parametrize("argv, message", [
    (["filter", "--name", "clip_score", "--arch", "l14", "--fraction", "abc"],
     "varalign filter: error: argument --fraction: invalid float value: 'abc' (see `varalign filter --help`)"),
    (["filter", "--name", "clip_score", "--arch", "x99"], "varalign filter: error: argument --arch: invalid choice"),
    (["filter", "--frobnicate", "3"], "varalign: error: unrecognized arguments: --frobnicate 3"),
    (["no_such_command"], "varalign: error: argument command: invalid choice: 'no_such_command'"),
    # the other subcommands' numeric options, checked by argparse before any work
    (["embed", "in", "--output_dir", "out", "--batch_size", "0"],
     "varalign embed: error: argument --batch_size: must be an integer >= 1, got '0'"),
    (["centroids", "--metadata_dir", "p", "--save_path", "c.npy", "-k", "0"],
     "varalign centroids: error: argument --num_clusters/-k: must be an integer >= 1"),
    (["centroids", "--metadata_dir", "p", "--save_path", "c.npy", "--sample_ratio", "nan"],
     "varalign centroids: error: argument --sample_ratio: must be a finite number, got 'nan'"),
    (["train", "--scale", "tiny", "--data_dir", "d", "--output_dir", "o", "--lr", "nan"],
     "varalign train: error: argument --lr: must be a finite number"),
    (["train", "--scale", "tiny", "--data_dir", "d", "--output_dir", "o", "--train_num_samples", "0"],
     "varalign train: error: argument --train_num_samples: must be an integer >= 1"),
    (["evaluate", "--train_output_dir", "r", "--batch_size", "-1"],
     "varalign evaluate: error: argument --batch_size: must be an integer >= 1, got '-1'"),
    (["minicomp", "build", "b", "--p_blank", "1.5"],
     "varalign minicomp build: error: argument --p_blank: must be a number in [0, 1], got '1.5'"),
    (["minicomp", "run", "b", "r", "--seeds", "x"],
     "varalign minicomp run: error: argument --seeds: must be comma-separated integers, got 'x'"),
])
def test_a_malformed_command_line_is_one_line(argv: list[str], message: str, capsys) -> None:
    """argparse's errors, as every other: one line (the usage is `--help`'s), exit code 2 (argparse's)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1 and err.startswith(message), err


def test_missing_input_errors_name_the_flag(env: Env, capsys: pytest.CaptureFixture) -> None:
    """A message for the command line names the flag to give (and the recipe key after it)."""
    env.write()
    argv = env.argv("clip_score")
    i = argv.index("--arch")
    del argv[i:i + 2]
    assert "clip_score needs --arch l14 or b32 (in a recipe stage: arch =" in cli_error(env, capsys, argv)
