"""`varalign minicomp build`: a tiny real-image pool (a few hundred samples, a teacher trained for a few
steps) in DataComp format, its noise proportions, filtering it, and its downstream task folders."""

from __future__ import annotations

import argparse
import json
import os
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
from varalign.minicomp import offtarget as off  # noqa: E402
from varalign.minicomp.build import TEACHER_NAME, generate_pool, identity, preset  # noqa: E402
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
    cfg = preset("v4", size=6000, seed=3)
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
    other = generate_pool(sources, preset("v4", size=200, seed=4))
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
    table = (tmp_path / "run" / "results.md").read_text()
    assert "clip_score_30" in table and "one seed: no spread to show" in table and "±" not in table
    # a re-run resumes through the experiment loop's work directory: nothing is selected, trained or evaluated
    again = run(built.build_dir, tmp_path / "run", methods=["random_30", "clip_score_30", "image_based"], seeds=[0],
                train_num_samples=128, quiet=False)
    assert again == res and "train random_30_seed_0:" not in capsys.readouterr().err
    assert (tmp_path / "run" / ".experiment-work" / "train" / "clip_score_30_seed_0.done").exists()


# ------------------------------------------------------------------------------------------- v5: off-target kinds

def _digest(samples: list[dict]) -> str:
    import hashlib

    m = hashlib.sha256()
    for s in samples:
        m.update(s["uid"].encode())
        m.update(s["text"].encode())
        m.update(np.ascontiguousarray(s["_img"]).tobytes())
        m.update(repr(sorted((k, str(v)) for k, v in s.items() if k.startswith("label_") or k == "meta")).encode())
    return m.hexdigest()


def test_v4_preset_is_v4() -> None:
    """`--preset v4` gives the pool of the v4 commit (digest taken from that commit's generate_pool) and the
    same build identity (so a v4 build directory is still recognised and reused)."""
    from dataclasses import fields

    from varalign.minicomp.build import _clean_samples

    sources = load_sources(0, use_mnist=True, fashion_test_size=1000)
    if [s.name for s in sources] != ["digits", "fashion_mnist", "mnist"]:
        pytest.skip("the v4 digest was taken with all three sources installed")
    assert _digest(generate_pool(sources, preset("v4", size=3000))) == \
        "b3fc7754d641a950bc90214c9e7a49a7ce308488450af41e8f625380ec0c3845"
    assert _digest(_clean_samples(sources, "teacher", 0, "teacher", p_attribute=0.6)) == \
        "f10a6324206908e1973ba939cbbc75ea5f313df26487a4a69189933d13b0aad1"
    v5_keys = {"p_rendered_text", "p_off_domain", "p_low_info", "p_class_word", "teacher_web_mix", "target_other"}
    assert set(identity(preset("v4"))) == {f.name for f in fields(BuildConfig)} - v5_keys
    assert v5_keys <= set(identity(BuildConfig()))


def test_offtarget_proportions_and_labels() -> None:
    cfg = BuildConfig(size=5000, seed=3)
    sources = load_sources(cfg.seed, use_mnist=False, fashion_test_size=10)
    samples = generate_pool(sources, cfg)
    n = len(samples)
    kinds = [s["label_image_kind"] for s in samples]
    for kind, p in (("rendered_text", cfg.p_rendered_text), ("off_domain", cfg.p_off_domain),
                    ("low_info", cfg.p_low_info)):
        assert abs(kinds.count(kind) / n - p) < 0.02, kind
        rows = [s for s in samples if s["label_image_kind"] == kind]
        assert {s["label_caption_kind"] for s in rows} == {"aligned"} and {s["label_language"] for s in rows} == {"en"}
    # the v4 kinds keep their shares among the in-domain samples
    rest = [s for s in samples if s["label_image_kind"] not in off.OFFTARGET_KINDS]
    assert abs(sum(s["label_image_kind"] == "near_duplicate" for s in rest) / len(rest) - cfg.p_near_duplicate) < 0.02
    for s in samples:
        if s["label_image_kind"] in ("rendered_text", "off_domain"):
            assert s["label_source"] == "synthetic" and s["label_class"] == "none"
        elif s["label_image_kind"] == "low_info":
            src, cls = s["label_class"].split(":")
            assert s["label_source"] == src and cls in s["text"]
            a = s["_img"]  # the same item four times
            assert np.array_equal(a[:16, :16], a[16:, 16:]) and np.array_equal(a[:16, :16], a[:16, 16:])
    # rendered text: the caption says the drawn word, which is a downstream class name about p_class_word often
    text = [s for s in samples if s["label_image_kind"] == "rendered_text"]
    class_words = {c for src in sources for c in src.classes}
    said = [_said(s["text"]) for s in text]
    assert abs(sum(w in class_words for w in said) / len(said) - cfg.p_class_word) < 0.06
    for s, w in list(zip(text, said, strict=True))[:200]:
        assert s["meta"]["drawn"]["text"] == w and _read_anywhere(s["_img"], w) == w.upper(), s["text"]
    assert _digest(generate_pool(load_sources(cfg.seed, use_mnist=False, fashion_test_size=10), cfg)) == _digest(samples)
    with pytest.raises(Exception, match="p_rendered_text"):
        generate_pool(sources, BuildConfig(size=10, p_rendered_text=0.7, p_off_domain=0.5))


