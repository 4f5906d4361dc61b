"""`varalign report`: the HTML page, rendered in headless Chromium, and its inputs' errors."""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import tempfile
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import varalign
from varalign.errors import VaralignError
from varalign.report import build_report, extremes, histogram, load_selections
from varalign.report_cli import register_report
from varalign.synth import make_pool
from varalign.uids import save_subset

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    """The Chromium binary; fails (never skips) when it is missing."""
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if exe is None:
        pytest.fail("headless Chromium is needed to render the report: apt-get update && apt-get install -y "
                    "chromium (Debian package `chromium`; .ci/run installs it)")
    return exe


def run_chromium(*args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="varalign-chromium-") as profile:
        proc = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class Tables(HTMLParser):
    """Every table of a page as rows of cell texts, keyed by the table's class."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, list[list[str]]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append((dict(attrs).get("class", ""), []))
        elif tag == "tr" and self.tables:
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)

    def of(self, cls: str) -> list[list[list[str]]]:
        return [rows for c, rows in self.tables if c == cls]


class Refs(HTMLParser):
    """Every attribute that makes a browser load or link something that is not a data: URI."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        for name, value in attrs:
            if name in ("src", "href", "xlink:href", "srcset", "poster", "action", "data") and value is not None \
                    and not value.startswith("data:"):
                self.found.append(f"<{tag} {name}={value}>")


def external_refs(page: str) -> list[str]:
    refs = Refs()
    refs.feed(page)
    return refs.found


def pool_text(pool: Path, uid: str) -> str:
    for f in sorted(pool.glob("*.parquet")):
        t = pq.read_table(f, columns=["uid", "text"])
        hit = pc.index(t.column("uid"), uid).as_py()
        if hit >= 0:
            return t.column("text")[hit].as_py()
    raise AssertionError(f"{uid} not in the pool")


@pytest.fixture(scope="module")
def runs(synth_pool: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report")
    pool = synth_pool / "pool"
    target = synth_pool / "files" / "variance" / "variance_imagenet_1k.npy"
    res = {
        "clip_score": varalign.filter_pool(pool, out / "uids" / "clip_score.npy", "clip_score", arch="l14",
                                           fraction=0.3, save_scores=str(out / "uids" / "clip_score_scores.parquet"),
                                           num_workers=1, quiet=True),
        "vas": varalign.filter_pool(pool, out / "uids" / "vas.npy", "vas", arch="l14", fraction=0.45,
                                    fraction_vas=0.3, target=str(target), num_workers=1, quiet=True,
                                    save_scores=str(out / "uids" / "vas_scores.parquet")),
    }
    return out, res


def test_report_renders_in_chromium(synth_pool: Path, runs: tuple[Path, dict]) -> None:
    out, res = runs
    pool = synth_pool / "pool"
    page = build_report(pool, [out / "uids" / "clip_score.npy", out / "uids" / "vas.npy"], out / "report.html",
                        top=5, title="VAS vs CLIP score")
    raw = page.read_text()
    # self-contained: nothing loaded from anywhere (the pool's URLs appear only as text)
    assert external_refs(raw) == [] and "<script" not in raw and "<link" not in raw and "url(" not in raw

    dom = run_chromium("--dump-dom", page.resolve().as_uri())
    tables = Tables()
    tables.feed(dom)
    assert "VAS vs CLIP score" in dom
    sel = {r[0]: r for r in tables.tables[0][1][1:]}  # the overview table
    assert sel["clip_score"][1:3] == ["clip_score", f"{res['clip_score'].counts['selected']:,}"]
    assert sel["vas"][1:3] == ["vas", f"{res['vas'].counts['selected']:,}"]
    assert sel["vas"][4] == "clip_score → vas"

    a, b = (set(np.load(out / "uids" / f"{n}.npy").tolist()) for n in ("clip_score", "vas"))
    inter = len(a & b)
    (overlap,) = tables.of("overlaps")
    assert overlap[1][:6] == ["clip_score", "vas", f"{len(a):,}", f"{len(b):,}", f"{inter:,}",
                              f"{inter / len(a | b):.3f}"]

    stages = tables.of("stages")
    vas_counts = {r[0]: r[1] for r in stages[1][1:]}
    assert vas_counts == {k: f"{v:,}" for k, v in res["vas"].counts.items()}
    assert f"threshold {res['clip_score'].thresholds['clip_score']:.4g}" in stages[0][2][5]
    scores = pq.read_table(out / "uids" / "vas_scores.parquet")
    vas = scores.column("vas").to_numpy(zero_copy_only=False)
    kept = scores.column("kept_vas").to_numpy(zero_copy_only=False)
    assert stages[1][3][5] == f"cut {np.nanmin(vas[kept]):.4g} (smallest kept)"

    # the highest-VAS sample (the vas run's last scored stage) with its caption
    best = scores.column("uid")[int(np.nanargmax(vas))].as_py()
    samples = tables.of("sample-table")
    assert len(samples) == 4 and all(len(t) == 6 for t in samples)
    top_vas = samples[2][1]
    assert top_vas[1] == f"{np.nanmax(vas):.4g}" and top_vas[2] == "yes"
    assert pool_text(pool, best) in top_vas[3] and best in top_vas[3]
    assert "https://images.invalid/" in top_vas[3]  # the URL, as text

    labels = {r[0]: r for r in tables.of("labels")[1][1:]}  # synthetic_caption_kind
    assert set(labels) == {"aligned", "wrong_concept", "uninformative"}
    assert float(labels["aligned"][3].rstrip("%")) > float(labels["aligned"][1].rstrip("%"))
    assert dom.count("<svg") == 3  # clip_score; clip_score and vas

    shot = out / "report.png"
    run_chromium("--window-size=1280,2400", f"--screenshot={shot}", page.resolve().as_uri())
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1280, 2400)


