"""Shared fixtures: tiny DataComp-format pools generated on the fly (no network, no GPU)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from varalign.synth import make_pool, make_target, write_npz
from varalign.uids import uids_to_hex


def pytest_configure(config: pytest.Config) -> None:
    """Hermetic: no user caches (~/.cache/datacomp, ~/.cache/fasttext) and never the network."""
    os.environ["HOME"] = tempfile.mkdtemp(prefix="varalign-test-home-")
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def synth_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3,000-row synthetic pool in 3 shards (read-only: copy it before corrupting it)."""
    root = tmp_path_factory.mktemp("synth")
    make_pool(root / "pool", num_samples=3000, num_shards=3, seed=1)
    make_target(root / "files" / "variance" / "variance_imagenet_1k.npy", seed=1, n=2000)
    return root


def write_pool(root: Path, shards: list[dict], compress: bool = True) -> Path:
    """Write a hand-made pool: each shard dict has `uid` (list[str]) and any other columns/arrays.

    Keys ending in `_img`/`_txt` go to the npz; the rest to the parquet.
    """
    root.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(shards):
        arrays = {k: v for k, v in shard.items() if k.endswith(("_img", "_txt"))}
        cols = {k: v for k, v in shard.items() if k not in arrays}
        pq.write_table(pa.table(cols), root / f"{i:08d}.parquet")
        if arrays:
            if compress:
                write_npz(root / f"{i:08d}.npz", arrays)
            else:
                np.savez(root / f"{i:08d}.npz", **arrays)
    return root


def random_shard(rng: np.random.Generator, n: int, dim: int = 768, arch: str = "l14") -> dict:
    """A shard of `n` random unit-norm float16 embeddings with float16-valued CLIP scores."""
    uids = np.empty(n, dtype="u8,u8")
    uids["f0"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    uids["f1"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    img = rng.standard_normal((n, dim))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.standard_normal((n, dim))
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    score = rng.normal(0.25, 0.05, n).astype(np.float16).astype(np.float32)
    return {
        "uid": uids_to_hex(uids).to_pylist(),
        f"clip_{arch}_similarity_score": score,
        "text": [f"caption {i}" for i in range(n)],
        f"{arch}_img": img.astype(np.float16),
        f"{arch}_txt": txt.astype(np.float16),
    }