def _said(caption: str) -> str:
    """The word a rendered-text caption says: what its template (the longest that matches) puts at {w}."""
    fits = []
    for t in off.TEXT_TEMPLATES:
        pre, post = t.split("{w}")
        if caption.startswith(pre) and caption.endswith(post) and len(caption) > len(pre) + len(post):
            fits.append((len(pre) + len(post), caption[len(pre):len(caption) - len(post)]))
    return max(fits)[1]


def _read_anywhere(img: np.ndarray, word: str) -> str:
    """Read `word`'s layout from an image without knowing where it was drawn: the paper is the median tone,
    the ink the tone farthest from it; the origin is where `word` drawn at its layout fits best; then every
    glyph cell is read against the whole font (so each glyph must be unambiguous in the pixels)."""
    scale, lines = off.layout(word)
    paper = float(np.median(img))
    ink = float(img.max()) if abs(float(img.max()) - paper) > abs(float(img.min()) - paper) else float(img.min())
    px, py = off.pitch(scale)
    mask = np.zeros((len(lines) * py, max(len(x) for x in lines) * px), bool)  # the word's glyph pixels
    for r, line in enumerate(lines):
        for c, ch in enumerate(line):
            if ch != " ":
                g = np.kron(off.FONT[ch], np.ones((scale, scale), bool))
                mask[r * py:r * py + g.shape[0], c * px:c * px + g.shape[1]] = g
    on = np.abs(img.astype(float) - ink) < np.abs(img.astype(float) - paper)
    padded = np.zeros((32 + mask.shape[0], 32 + mask.shape[1]), bool)
    padded[:32, :32] = on
    fits = {(y, x): int((padded[y:y + mask.shape[0], x:x + mask.shape[1]] == mask).sum())
            for y in range(32) for x in range(32)}
    origin = max(fits, key=fits.get)
    return off.read_text(img, {"scale": scale, "lines": lines, "origin": origin, "ink": ink, "paper": paper})


def test_rendered_text_is_legible_at_its_size() -> None:
    """Every class name and web word fits in 32×32 at scale 2 (6×10 glyphs) or 1 (3×5) and reads back from the
    pixels (noise included) to the word; the glyphs differ pairwise, so no two words draw alike."""
    words = [*off.WEB_WORDS, "t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
             "ankle boot", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rng = np.random.default_rng(0)
    scales = set()
    for w in words:
        for _ in range(10):
            img, info = off.draw_text(w, rng)
            assert img.shape == (32, 32) and off.read_text(img, info) == w.upper()
            scales.add(info["scale"])
            assert abs(info["ink"] - info["paper"]) >= 125  # contrast
    assert scales == {1, 2}
    assert off.layout("coat")[0] == 2 and off.layout("trousers")[0] == 1
    glyphs = list(off.FONT.values())
    assert all((a != b).any() for i, a in enumerate(glyphs) for b in glyphs[i + 1:])
    assert off.layout("a" * 9) is None


def test_off_domain_captions_describe_their_images() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(300):
        img, caption, facts = off.off_domain(rng)
        seen.add(facts["what"])
        ink_mid, paper_mid = (np.mean(r) for r in off.TONES[facts["tone"]])
        on = np.abs(img.astype(float) - ink_mid) < np.abs(img.astype(float) - paper_mid)
        if facts["what"] == "shapes":
            n = facts["count"]
            assert ndimage.label(on)[1] == n, caption
            assert (off.NUMBERS[n] if n > 1 else facts["shape"]) in caption and facts["tone"] in caption
            assert abs(img[on].mean() - np.mean(off.TONES[facts["tone"]][0])) < 40
        elif facts["what"] == "chart":
            assert ndimage.label(on)[1] == facts["count"] and f"{facts['count']} bars" in caption
        elif facts["what"] == "arrow":
            assert facts["direction"] in caption
            axis = 0 if facts["direction"] in ("left", "right") else 1  # the head is the widest part
            widest = int(np.argmax(on.sum(axis)))
            assert (widest > 16) == (facts["direction"] in ("right", "down")), caption
        else:
            kind = facts["pattern"]
            assert kind.removeprefix("a ") in caption
            rows, cols = on.mean(1), on.mean(0)
            if kind == "horizontal stripes":
                assert rows.std() > 0.4 and cols.std() < 0.1
            elif kind == "vertical stripes":
                assert cols.std() > 0.4 and rows.std() < 0.1
    assert seen == {"shapes", "pattern", "chart", "arrow"}


def test_teacher_scores_per_kind(built) -> None:
    """The build records the teacher's mean CLIP score per hidden kind and what CLIP score's top 30% keeps of
    each, as computed from the parquets (a 2-step teacher here: the numbers, not their order)."""
    scores = built.counts["teacher_scores"]
    for col in ("label_image_kind", "label_caption_kind"):
        assert {k: v["n"] for k, v in scores[col].items()} == built.counts[col]
    assert {"rendered_text", "off_domain", "low_info"} <= set(scores["label_image_kind"])
    x, kinds = [], []
    for p in _parquets(built):
        t = pq.read_table(p, columns=["clip_l14_similarity_score", "label_image_kind"])
        x += t.column(0).to_pylist()
        kinds += t.column(1).to_pylist()
    x, kinds = np.array(x), np.array(kinds)
    cut = np.sort(x)[::-1][int(len(x) * 0.3) - 1]
    for k, v in scores["label_image_kind"].items():
        assert v["mean"] == pytest.approx(x[kinds == k].mean(), abs=1e-4)
        assert v["kept_top"] == pytest.approx((x[kinds == k] >= cut).mean(), abs=1e-4)
    assert (Path(built.build_dir) / "files" / "variance" / "variance_other.npy").exists()


def test_two_builds_byte_identical(built, tmp_path: Path) -> None:
    again = build(tmp_path / "again", SMALL, quiet=True)
    a, b = Path(built.build_dir), Path(again.build_dir)
    files = [p.relative_to(a) for p in [*(a / "shards").glob("*.tar"), *(a / "metadata").glob("*.npz"),
                                        *(a / "files" / "variance").glob("*.npy")]]
    files.append(Path(built.teacher_checkpoint).relative_to(a))
    assert len(files) >= 6
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_shards_identical_whatever_the_worker_count(tmp_path: Path, monkeypatch) -> None:
    """write_shards encodes shards side by side in processes: one worker and two give the same bytes."""
    from varalign import execute  # noqa: PLC0415
    from varalign.minicomp.build import SIZE, write_shards  # noqa: PLC0415

    rng = np.random.default_rng(3)
    samples = [{"text": f"a photo of thing {i} é", "meta": {"label": i % 4},
                "_img": rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)} for i in range(23)]
    outs = {}
    for workers in (1, 2):
        monkeypatch.setattr(execute, "default_workers", lambda w=workers: w)
        out = tmp_path / f"w{workers}"
        assert write_shards(samples, out, shard_size=5, prefix="x") == 5
        outs[workers] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert len(outs[1]) == 10 and outs[1] == outs[2]


