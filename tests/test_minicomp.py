"""`varalign minicomp build`: a tiny real-image pool (a few hundred samples, a teacher trained for a few
steps) in DataComp format, its noise proportions, filtering it, and its downstream task folders."""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("PIL")
pytest.importorskip("torch")
pytest.importorskip("open_clip")
pytest.importorskip("open_clip_train")
pytest.importorskip("clip_benchmark")

import pyarrow.parquet as pq  # noqa: E402

from varalign import filter_pool, load_subset  # noqa: E402
from varalign.minicomp import LABEL_COLUMNS, BuildConfig, build  # noqa: E402
from varalign.minicomp.build import TEACHER_NAME, generate_pool  # noqa: E402
from varalign.minicomp.sources import load_sources  # noqa: E402

DATACOMP_COLUMNS = ("uid", "key", "text", "url", "original_width", "original_height", "sha256",
                    "clip_l14_similarity_score")
SMALL = BuildConfig(size=300, shard_size=120, teacher_samples=128, teacher_batch=64, fashion_test_size=60,
                    use_mnist=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("minicomp") / "mc"
    return build(root, SMALL, quiet=True)


def _parquets(result) -> list[Path]:
    return sorted(Path(result.metadata_dir).glob("*.parquet"))


def test_datacomp_format(built) -> None:
    paths = _parquets(built)
    assert [p.stem for p in paths] == ["00000000", "00000001", "00000002"]
    uids = []
    for p in paths:
        table = pq.read_table(p)
        for col in (*DATACOMP_COLUMNS, *LABEL_COLUMNS):
            assert col in table.column_names, col
        with zipfile.ZipFile(p.with_suffix(".npz")) as zf:
            assert sorted(zf.namelist()) == ["l14_img.npy", "l14_txt.npy"]
        npz = np.load(p.with_suffix(".npz"))
        img, txt = npz["l14_img"], npz["l14_txt"]
        assert img.shape == txt.shape == (table.num_rows, 768) and img.dtype == np.float16
        assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1, atol=1e-2)
        score = (img.astype(np.float32) * txt.astype(np.float32)).sum(1)
        assert np.allclose(table.column("clip_l14_similarity_score").to_numpy(), score, atol=2e-3)
        uids += table.column("uid").to_pylist()
        w, h = table.column("original_width").to_numpy(), table.column("original_height").to_numpy()
        assert (np.minimum(w, h) < 200).any() and (np.minimum(w, h) >= 200).any()
    assert len(uids) == len(set(uids)) == SMALL.size
    assert all(len(u) == 32 and int(u, 16) >= 0 for u in uids)
    manifest = json.loads((Path(built.build_dir) / "minicomp.json").read_text())
    assert manifest["complete"] and manifest["result"]["counts"]["pool"] == SMALL.size
    assert Path(built.teacher_checkpoint).exists()
    assert np.load(built.target).shape == (768, 768)
    assert np.load(Path(built.normsim_dir) / "train_features.npy").shape[1] == 768


def test_labels_match_counts(built) -> None:
    got: dict[str, dict[str, int]] = {c: {} for c in LABEL_COLUMNS}
    for p in _parquets(built):
        table = pq.read_table(p, columns=list(LABEL_COLUMNS))
        for c in LABEL_COLUMNS:
            for v in table.column(c).to_pylist():
                got[c][v] = got[c].get(v, 0) + 1
    for c in LABEL_COLUMNS:
        assert got[c] == built.counts[c]


