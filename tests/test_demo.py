"""`varalign demo`: the real-image demo on a tiny mini pool (built from scratch, then reused through the CLI,
then with --train), its one-line error without the training stack, and the synthetic demo."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from varalign.cli import main
from varalign.uids import UID_DTYPE, hex_to_uids, sort_uids

REAL_METHODS = (
    "no_filter",
    "clip_score_30",
    "vas_clip_score",
    "vas_d_clip_score",
    "negcliploss_30",
    "negcliploss_normsim",
    "basic_filter",
)
ROW = re.compile(r"^(\w+)\s+([\d,]+)\s+([\d.]+) \|((?:\s+(?:\d+%|-)){4}) \|((?:\s+(?:\d+%|-)){7})$")


def _needs_train_stack() -> None:
    for mod in ("sklearn", "PIL", "torch", "open_clip", "open_clip_train", "fasttext"):
        pytest.importorskip(mod)


def _table(text: str) -> dict[str, tuple[int, list[float]]]:
    """{method: (kept, [share kept of each caption kind and image kind])} from the printed table."""
    out = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            shares = [int(x[:-1]) / 100 if x != "-" else float("nan") for x in (m.group(4) + m.group(5)).split()]
            out[m.group(1)] = (int(m.group(2).replace(",", "")), shares)
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """The demo from scratch on a 300-sample pool, with Fashion-MNIST hidden (so: scikit-learn digits only),
    not quiet: (out_dir, result, stdout, stderr)."""
    _needs_train_stack()
    from varalign.demo import run_demo
    from varalign.minicomp import sources
    from varalign.minicomp.build import preset

    out = tmp_path_factory.mktemp("demo") / "out"
    cfg = preset("v5", size=300, shard_size=120, teacher_samples=128, teacher_batch=64, use_mnist=False)
    mp = pytest.MonkeyPatch()
    mp.setattr(sources, "FASHION_DIRS", ())
    mp.delenv("VARALIGN_FASHION_MNIST_DIR", raising=False)
    buf, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            result = run_demo(str(out), config=cfg, quiet=False)
    finally:
        mp.undo()
    return out, result, buf.getvalue(), err.getvalue()


def _bar_states(err: str, desc: str) -> list[str]:
    """Every state a tqdm bar named `desc` printed (tqdm separates them with carriage returns)."""
    return [x.strip() for x in re.split(r"[\r\n]", err) if x.strip().startswith(f"{desc}:")]


def test_real_demo_outputs_match_table(demo) -> None:
    out, result, printed, _ = demo
    assert "Fashion-MNIST not found" in printed and "apt-get install dataset-fashion-mnist" in printed
    assert "building the real-image mini pool" in printed
    table = _table(printed)
    assert list(table) == list(REAL_METHODS) and not result["skipped"]
    pool = [p for p in sorted((out / "minicomp" / "metadata").glob("*.parquet"))]
    pool_uids = sort_uids(np.concatenate([hex_to_uids(pq.read_table(p, columns=["uid"]).column(0)) for p in pool]))
    assert len(pool_uids) == 300
    labels = {
        c: np.concatenate([pq.read_table(p, columns=[c]).column(0).to_numpy(zero_copy_only=False) for p in pool])
        for c in ("uid", "label_caption_kind")
    }
    kept_aligned = {}
    for method, (kept, shares) in table.items():
        path = out / "subsets" / f"{method}.npy"
        uids = np.load(path)
        assert uids.dtype == UID_DTYPE and np.array_equal(uids, np.sort(uids))  # DataComp's sorted subset file
        assert len(uids) == kept and np.isin(uids, pool_uids).all()
        assert (out / "subsets" / f"{method}.manifest.json").exists()
        scores = pq.read_table(out / "scores" / f"{method}.parquet")
        assert scores.num_rows == 300 and int(np.sum(scores.column("selected").to_numpy(zero_copy_only=False))) == kept
        # the `aligned` share in the table is what the subset really kept of the aligned captions
        in_sub = np.isin(hex_to_uids(labels["uid"].tolist()), uids)
        aligned = labels["label_caption_kind"] == "aligned"
        assert abs(in_sub[aligned].mean() - shares[0]) <= 0.005 + 1e-9
        kept_aligned[method] = shares[0]
    assert table["no_filter"][0] == 300 and all(s == 1.0 for s in table["no_filter"][1])
    assert table["vas_clip_score"][0] == table["negcliploss_30"][0] == 90  # 30% of 300
    assert table["clip_score_30"][0] >= 90  # keeps ties at the cut
    html = (out / "report.html").read_text()
    assert all(m in html for m in REAL_METHODS) and "label_caption_kind" in html
    assert all(k in html for k in ("rendered_text", "off_domain", "low_info"))  # v5's off-target kinds
    assert '<img class="thumb" alt="" src="data:image/png;base64,' in html  # thumbnails from the pool's shards
    assert f"{out / 'report.html'}" in printed and f"{out / 'subsets'}" in printed


def test_progress_on_stderr(demo) -> None:
    """Each step of the build and the methods show a bar (samples seen, epochs, an estimate) on stderr."""
    _, _, printed, err = demo
    teacher = _bar_states(err, "teacher CLIP")
    # the teacher (128 samples, batch 64, one epoch) moves with open_clip_train's log lines and ends at 128/128
    assert teacher and all("epoch 1/1" in x for x in teacher)
    assert re.search(r"100%\|.*\| 128/128 \[\d\d:\d\d<00:00", teacher[-1]), teacher[-1]
    for desc in ("image sources", "pool samples", "pool shards", "teacher shards", "downstream shards"):
        assert re.search(r"\d+/\d+ \[", _bar_states(err, desc)[0]), desc  # a count out of a total
    assert re.search(r"100%\|.*\| 7/7 \[", _bar_states(err, "methods")[-1])
    assert "minicomp: teacher trained in" in err and "  vas_clip_score: 90 kept in" in err
    assert "teacher CLIP:" not in printed and "%|" not in printed  # bars never on stdout


def test_summary_names_the_target(demo) -> None:
    """The summary names the VAS target (path and name) and a `varalign filter` command that re-runs
    vas_clip_score with it: that command gives the demo's subset."""
    out, _, printed, _ = demo
    target = out / "minicomp" / "files" / "variance" / "variance_downstream.npy"
    assert target.exists()
    assert re.search(rf"^  VAS target \(vas_clip_score\): +{re.escape(str(target))}$", printed, re.M)
    assert f"--target_variance_name downstream --files_path {out / 'minicomp' / 'files'}" in printed
    command = next(x.strip() for x in printed.splitlines() if x.strip().startswith("varalign filter "))
    argv = shlex.split(command)[1:]
    assert argv[argv.index("--target") + 1] == str(target)
    assert main([*argv, "--quiet"]) == 0
    rerun = np.load(argv[argv.index("--save_path") + 1])
    assert np.array_equal(rerun, np.load(out / "subsets" / "vas_clip_score.npy"))


