"""A synthetic DataComp-format pool: parquet + compressed npz shards with the real schema.

The embeddings are SYNTHETIC (no images): each sample belongs to a "concept" drawn from a
Zipf law; image and text embeddings of both archs are noisy projections of a shared latent,
so CLIP scores, VAS and VAS-D have structure to find. A caption is aligned, of the wrong
concept, or uninformative, in known proportions. Used by the tests, `varalign demo` and the
benchmarks; a real-image pool comes with `varalign minicomp` (see the README).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path, save_npy
from .execute import ProcessExecutor
from .npz import write_npz  # the writer lives beside the reader; `varalign.synth.write_npz` still works
from .pool import ARCHS, SCORE_COLUMN, image_key, text_key
from .uids import uids_to_hex

CONCEPTS = (
    "dog cat car bicycle airplane ship truck bird horse deer frog boat shoe shirt dress bag "
    "sneaker sandal coat pullover trouser watch chair table lamp sofa bed clock phone laptop "
    "camera guitar piano flower tree mountain beach river bridge house castle tower cake pizza "
    "apple banana coffee book map logo chart text screenshot poster sign ring necklace hat "
    "glasses ball kite tent"
).split()
LATENT = 48
_TEMPLATES = ("a photo of a {}", "{} for sale", "close-up of the {} on a table", "my new {}",
              "a {} in the wild", "high quality {} image", "the best {} of 2023")
_JUNK = ("IMG_{:04d}.jpg", "click to enlarge", "image", "untitled", "DSC{:05d}", "thumbnail")


@dataclass(frozen=True)
class SynthWorld:
    """The hidden generative model: concept centres and per-arch projections (seeded)."""

    seed: int
    centres: np.ndarray  # (K, LATENT)
    proj: dict[str, np.ndarray]  # arch -> (LATENT, D)
    popularity: np.ndarray  # (K,) Zipf probabilities

    @classmethod
    def make(cls, seed: int = 0) -> SynthWorld:
        rng = np.random.default_rng([seed, 1])
        k = len(CONCEPTS)
        centres = rng.standard_normal((k, LATENT))
        proj = {a: rng.standard_normal((LATENT, d)) / np.sqrt(LATENT) for a, d in ARCHS.items()}
        pop = 1.0 / np.arange(1, k + 1) ** 1.1
        return cls(seed, centres, proj, pop / pop.sum())

    def embed(self, latent: np.ndarray, arch: str, rng: np.random.Generator, noise: float) -> np.ndarray:
        x = latent @ self.proj[arch]
        x += noise * rng.standard_normal(x.shape)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float16)

    def downstream(self, n: int, concepts: list[int], arch: str = "l14", seed: int = 7) -> np.ndarray:
        """Unit-norm image embeddings of a 'downstream task' covering `concepts` uniformly."""
        rng = np.random.default_rng([self.seed, seed])
        c = rng.choice(concepts, size=n)
        lat = self.centres[c] + 0.6 * rng.standard_normal((n, LATENT))
        return self.embed(lat, arch, rng, 0.15)


def make_shard(world: SynthWorld, path_stem: str, start: int, n: int, compress_level: int = 1) -> None:
    """Write `{path_stem}.parquet` and `{path_stem}.npz` for samples start..start+n."""
    rng = np.random.default_rng([world.seed, 2, start])
    concept = rng.choice(len(CONCEPTS), size=n, p=world.popularity)
    kind = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])  # aligned, wrong concept, uninformative
    img_lat = world.centres[concept] + 0.6 * rng.standard_normal((n, LATENT))
    low_info = rng.random(n) < 0.05  # blank-ish images: weak latent
    img_lat[low_info] *= 0.1
    txt_concept = np.where(kind == 1, rng.integers(0, len(CONCEPTS), n), concept)
    txt_lat = np.where((kind == 0)[:, None], img_lat, world.centres[txt_concept]) \
        + 0.8 * rng.standard_normal((n, LATENT))
    txt_lat[kind == 2] = rng.standard_normal((int((kind == 2).sum()), LATENT))
    arrays, scores = {}, {}
    for arch in ARCHS:
        img = world.embed(img_lat, arch, rng, 0.5)
        txt = world.embed(txt_lat, arch, rng, 0.5)
        dot = np.einsum("ij,ij->i", img.astype(np.float32), txt.astype(np.float32))
        scores[SCORE_COLUMN[arch]] = (0.25 * dot + 0.1).astype(np.float16).astype(np.float32)
        arrays[image_key(arch)] = img
        arrays[text_key(arch)] = txt
    uid_words = rng.integers(0, np.iinfo(np.uint64).max, size=(n, 2), dtype=np.uint64, endpoint=True)
    uids = np.empty(n, dtype="u8,u8")
    uids["f0"], uids["f1"] = uid_words[:, 0], uid_words[:, 1]
    width = np.clip(rng.lognormal(6.0, 0.7, n), 16, 4096).astype(np.int64)
    height = np.clip(width * rng.lognormal(0, 0.5, n), 16, 4096).astype(np.int64)
    table = pa.table({
        "uid": uids_to_hex(uids),
        "url": pa.array([f"https://images.invalid/{start + i}.jpg" for i in range(n)]),
        "text": pa.array(_captions(rng, kind, txt_concept)),
        "original_width": width,
        "original_height": height,
        **{k: pa.array(v) for k, v in scores.items()},
        "face_bboxes": pa.array([[] for _ in range(n)], type=pa.list_(pa.list_(pa.float64()))),
        "sha256": uids_to_hex(uids[::-1].copy()),
        "synthetic_concept": pa.array(concept.astype(np.int32)),
        "synthetic_caption_kind": pa.array(np.array(["aligned", "wrong_concept", "uninformative"])[kind]),
    })
    with atomic_path(path_stem + ".npz", ".npz") as tmp:
        write_npz(tmp, arrays, compress_level)
    with atomic_path(path_stem + ".parquet", ".parquet") as tmp:
        pq.write_table(table, tmp)


def _captions(rng: np.random.Generator, kind: np.ndarray, concept: np.ndarray) -> list[str]:
    out = []
    tpl = rng.integers(0, len(_TEMPLATES), len(kind))
    junk = rng.integers(0, len(_JUNK), len(kind))
    num = rng.integers(0, 99999, len(kind))
    for k, c, t, j, x in zip(kind, concept, tpl, junk, num, strict=True):
        out.append(_JUNK[j].format(x) if k == 2 else _TEMPLATES[t].format(CONCEPTS[c]))
    return out


def make_pool(out_dir: str | os.PathLike, num_samples: int = 50_000, num_shards: int = 10, seed: int = 0,
              num_workers: int = 1, compress_level: int = 1) -> list[str]:
    """Write a synthetic pool of `num_samples` rows in `num_shards` shards named `{i:08d}` (through the
    executor's processes when `num_workers` > 1: generating a shard is mostly Python and numpy calls)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = SynthWorld.make(seed)
    bounds = np.linspace(0, num_samples, num_shards + 1).astype(int)
    jobs = [(world, str(out / f"{i:08d}"), int(bounds[i]), int(bounds[i + 1] - bounds[i]), compress_level)
            for i in range(num_shards)]
    ProcessExecutor(max(1, num_workers)).map(make_shard, jobs, "synthetic pool", quiet=True)
    return [j[1] for j in jobs]


def make_target(path: str | os.PathLike, seed: int = 0, arch: str = "l14", n: int = 20_000,
                concepts: list[int] | None = None) -> np.ndarray:
    """Save the second moment of a synthetic downstream set (the stand-in for ImageNet-1k)."""
    world = SynthWorld.make(seed)
    concepts = concepts if concepts is not None else list(range(0, len(CONCEPTS), 3))
    f = world.downstream(n, concepts, arch).astype(np.float64)
    target = (f.T @ f / n).astype(np.float32)
    save_npy(path, target)
    return target