def test_histogram_and_extremes_match_numpy(runs: tuple[Path, dict]) -> None:
    out, _ = runs
    path = out / "uids" / "vas_scores.parquet"
    assert pq.ParquetFile(path).num_row_groups == 3  # streamed: one row group per shard
    t = pq.read_table(path)
    v = t.column("vas").to_numpy(zero_copy_only=False).astype(np.float64)
    kept = t.column("kept_vas").to_numpy(zero_copy_only=False)
    h = histogram(path, "vas", "vas", "kept_vas", None)
    ok = np.isfinite(v)
    assert h.scored == ok.sum() and h.cut == v[kept].min()
    assert (h.all == np.histogram(v[ok], h.edges)[0]).all() and (h.kept == np.histogram(v[kept], h.edges)[0]).all()
    high, low = extremes(path, "vas", 7)
    order = np.argsort(-np.where(ok, v, -np.inf), kind="stable")[:7]
    assert [s.uid for s in high] == [t.column("uid")[int(i)].as_py() for i in order]
    assert [s.score for s in low] == sorted(v[ok])[:7]


def png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour PNG (no Pillow needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["thumbnail", "image_path"])
def test_thumbnails_and_escaped_captions(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("varalign.report.MAX_DISTINCT", 50)  # label_row (200 values) is not broken down
    pool = tmp_path / "pool"
    (shard,) = make_pool(pool, 200, 1, seed=3)
    t = pq.read_table(shard + ".parquet")
    images = [png(8, 6, (i % 256, 40, 200)) for i in range(t.num_rows)]
    if kind == "thumbnail":
        col = pa.array(images, type=pa.binary())
    else:
        (pool / "img").mkdir()
        for i, data in enumerate(images):
            (pool / "img" / f"{i}.png").write_bytes(data)
        col = pa.array([f"img/{i}.png" for i in range(t.num_rows)])
    evil = '<script>alert("x")</script> & <img src=https://evil.invalid/a.png>'
    t = t.set_column(t.schema.get_field_index("text"), "text", pa.array([evil] * t.num_rows)).append_column(kind, col)
    t = t.append_column("label_row", pa.array([f"r{i}" for i in range(t.num_rows)]))
    pq.write_table(t, shard + ".parquet")
    varalign.filter_pool(pool, tmp_path / "cs.npy", "clip_score", arch="l14", fraction=0.5, num_workers=1,
                         quiet=True, save_scores=str(tmp_path / "cs_scores.parquet"))
    raw = build_report(pool, [tmp_path / "cs.npy"], tmp_path / "r.html", top=3).read_text()
    assert "<script" not in raw and "evil.invalid/a.png>" not in raw
    assert html_escaped(evil) in raw
    assert raw.count('<img class="thumb" alt="" src="data:image/png;base64,') == 6
    assert external_refs(raw) == []
    assert "label_row: more than 50 distinct values, not broken down" in raw and "<h3>synthetic_concept</h3>" in raw


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def test_no_manifest_no_scores_and_explicit_scores(synth_pool: Path, runs: tuple[Path, dict], tmp_path: Path) -> None:
    out, res = runs
    bare = tmp_path / "given.npy"
    save_subset(bare, np.load(out / "uids" / "vas.npy")[:100])
    raw = build_report(synth_pool / "pool", [bare, out / "uids" / "clip_score.npy"], tmp_path / "r.html").read_text()
    assert "no manifest (given.manifest.json)" in raw and "no per-sample scores" in raw
    moved = tmp_path / "elsewhere.parquet"
    shutil.copy(out / "uids" / "vas_scores.parquet", moved)
    raw = build_report(synth_pool / "pool", [out / "uids" / "clip_score.npy"], tmp_path / "r2.html",
                       scores=[moved]).read_text()  # the vas scores for the clip_score subset: flagged
    assert f"marks {res['vas'].counts['selected']:,} rows selected but the subset holds" in raw


def test_manifest_that_does_not_describe_the_subset_is_not_used(synth_pool: Path, runs: tuple[Path, dict],
                                                                  tmp_path: Path) -> None:
    """A subset changed since its manifest was written (or another output's manifest beside it): the report
    says so and shows no counts per stage from it, nor its scores."""
    out, _ = runs
    changed = tmp_path / "vas.npy"
    save_subset(changed, np.load(out / "uids" / "vas.npy")[:100])
    shutil.copy(out / "uids" / "vas.manifest.json", tmp_path / "vas.manifest.json")
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("clip_score.npy", "clip_score.manifest.json"):  # moved together: still described
        shutil.copy(out / "uids" / name, moved / name)
    raw = build_report(synth_pool / "pool", [changed, moved / "clip_score.npy"], tmp_path / "r.html").read_text()
    assert "the manifest (vas.manifest.json) does not describe this subset (the file" in raw
    assert "size or SHA-256 differs from the one recorded" in raw
    assert raw.count("does not describe this subset") == 1  # clip_score's moved manifest matched by name
    sels = load_selections([changed, moved / "clip_score.npy"], None)
    assert sels[0].manifest is None and sels[0].scores is None and sels[1].manifest is not None


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="varalign")
    register_report(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *argv])
    return args.func(args)