def test_noise_proportions_and_determinism() -> None:
    cfg = BuildConfig(size=6000, seed=3)
    sources = load_sources(cfg.seed, use_mnist=False, fashion_test_size=10)
    samples = generate_pool(sources, cfg)
    n = len(samples)

    def share(col: str, value: str, among=None) -> float:
        rows = [s for s in samples if among is None or among(s)]
        return sum(s[col] == value for s in rows) / len(rows)

    assert abs(share("label_image_kind", "near_duplicate") - cfg.p_near_duplicate) < 0.02
    assert abs(share("label_image_kind", "blank") - cfg.p_blank) < 0.015
    assert abs(share("label_image_kind", "noise") - cfg.p_noise) < 0.015

    def has_class(s: dict) -> bool:
        return s["label_class"] != "none"

    for kind, p in (("wrong_class", cfg.p_wrong_class), ("uninformative", cfg.p_uninformative),
                    ("non_english", cfg.p_non_english)):
        assert abs(share("label_caption_kind", kind, has_class) - p) < 0.025, kind
    assert {s["label_language"] for s in samples if s["label_caption_kind"] == "non_english"} == {"de", "fr", "es"}
    # the over-represented class of each source takes ~overrep_share of that source's clean draws
    for src in sources:
        clean = [s for s in samples if s["label_source"] == src.name and s["label_image_kind"] == "clean"]
        top = max({s["label_class"] for s in clean}, key=lambda c: sum(s["label_class"] == c for s in clean))
        assert abs(sum(s["label_class"] == top for s in clean) / len(clean) - cfg.overrep_share) < 0.05
    # near-duplicates point at an earlier sample of the same class
    by_uid = {s["uid"]: s for s in samples}
    for s in samples:
        if s["label_image_kind"] == "near_duplicate":
            assert by_uid[s["meta"]["duplicate_of"]]["label_class"] == s["label_class"]
    assert len({s["uid"] for s in samples}) == n
    again = generate_pool(load_sources(cfg.seed, use_mnist=False, fashion_test_size=10), cfg)
    assert [s["text"] for s in again] == [s["text"] for s in samples]
    assert all(np.array_equal(a["_img"], b["_img"]) for a, b in zip(again, samples, strict=True))
    other = generate_pool(sources, BuildConfig(size=200, seed=4))
    assert [s["text"] for s in other] != [s["text"] for s in samples[:200]]
    # aligned captions name attributes of their own image (each with p_attribute); wrong-class ones name
    # random ones as often, so the words alone do not tell the two apart
    from varalign.minicomp.build import _cuts
    from varalign.minicomp.captions import ATTRIBUTES, attribute_words

    by_name = {src.name: src for src in sources}

    def named(s: dict) -> dict[str, str]:
        kind = by_name[s["label_source"]].kind
        found = {a: w for a, ws in ATTRIBUTES[kind].items() for w in ws if w and f" {w} " in f" {s['text']} "}
        return found

    aligned = [s for s in samples if s["label_caption_kind"] == "aligned"]
    with_words = [s for s in aligned if named(s)]
    assert 0.7 < len(with_words) / len(aligned) < 0.95
    agree = [named(s).items() <= attribute_words(by_name[s["label_source"]].kind, s["_img"],
                                                 _cuts(by_name[s["label_source"]])).items() for s in with_words]
    assert all(agree)
    wrong = [s for s in samples if s["label_caption_kind"] == "wrong_class" and s["label_source"] != "synthetic"]
    assert abs(sum(bool(named(s)) for s in wrong) / len(wrong) - len(with_words) / len(aligned)) < 0.1


def test_filters_run(built, tmp_path: Path) -> None:
    cs = filter_pool(built.metadata_dir, tmp_path / "cs.npy", name="clip_score", arch="l14", fraction=0.3,
                     num_workers=1, quiet=True)
    assert len(load_subset(tmp_path / "cs.npy")) == len(cs.uids) >= int(SMALL.size * 0.3)
    vas = filter_pool(built.metadata_dir, tmp_path / "vas.npy", name="vas", arch="l14", fraction=0.45,
                      fraction_vas=0.3, target=built.target, num_workers=1, quiet=True)
    assert len(vas.uids) == int(SMALL.size * 0.3)
    vas_named = filter_pool(built.metadata_dir, tmp_path / "vas2.npy", name="vas", arch="l14", fraction=0.45,
                            fraction_vas=0.3, files_path=str(Path(built.build_dir) / "files"),
                            target_variance_name="downstream", num_workers=1, quiet=True)
    assert np.array_equal(vas_named.uids, vas.uids)
    ns = filter_pool(built.metadata_dir, tmp_path / "ns.npy", name="negcliploss", arch="l14", fraction=0.3,
                     fraction_vas=0.2, proxy_path=built.normsim_dir, num_workers=1, quiet=True)
    assert len(ns.uids) == int(SMALL.size * 0.2)


