"""target, report, reshard, embed and download with their inputs and outputs in object storage (moto's S3
server on 127.0.0.1, the `s3` fixture of test_s3.py): the local run's outputs, whole objects, one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("moto.server", reason="moto[server] is part of the test extra")
s3fs = pytest.importorskip("s3fs", reason="s3fs is part of the test extra")

from test_s3 import s3  # noqa: E402, F401 - the module's S3 server, the synthetic pool uploaded

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