def test_paired_comparison_by_hand() -> None:
    from varalign.minicomp.run import paired, paired_table

    # d = (0.05, 0.02, 0.01): mean 0.08/3 = 0.026667; deviations (0.023333, -0.006667, -0.016667), squares sum
    # 0.00086667, / (n-1) = 0.00043333, sd = 0.020817, SE = sd/sqrt(3) = 0.012019, 2 SE = 0.024037 < mean
    p = paired([0.50, 0.52, 0.47], [0.45, 0.50, 0.46])
    assert p["diffs"] == pytest.approx([0.05, 0.02, 0.01])
    assert (p["mean"], p["sd"], p["se"]) == pytest.approx((0.0266667, 0.0208167, 0.0120185), abs=1e-6)
    assert p["verdict"] == "a better"
    # with the last seed's sign flipped, d = (0.05, 0.02, -0.01): mean 0.02, deviations (0.03, 0, -0.03), sd =
    # sqrt(0.0018 / 2) = 0.03, SE = 0.017321, 2 SE = 0.034641 > mean: inconclusive
    q = paired([0.50, 0.52, 0.45], [0.45, 0.50, 0.46])
    assert (q["mean"], q["sd"], q["se"]) == pytest.approx((0.02, 0.03, 0.0173205), abs=1e-6)
    assert q["verdict"] == "inconclusive"
    assert paired([0.1, 0.2], [0.3, 0.35])["verdict"] == "b better"  # d = (-0.2, -0.15): mean -0.175, SE 0.025
    res = {"seeds": [0, 1, 2], "methods": {
        "clip_score_30": {"per_seed": {str(s): {"t": v, "average": v} for s, v in enumerate([0.45, 0.50, 0.46])}},
        "vas_clip_score": {"per_seed": {str(s): {"t": v, "average": v} for s, v in enumerate([0.50, 0.52, 0.47])}}}}
    table = paired_table(res)
    assert set(table) == {"vas_clip_score"} and table["vas_clip_score"]["tasks"]["t"] == pytest.approx(0.0266667, abs=1e-6)


def test_run_never_replaces_a_users_results(built, tmp_path: Path) -> None:
    """results.md / .json / .svg in the run folder that varalign did not write stop `minicomp run` before any
    work; `overwrite` lets it replace them."""
    from varalign.errors import VaralignError
    from varalign.minicomp.run import run

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "results.md").write_text("my notes\n")
    with pytest.raises(VaralignError, match="results.md: exists and was not written by varalign"):
        run(built.build_dir, run_dir, methods=["no_filter"], quiet=True)
    assert (run_dir / "results.md").read_text() == "my notes\n" and sorted(os.listdir(run_dir)) == ["results.md"]