def test_tasks_readable_by_evaluate(built, tmp_path: Path) -> None:
    import open_clip

    from varalign.experiment import evaluate

    eval_dir = Path(built.eval_dir)
    assert sorted(p.name for p in eval_dir.iterdir()) == ["minicomp_fashion_mnist", "minicomp_retrieval", "mnist"] \
        or sorted(p.name for p in eval_dir.iterdir()) == ["minicomp_retrieval", "mnist"]
    open_clip.add_model_config(Path(built.build_dir) / "teacher" / f"{TEACHER_NAME}.json")
    # the whole eval/ folder as custom tasks: `mnist` is DataComp's key, the minicomp_* folders are custom
    rep = evaluate(tasks_dir=eval_dir, output_dir=tmp_path / "ev", batch_size=128,
                   use_model=(TEACHER_NAME, built.teacher_checkpoint), quiet=True)
    assert set(rep.main_metrics) == {p.name for p in eval_dir.iterdir()}
    assert all(0 <= v <= 1 for v in rep.main_metrics.values())
    assert rep.custom["minicomp_retrieval"]["kind"] == "retrieval" and "mnist" not in rep.custom
    assert rep.groups["Average over 38 datasets"]["n"] == 1 and not rep.missing


def test_retrieval_captions_tell_images_of_a_class_apart(built) -> None:
    import tarfile

    with tarfile.open(Path(built.eval_dir) / "minicomp_retrieval" / "test" / "0.tar") as tf:
        texts = [tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")]
    assert len(texts) == built.counts["tasks"]["minicomp_retrieval"] and all(t.count("\n") == 1 for t in texts)
    # class-only captions gave at most 20 distinct descriptions; the attributes give many more
    from varalign.minicomp.captions import ATTRIBUTES

    vocab = {w for kind in ATTRIBUTES.values() for ws in kind.values() for w in ws if w}
    described = {frozenset(w for w in t.split("\n")[0].split() if w in vocab) for t in texts}
    assert len(described) >= 8


def test_rebuild_is_reused_and_other_config_refused(built) -> None:
    from varalign.errors import VaralignError

    again = build(built.build_dir, SMALL, quiet=True)
    assert again.counts == built.counts
    with pytest.raises(VaralignError, match="another configuration"):
        build(built.build_dir, BuildConfig(size=301), quiet=True)


def test_cli_wiring() -> None:
    from varalign.minicomp.cli import register_minicomp

    parser = argparse.ArgumentParser()
    register_minicomp(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["minicomp", "build", "out", "--size", "500", "--seed", "2", "--arch", "b32"])
    assert (args.build_dir, args.size, args.seed, args.arch) == ("out", 500, 2, "b32")
    assert callable(args.func)


def test_run_three_methods(built, tmp_path: Path, capsys) -> None:
    import re

    from varalign.minicomp.run import run

    res = run(built.build_dir, tmp_path / "run", methods=["random_30", "clip_score_30", "image_based"], seeds=[0],
              train_num_samples=128, quiet=False)
    assert set(res["methods"]) == {"random_30", "clip_score_30", "image_based"} and not res["skipped"]
    # progress on stderr: the runs done out of all, and each training's samples seen (from its log lines)
    err = capsys.readouterr().err
    states = [x.strip() for x in re.split(r"[\r\n]", err) if x.strip()]
    assert re.search(r"^minicomp run: 100%\|.*\| 3/3 \[", [x for x in states if x.startswith("minicomp run:")][-1])
    for method in res["methods"]:
        train_bar = [x for x in states if x.startswith(f"train {method}_seed_0:")]
        assert train_bar and re.search(r"\| 128/128 \[.*epoch 1/1\]$", train_bar[-1]), method
    assert "minicomp run: clip_score_30_seed_0: " in err
    assert (Path(built.build_dir) / "centroids" / "pool_centroids.npy").exists()  # image_based built its centroids
    svg = (tmp_path / "run" / "results.svg").read_text()
    assert svg.startswith("<svg") and "clip_score_30" in svg and "mnist" in svg
    for name, r in res["methods"].items():
        if name != "image_based":
            assert r["samples"] >= int(SMALL.size * 0.3)  # clip_score keeps ties at the cut
        assert r["samples"] > 0
        assert set(r["metrics"]) >= {"mnist", "minicomp_retrieval"}
        assert all(0 <= v["mean"] <= 1 for v in r["metrics"].values())
        assert set(r["kept_share"]["label_caption_kind"]) == set(built.counts["label_caption_kind"])
    assert "clip_score_30" in (tmp_path / "run" / "results.md").read_text()
    # a re-run resumes through the experiment loop's work directory: nothing is selected, trained or evaluated
    again = run(built.build_dir, tmp_path / "run", methods=["random_30", "clip_score_30", "image_based"], seeds=[0],
                train_num_samples=128, quiet=False)
    assert again == res and "train random_30_seed_0:" not in capsys.readouterr().err
    assert (tmp_path / "run" / ".experiment-work" / "train" / "clip_score_30_seed_0.done").exists()
