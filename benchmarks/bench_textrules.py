"""Throughput of the caption rules in varalign.scores.textrules (captions per second).

    PYTHONPATH=src python benchmarks/bench_textrules.py [--n 200000] [--json out.json]

Captions are synthetic alt-text-like strings: about 3/4 English-like word sequences drawn
from a Zipf distribution over a fixed vocabulary (so the per-word WordNet cache sees a
realistic mix of repeats and new words), 1/4 in other languages, plus SKU/number tokens,
newlines and empty captions. Each rule runs twice in a row: "first" is its first call in
the process (it pays for loading the fastText model or the WordNet tables and for filling
the word cache unless an earlier rule already did), "again" is the second call.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import numpy as np

from varalign.scores import textrules as tr

EN = (
    "a the of photo image dog cat man woman girl boy car house tree beach sunset city "
    "street table chair sofa kitchen garden flower red blue green white black old new "
    "vintage modern wooden leather cotton shirt dress shoes bag phone laptop book coffee "
    "pizza cake bread water mountain lake river sky cloud snow winter summer autumn "
    "wedding party family children people playing running sitting standing on in with "
    "and for at near under over next to view close up portrait stock vector illustration "
    "logo icon design pattern background texture abstract art painting drawing poster"
).split()
OTHER = (
    "Ein Hund spielt im Park|Un chat noir dort sur le canapé|Casa en venta con jardín|"
    "Vista panoramica delle colline toscane|Um gato dormindo no sofá|Кошка спит на диване|"
    "公園で遊ぶ犬|上海外滩夜景|공원에서 노는 강아지|قطة نائمة على الأريكة|Pies bawi się w parku"
).split("|")


def make_captions(n: int, seed: int = 0) -> list[str]:
    """`n` synthetic captions (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    words = np.array(EN + [f"w{i}" for i in range(20000)])  # long tail of rare tokens
    ranks = np.minimum(rng.zipf(1.3, size=n * 12), len(words)) - 1
    lengths = rng.integers(1, 16, size=n)
    out, pos = [], 0
    for i in range(n):
        kind = rng.random()
        if kind < 0.2:
            out.append(f"{OTHER[i % len(OTHER)]} {i}")
            continue
        caption = " ".join(words[ranks[pos : pos + lengths[i]]])
        pos += lengths[i]
        if kind < 0.25:
            caption = caption.replace(" ", "\n", 1)
        elif kind < 0.27:
            caption = f"SKU-{i:08d} {caption}"
        elif kind < 0.28:
            caption = ""
        out.append(caption)
    return out


def rules() -> dict[str, Callable[[list[str]], np.ndarray]]:
    return {
        "basic_caption_rule": tr.basic_caption_rule,
        "fasttext_token_count > 1": lambda t: tr.fasttext_token_count(t) > 1,
        "fasttext_english": tr.fasttext_english,
        "image_based_caption_rule": tr.image_based_caption_rule,
        "wordnet_imagenet21k": tr.wordnet_imagenet21k,
        "text_based_rule": tr.text_based_rule,
        "gcld3_english": tr.gcld3_english,
    }


def timed(fn: Callable[[list[str]], np.ndarray], captions: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    mask = fn(captions)
    return time.perf_counter() - start, float(np.mean(mask))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="captions per rule")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    captions = make_captions(args.n)
    size_w = np.random.default_rng(1).integers(50, 2000, size=args.n)
    size_h = np.random.default_rng(2).integers(50, 2000, size=args.n)
    results = {}
    print(f"{args.n} captions, {platform.python_version()}, one process, one thread")
    print(f"{'rule':28s} {'first cap/s':>12s} {'again cap/s':>12s} {'kept':>6s}")
    for name, fn in rules().items():
        try:
            cold, kept = timed(fn, captions)
            warm, _ = timed(fn, captions)
        except tr.TextRuleAssetError as err:
            print(f"{name:28s} skipped: {err}")
            continue
        results[name] = {"first": args.n / cold, "again": args.n / warm, "kept": kept}
        print(f"{name:28s} {args.n / cold:12,.0f} {args.n / warm:12,.0f} {kept:6.3f}")
    start = time.perf_counter()
    tr.basic_size_rule(size_w, size_h)
    size_rate = args.n / (time.perf_counter() - start)
    results["basic_size_rule"] = {"again": size_rate}
    print(f"{'basic_size_rule':28s} {'':12s} {size_rate:12,.0f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"n": args.n, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