def test_bad_inputs_give_one_line_errors(synth_pool: Path, runs: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = runs
    pool = str(synth_pool / "pool")
    sel = str(out / "uids" / "vas.npy")
    html_out = tmp_path / "r.html"
    base = ["--metadata_dir", pool, "--output", str(html_out)]
    assert cli(base + ["--selections", sel, "--top", "2"]) == 0 and html_out.exists()
    html_out.unlink()
    bad_manifest = tmp_path / "b.npy"
    shutil.copy(sel, bad_manifest)
    (tmp_path / "b.manifest.json").write_text("{not json")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    cases = [
        (["--selections", str(tmp_path / "missing.npy")], "missing.npy: selection (subset .npy) not found"),
        (["--selections", str(bad_manifest)], "b.manifest.json: not a readable manifest"),
        (["--selections", sel, "--scores", str(corrupt)], "corrupt.parquet: not a readable parquet file"),
        (["--selections", sel, "--scores", str(tmp_path / "nope.parquet")], "nope.parquet: scores parquet not found"),
        (["--selections", sel, sel, "--scores", str(corrupt)], "--scores has 1 files for 2 selections"),
    ]
    for argv, message in cases:
        with pytest.raises(VaralignError) as err:
            cli(base + argv)
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VaralignError, match="metadata directory not found"):
        cli(["--metadata_dir", str(tmp_path / "nopool"), "--output", str(html_out), "--selections", sel])
    assert not html_out.exists() and not list(tmp_path.glob(".r.html.*"))


def test_report_edited_since_it_was_written_is_not_replaced(synth_pool: Path, runs: tuple[Path, dict],
                                                             tmp_path: Path) -> None:
    """The page carries its own SHA-256: a re-run replaces it as written, not once someone edited it."""
    out, _ = runs
    page = tmp_path / "r.html"
    build_report(synth_pool / "pool", [out / "uids" / "vas.npy"], page)
    build_report(synth_pool / "pool", [out / "uids" / "vas.npy"], page)  # as written: replaced
    edited = page.read_text().replace("</body>", "<p>my notes</p></body>")
    page.write_text(edited)
    with pytest.raises(VaralignError, match="r.html: exists and is a varalign report changed since it was written"):
        build_report(synth_pool / "pool", [out / "uids" / "vas.npy"], page)
    assert page.read_text() == edited
    build_report(synth_pool / "pool", [out / "uids" / "vas.npy"], page, overwrite=True)
    assert "my notes" not in page.read_text()


@pytest.mark.parametrize("page, ours", [
    ('<html><head><meta name="generator" content="varalign report"><title>x</title>', True),
    ("<!DOCTYPE html><html><head><title>varalign report: clip, vas</title>", True),  # an earlier version's
    ("<!DOCTYPE html><html><head><title>varalign demo (synthetic)</title>", True),
    ("<html><head><title>varalign notes from the lab</title>", False),  # the user's page that names varalign
    ("<html><head><title>my page</title>", False),
])
def test_only_varalign_reports_are_replaced(tmp_path: Path, page: str, ours: bool) -> None:
    from varalign.report import check_report_output

    path = tmp_path / "r.html"
    path.write_text(page)
    if ours:
        check_report_output(path)
    else:
        with pytest.raises(VaralignError, match="is not a varalign report: not overwritten"):
            check_report_output(path)
        check_report_output(path, overwrite=True)
    assert path.read_text() == page