def test_cli_reuses_the_pool(demo, capsys) -> None:
    out, _, first, _ = demo
    assert main(["demo", "--out_dir", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    again = captured.out
    assert "%|" not in captured.err and "methods:" not in captured.err  # --quiet: no progress
    assert "reusing the mini pool" in again and "building" not in again
    assert "built without Fashion-MNIST" in again  # the note, on reuse too
    assert {m: k for m, (k, _) in _table(again).items()} == {m: k for m, (k, _) in _table(first).items()}
    assert "were reused" in again  # the subsets are up to date: not recomputed
    assert "minicomp's v4" not in again


def test_reusing_a_v4_pool_says_so(demo, tmp_path, capsys) -> None:
    """A pool an earlier version built (v4: no off-target kinds) is reused with a note saying how to get v5."""
    import json
    import shutil

    out = demo[0]
    shutil.copytree(out / "minicomp", tmp_path / "mc")
    manifest = json.loads((tmp_path / "mc" / "minicomp.json").read_text())
    for key in ("p_rendered_text", "p_off_domain", "p_low_info"):  # a v4 build's manifest has none of these
        manifest["config"].pop(key, None)
    (tmp_path / "mc" / "minicomp.json").write_text(json.dumps(manifest))
    assert main(["demo", "--out_dir", str(tmp_path / "o"), "--build_dir", str(tmp_path / "mc"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "reusing the mini pool" in printed and "minicomp's v4" in printed and str(tmp_path / "mc") in printed


def test_train_short(demo, capsys) -> None:
    pytest.importorskip("clip_benchmark")
    from varalign.demo import run_demo

    out, _, _, _ = demo
    res = run_demo(str(out), train=True, train_methods=["clip_score_30"], train_num_samples=64, quiet=True)["train"]
    printed = capsys.readouterr().out
    assert set(res["methods"]) == {"clip_score_30"} and res["methods"]["clip_score_30"]["samples"] >= 90
    assert "| clip_score_30 | " in printed and (out / "results.md").exists()
    assert all(0 <= v["mean"] <= 1 for r in res["methods"].values() for v in r["metrics"].values())


def test_missing_train_stack_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    assert main(["demo", "--out_dir", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "open_clip" in err
    assert "pip install -e '.[demo]'" in err and "varalign demo --synthetic" in err
    assert not (tmp_path / "d" / "minicomp" / "minicomp.json").exists()


def test_flags_of_the_other_demo_refused(tmp_path, capsys) -> None:
    assert main(["demo", "--out_dir", str(tmp_path), "--num_samples", "10"]) == 1
    assert main(["demo", "--synthetic", "--out_dir", str(tmp_path), "--train"]) == 1
    assert "--synthetic only" in capsys.readouterr().err


def test_synthetic_demo_runs_and_reuses_pool(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    args = [
        "demo",
        "--synthetic",
        "--out_dir",
        str(out),
        "--num_samples",
        "2000",
        "--num_shards",
        "2",
        "--num_iters",
        "3",
        "--quiet",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "SYNTHETIC" in first
    for name, selected in (("clip_score", None), ("vas", 600), ("vas_d", 600)):
        uids = np.load(out / "uids" / f"{name}.npy")
        assert uids.dtype == UID_DTYPE
        if selected:
            assert len(uids) == selected
        assert f"{out / 'uids' / name}.npy" in first
        assert (out / "uids" / f"{name}.manifest.json").exists()
        assert pq.read_table(out / "scores" / f"{name}.parquet").num_rows == 2000
    html = (out / "report.html").read_text()
    assert "report (open in a browser)" in first and "vas_d" in html and "synthetic_caption_kind" in html
    assert main(args) == 0
    assert "generating" not in capsys.readouterr().out  # the pool is reused


def test_training_progress_from_log_lines(tmp_path, capsys) -> None:
    """open_clip_train's `Train Epoch` lines move the bar (samples seen over all epochs, the epoch); the output
    is kept in the log file and its last lines are returned; quiet shows nothing."""
    from varalign.experiment.train import run_with_progress

    script = tmp_path / "fake_train.py"
    script.write_text(
        "import sys\n"
        "print('starting', flush=True)\n"
        "for e in range(2):\n"
        "    for n in (64, 100):\n"
        "        print(f'2026 | INFO | Train Epoch: {e} [{n:>4}/128 ({n * 100 // 128}%)] Loss: 1.0', file=sys.stderr,"
        " flush=True)\n"
        "print('finished')\n"
        "sys.exit(3)\n"
    )
    log = tmp_path / "train.log"
    code, tail = run_with_progress([sys.executable, str(script)], None, total=200, epochs=2, desc="fake",
                                   log_path=log)
    assert code == 3 and tail[0] == "starting" and tail[-1] == "finished" and len(tail) == 6
    assert log.read_text().splitlines() == tail
    states = _bar_states(capsys.readouterr().err, "fake")
    # samples per epoch from the log (128, not total/epochs = 100); the second epoch counts on from the first
    assert any("| 64/256 [" in x and "epoch 1/2" in x for x in states)
    assert any("| 192/256 [" in x and "epoch 2/2" in x for x in states)
    assert "| 228/256 [" in states[-1] and "epoch 2/2" in states[-1]
    code, _ = run_with_progress([sys.executable, str(script)], None, total=200, epochs=2, desc="fake", quiet=True)
    assert code == 3 and capsys.readouterr().err == ""


def test_demos_never_build_over_a_users_files(tmp_path, capsys) -> None:
    """A pool folder holding the user's files is not built over (the synthetic demo's `pool/`, a
    `--build_dir` that is no minicomp build): one line, the files untouched."""
    (tmp_path / "u" / "pool").mkdir(parents=True)
    (tmp_path / "u" / "pool" / "00000000.parquet").write_text("mine")
    argv = ["demo", "--synthetic", "--out_dir", str(tmp_path / "u"), "--num_samples", "2000", "--num_shards", "2",
            "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "holds files that are not a varalign demo pool: not touched" in err and err.count("\n") == 1
    assert (tmp_path / "u" / "pool" / "00000000.parquet").read_text() == "mine"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "00000000.tar").write_text("mine")
    assert main(["demo", "--out_dir", str(tmp_path / "d"), "--build_dir", str(tmp_path / "b"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "holds no minicomp build: not touched" in err and err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["00000000.tar"]
    (tmp_path / "r").mkdir()  # a report.html of the user's: refused before any work (nothing else written)
    (tmp_path / "r" / "report.html").write_text("<html>mine</html>")
    assert main(["demo", "--synthetic", "--out_dir", str(tmp_path / "r"), "--num_samples", "2000", "--quiet"]) == 1
    assert "is not a varalign report: not overwritten" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.html"]
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--synthetic", "--out_dir", str(tmp_path / "z"), "--num_samples", "0"])
    assert exited.value.code == 2 and "--num_samples: must be an integer >= 1" in capsys.readouterr().err
