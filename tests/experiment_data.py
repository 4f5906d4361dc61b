"""Tiny local data for the experiment tests: real images (scikit-learn's 8×8 digits, upscaled) as
img2dataset-style training shards and clip_benchmark-style evaluation webdatasets. No network."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the number {c}.", "the digit {c}.", "a handwritten {c}."]
_CAPTIONS = ["a photo of the number {c}", "the digit {c}", "a handwritten {c}", "{c} written by hand"]


def digits(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 sklearn digits as (N, size, size, 3) uint8 images and their labels.

    Without scikit-learn (varalign's core test environment, where only `reshard` is tested) the images
    are random noise: the resharder never decodes them.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        rng = np.random.default_rng(0)
        raw, target = rng.integers(0, 17, (1797, 8, 8)), rng.integers(0, 10, 1797)
    else:
        d = load_digits()
        raw, target = d.images, d.target
    img = (raw / 16.0 * 255).astype(np.uint8)
    img = np.kron(img, np.ones((1, size // 8, size // 8), dtype=np.uint8))
    return np.repeat(img[..., None], 3, axis=3), np.asarray(target).astype(int)


def png(arr: np.ndarray) -> bytes:
    """A (h, w, 3) uint8 image as PNG bytes (stdlib only, so no Pillow is needed to make test data)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def fake_uid(i: int) -> str:
    return hashlib.md5(f"sample-{i}".encode()).hexdigest()


def make_train_shards(root: Path, n: int = 300, per_shard: int = 100, with_uid: bool = True) -> list[str]:
    """img2dataset-like shards `{:08d}.tar` (+ `_stats.json`) of `n` digits with captions; returns uids
    (the json uid, or none when `with_uid` is False)."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = digits()
    uids = []
    for s in range(-(-n // per_shard)):
        rows = range(s * per_shard, min(n, (s + 1) * per_shard))
        with tarfile.open(root / f"{s:08d}.tar", "w") as tf:
            for i in rows:
                key = f"{s:04d}{i:05d}"
                caption = _CAPTIONS[i % len(_CAPTIONS)].format(c=NAMES[labels[i]])
                meta = {"key": key, "caption": caption, "width": 32, "height": 32}
                if with_uid:
                    meta["uid"] = fake_uid(i)
                    uids.append(meta["uid"])
                _add(tf, f"{key}.png", png(images[i]))
                _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps(meta).encode())
        (root / f"{s:08d}_stats.json").write_text(json.dumps({"count": len(rows), "successes": len(rows)}))
    return uids


def make_classification_task(task_dir: Path, start: int = 1000, n: int = 200) -> None:
    """A clip_benchmark `wds/` zero-shot classification set (test split) from held-out digits."""
    images, labels = digits()
    (task_dir / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(task_dir / "test" / "0.tar", "w") as tf:
        for k, i in enumerate(range(start, start + n)):
            _add(tf, f"s{k:07d}.png", png(images[i]))
            _add(tf, f"s{k:07d}.cls", str(int(labels[i])).encode())
    (task_dir / "test" / "nshards.txt").write_text("1\n")
    (task_dir / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    (task_dir / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")


def make_retrieval_task(task_dir: Path, start: int = 1400, n: int = 100) -> None:
    """A clip_benchmark `wds/` retrieval set: each image with two captions."""
    images, labels = digits()
    (task_dir / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(task_dir / "test" / "0.tar", "w") as tf:
        for k, i in enumerate(range(start, start + n)):
            c = NAMES[labels[i]]
            _add(tf, f"s{k:07d}.png", png(images[i]))
            _add(tf, f"s{k:07d}.txt", f"a photo of the number {c}\nthe digit {c}".encode())
    (task_dir / "test" / "nshards.txt").write_text("1\n")
    (task_dir / "dataset_type.txt").write_text("retrieval\n")


def make_subset(path: Path, uids: list[str]) -> None:
    """DataComp subset file (sorted u8,u8) of these hex uids, duplicates kept."""
    arr = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], dtype="u8,u8")
    arr.sort()
    np.save(path, arr)
