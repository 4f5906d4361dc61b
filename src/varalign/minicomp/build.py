"""`varalign minicomp build`: a small real-image DataComp-format pool with known noise, on one CPU.

Layout of the build directory:

- `shards/{:08d}.tar` (+ `_stats.json`): the pool as img2dataset-style webdataset shards (.png/.txt/.json)
- `metadata/{:08d}.parquet` + `.npz`: DataComp-format metadata embedded by the teacher, plus the hidden
  `label_*` columns (never read by the methods; `varalign report` breaks them down)
- `teacher/`: the teacher CLIP (config JSON, training shards, open_clip_train run and checkpoint)
- `eval/`: downstream tasks in clip_benchmark's `wds/` layout (`mnist/`, `minicomp_fashion_mnist/`,
  `minicomp_retrieval/`)
- `files/variance/variance_downstream.npy`: VAS target from the downstream training splits;
  `files/normsim_downstream/`: their teacher image features, a NormSim `--proxy_path`
- `minicomp.json`: configuration, counts per noise kind, times (written last: the build is complete)

A build resumes through its work directory (`.build-work`, `workdir.Steps`): each stage (pool shards,
tasks, teacher, pool metadata, targets) is a step recorded with its output files; a killed build redoes
only the stages it had not finished. The teacher trains through `experiment.train` (open_clip_train).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_path, save_json
from ..errors import VaralignError
from ..npz import load_npz
from ..pool import ARCHS
from ..workdir import Steps, WorkDir, digest
from . import captions as cap
from . import offtarget as off
from .offtarget import OFFTARGET_KINDS
from .sources import SIZE, Source, load_sources

MANIFEST = "minicomp.json"
WORK_DIR = ".build-work"
TEACHER_NAME = "varalign-minicomp-teacher"
LABEL_COLUMNS = ("label_caption_kind", "label_image_kind", "label_class", "label_source", "label_language")
CAPTION_KINDS = ("aligned", "wrong_class", "uninformative", "non_english")
IMAGE_KINDS = ("clean", "near_duplicate", "blank", "noise")
# v5's off-target but well-aligned kinds (label_image_kind; their captions are "aligned"): see offtarget.py
ALL_IMAGE_KINDS = (*IMAGE_KINDS, *OFFTARGET_KINDS)
# the v5 settings and their v4 values: `--preset v4` (or these values) rebuilds v4's pool byte for byte, and a
# v4 build's manifest (which has none of these keys) still matches
V4_VALUES = {"p_rendered_text": 0.0, "p_off_domain": 0.0, "p_low_info": 0.0, "teacher_web_mix": False,
             "target_other": False}
PRESETS = ("v4", "v5")


def teacher_config(arch: str) -> dict:
    """A small ViT CLIP on 32×32 images whose embeddings are as wide as DataComp's `arch` features."""
    return {
        "embed_dim": ARCHS[arch],
        "vision_cfg": {"image_size": SIZE, "layers": 3, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
    }


@dataclass
class BuildConfig:
    """Everything the pool depends on (the build is deterministic given these)."""

    size: int = 20_000
    seed: int = 0
    arch: str = "l14"
    shard_size: int = 5_000
    # caption kinds of images that show a class (clean or near-duplicate); the rest is "aligned"
    p_wrong_class: float = 0.15
    p_uninformative: float = 0.15
    p_non_english: float = 0.12
    # image kinds; the rest is "clean"
    p_near_duplicate: float = 0.08
    p_blank: float = 0.03
    p_noise: float = 0.04
    # the over-represented class of each source takes this share of its class draws
    overrep_share: float = 0.3
    # each visible attribute (size, brightness, texture: captions.ATTRIBUTES) of its image is named in an
    # aligned caption with this probability; wrong-class captions name random ones just as often
    p_attribute: float = 0.6
    # share of the pool per source (renormalised over the sources present)
    source_weights: dict = field(default_factory=lambda: {"digits": 0.3, "fashion_mnist": 0.6, "mnist": 0.1})
    p_small: float = 0.25  # min(width, height) < 200
    p_wide: float = 0.06  # aspect ratio > 3
    fashion_mnist_dir: str | None = None
    use_fashion: bool = True
    use_mnist: bool = True
    fashion_test_size: int = 1000
    teacher_samples: int = 40_000  # samples seen by the teacher
    teacher_batch: int = 128
    teacher_lr: float = 1e-3
    teacher_checkpoints: int = 1
    # v5: off-target but well-aligned samples, shares of the whole pool (docs/minicomp.md gives the sources)
    p_rendered_text: float = 0.20
    p_off_domain: float = 0.15
    p_low_info: float = 0.05
    p_class_word: float = 0.6  # rendered text: a downstream class name (else a web word)
    # the teacher also trains on the off-target kinds, in the pool's shares, with their (matching) captions
    teacher_web_mix: bool = True
    # also a VAS target from one source's training split only (the ImageNet stand-in: not every task's data)
    target_other: bool = True


def preset(name: str, **overrides) -> BuildConfig:
    """The BuildConfig of a pool version: `v5` (the defaults) or `v4` (no off-target kinds, teacher on clean
    pairs only: the pool of the committed v4 results), with `overrides`."""
    if name not in PRESETS:
        raise VaralignError(f"--preset must be one of {', '.join(PRESETS)}, got {name!r}")
    return BuildConfig(**{**(V4_VALUES if name == "v4" else {}), **overrides})


def identity(cfg: BuildConfig) -> dict:
    """The configuration a build is keyed by: asdict(cfg) without the v5 keys at their v4 values (so a v4
    build made before v5 existed is still recognised, and `--preset v4` gives the same work digest)."""
    out = asdict(cfg)
    for k, v in V4_VALUES.items():
        if out[k] == v:
            del out[k]
    if "p_rendered_text" not in out:  # no rendered text anywhere: the class-word share has no effect
        del out["p_class_word"]
    return out


def is_v5(cfg: BuildConfig) -> bool:
    return any(getattr(cfg, k) != v for k, v in V4_VALUES.items())


@dataclass
class BuildResult:
    build_dir: str
    metadata_dir: str
    shards_dir: str
    eval_dir: str
    target: str
    normsim_dir: str
    teacher_checkpoint: str
    counts: dict
    seconds: dict


# ----------------------------------------------------------------------------------------------- images

def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.repeat(arr[..., None], 3, axis=2)).save(buf, format="PNG")
    return buf.getvalue()


def _jitter(img: np.ndarray, rng: np.random.Generator, max_shift: int, noise: float) -> np.ndarray:
    """A small shift (edge-padded) plus Gaussian noise: a near-duplicate of `img`."""
    dx, dy = rng.integers(-max_shift, max_shift + 1, 2)
    out = np.roll(np.pad(img, max_shift, mode="edge"), (int(dy), int(dx)), axis=(0, 1))
    out = out[max_shift:-max_shift, max_shift:-max_shift].astype(np.float32)
    out += noise * rng.standard_normal(out.shape)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _blank(rng: np.random.Generator) -> np.ndarray:
    level = rng.integers(0, 256)
    grad = np.linspace(0, rng.uniform(-30, 30), SIZE)[None, :]
    return np.clip(level + grad + np.zeros((SIZE, SIZE)), 0, 255).astype(np.uint8)


def _noise(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.5:
        return rng.integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    coarse = rng.integers(0, 256, (SIZE // 4, SIZE // 4)).astype(np.uint8)  # blocky noise
    return np.kron(coarse, np.ones((4, 4), dtype=np.uint8))


def _size(rng: np.random.Generator, p_small: float, p_wide: float) -> tuple[int, int]:
    short = int(rng.integers(48, 200)) if rng.random() < p_small else int(rng.integers(200, 1200))
    aspect = rng.uniform(3.05, 6.0) if rng.random() < p_wide else float(np.exp(rng.uniform(-0.7, 0.7)))
    if aspect < 1:
        short, aspect = short, 1 / aspect
    long_side = int(round(short * aspect))
    return (long_side, short) if rng.random() < 0.6 else (short, long_side)


# ----------------------------------------------------------------------------------------------- pool

class _ClassCycler:
    """Draws images of a class from a split, without replacement until the class is used up."""

    def __init__(self, src: Source, split: str, rng: np.random.Generator) -> None:
        idx = src.splits[split]
        self.by_class = {c: rng.permutation(idx[src.labels[idx] == c]) for c in range(len(src.classes))}
        self.pos = dict.fromkeys(self.by_class, 0)

    def next(self, c: int) -> tuple[int, bool]:
        arr = self.by_class[c]
        i = self.pos[c]
        self.pos[c] += 1
        return int(arr[i % len(arr)]), i >= len(arr)


def generate_pool(sources: list[Source], cfg: BuildConfig, quiet: bool = True) -> list[dict]:
    """The pool's samples (image array, caption, labels, json metadata), deterministic given cfg.seed;
    a progress bar on stderr unless `quiet`."""
    rng = np.random.default_rng([cfg.seed, 1])
    weights = np.array([cfg.source_weights.get(s.name, 0.1) for s in sources], float)
    weights /= weights.sum()
    cyclers = [_ClassCycler(s, "pool", np.random.default_rng([cfg.seed, 2, k])) for k, s in enumerate(sources)]
    over = [int(np.random.default_rng([cfg.seed, 3, k]).integers(len(s.classes))) for k, s in enumerate(sources)]
    class_p = []
    for k, s in enumerate(sources):
        p = np.full(len(s.classes), (1 - cfg.overrep_share) / (len(s.classes) - 1))
        p[over[k]] = cfg.overrep_share
        class_p.append(p)
    p_img = np.array([1 - cfg.p_near_duplicate - cfg.p_blank - cfg.p_noise, cfg.p_near_duplicate,
                      cfg.p_blank, cfg.p_noise])
    p_cap = np.array([1 - cfg.p_wrong_class - cfg.p_uninformative - cfg.p_non_english, cfg.p_wrong_class,
                      cfg.p_uninformative, cfg.p_non_english])
    if (p_img < 0).any() or (p_cap < 0).any():
        raise VaralignError("noise proportions add up to more than 1")
    if not 0 <= cfg.p_attribute <= 1:
        raise VaralignError(f"--p_attribute must be between 0 and 1, got {cfg.p_attribute}")
    p_off = np.array([cfg.p_rendered_text, cfg.p_off_domain, cfg.p_low_info])
    if (p_off < 0).any() or p_off.sum() > 1:
        raise VaralignError("--p_rendered_text + --p_off_domain + --p_low_info must be between 0 and 1")
    cuts = [_cuts(s) for s in sources]
    samples: list[dict] = []
    clean_idx: list[int] = []
    # the off-target kinds draw from their own generators, so the in-domain samples are v4's when their
    # shares are 0 (and otherwise the same process on the remaining indices)
    off_rng = np.random.default_rng([cfg.seed, 20])
    off_cyclers = [_ClassCycler(s, "pool", np.random.default_rng([cfg.seed, 21, k])) for k, s in enumerate(sources)]
    class_words = sorted({c for s in sources for c in s.classes})
    for i in tqdm(range(cfg.size), desc="pool samples", unit="sample", disable=quiet, leave=False):
        if p_off.sum() > 0:
            u = off_rng.random()
            if u < p_off.sum():
                kind = OFFTARGET_KINDS[int(np.searchsorted(np.cumsum(p_off), u, side="right"))]
                samples.append(_offtarget_sample(kind, i, sources, weights, off_cyclers, class_words, cfg, off_rng))
                continue
        k = int(rng.choice(len(sources), p=weights))
        src = sources[k]
        image_kind = IMAGE_KINDS[int(rng.choice(4, p=p_img))]
        if image_kind == "near_duplicate" and not clean_idx:
            image_kind = "clean"
        meta: dict = {}
        if image_kind == "clean":
            c = int(rng.choice(len(src.classes), p=class_p[k]))
            j, reused = cyclers[k].next(c)
            img = src.images[j]
            if reused:  # more pool samples than images of this class: a fresh light augmentation
                img = _jitter(img, rng, 1, 4.0)
            meta["source_index"] = j
        elif image_kind == "near_duplicate":
            orig = samples[clean_idx[int(rng.integers(len(clean_idx)))]]
            k, src, c = orig["_k"], sources[orig["_k"]], orig["_class"]
            img = _jitter(orig["_img"], rng, 2, 8.0)
            meta["duplicate_of"] = orig["uid"]
        else:
            c = None
            img = _blank(rng) if image_kind == "blank" else _noise(rng)
        lang = "en"
        if c is None:
            caption_kind = "uninformative" if rng.random() < 0.6 else "wrong_class"
        else:
            caption_kind = CAPTION_KINDS[int(rng.choice(4, p=p_cap))]
        if caption_kind == "aligned":
            words = cap.attribute_words(src.kind, img, cuts[k])
            text = cap.aligned(src.kind, src.classes, c, rng, words, cfg.p_attribute)
        elif caption_kind == "wrong_class":
            text = cap.wrong_class(src.kind, src.classes, c, rng, cfg.p_attribute)
        elif caption_kind == "uninformative":
            text, lang = cap.uninformative(rng), "none"
        else:
            text, lang = cap.non_english(src.kind, c, rng)
        w, h = _size(rng, cfg.p_small, cfg.p_wide)
        uid = hashlib.md5(f"minicomp-{cfg.seed}-{i}".encode()).hexdigest()
        meta.update({"uid": uid, "url": f"https://cdn{i % 4}.example.com/{uid[:2]}/{uid[2:10]}.jpg",
                     "original_width": w, "original_height": h})
        sample = {"uid": uid, "text": text, "_img": img, "_k": k, "_class": c, "meta": meta,
                  "label_caption_kind": caption_kind, "label_image_kind": image_kind,
                  "label_class": "none" if c is None else f"{src.name}:{src.classes[c]}",
                  "label_source": src.name if c is not None or image_kind == "near_duplicate" else "synthetic",
                  "label_language": lang}
        if image_kind == "clean":
            clean_idx.append(i)
        samples.append(sample)
    return samples


def _offtarget_sample(kind: str, i: int, sources: list[Source], weights: np.ndarray, cyclers: list, class_words: list,
                      cfg: BuildConfig, rng: np.random.Generator, tag: str = "minicomp") -> dict:
    """Pool sample `i` of an off-target kind (offtarget.py), its caption aligned with what it shows."""
    src_name, cls = "synthetic", "none"
    if kind == "rendered_text":
        img, text, word = off.rendered_text(rng, class_words, cfg.p_class_word)
        drawn: dict = {"text": word}
    elif kind == "off_domain":
        img, text, drawn = off.off_domain(rng)
    else:
        k = int(rng.choice(len(sources), p=weights))
        c = int(rng.integers(len(sources[k].classes)))
        j, _ = cyclers[k].next(c)
        img, text = off.low_info(sources[k].images[j], sources[k].classes[c], rng)
        drawn = {"tiled": 4, "source_index": j}
        src_name, cls = sources[k].name, f"{sources[k].name}:{sources[k].classes[c]}"
    w, h = _size(rng, cfg.p_small, cfg.p_wide)
    uid = hashlib.md5(f"{tag}-{cfg.seed}-{i}".encode()).hexdigest()
    meta = {"uid": uid, "url": f"https://cdn{i % 4}.example.com/{uid[:2]}/{uid[2:10]}.jpg", "original_width": w,
            "original_height": h, "drawn": drawn}
    return {"uid": uid, "text": text, "_img": img, "_k": None, "_class": None, "meta": meta,
            "label_caption_kind": "aligned", "label_image_kind": kind, "label_class": cls,
            "label_source": src_name, "label_language": "en"}


def _teacher_offtarget(sources: list[Source], cfg: BuildConfig, n_clean: int) -> list[dict]:
    """The teacher's web-like share: off-target samples (from the teacher split for low_info) in the pool's
    shares relative to its clean pairs, with their matching captions."""
    p_off = np.array([cfg.p_rendered_text, cfg.p_off_domain, cfg.p_low_info])
    if not cfg.teacher_web_mix or p_off.sum() <= 0:
        return []
    rng = np.random.default_rng([cfg.seed, 22])
    weights = np.array([cfg.source_weights.get(s.name, 0.1) for s in sources], float)
    weights /= weights.sum()
    cyclers = [_ClassCycler(s, "teacher", np.random.default_rng([cfg.seed, 23, k])) for k, s in enumerate(sources)]
    class_words = sorted({c for s in sources for c in s.classes})
    n = int(round(n_clean * p_off.sum() / (1 - p_off.sum()))) if p_off.sum() < 1 else n_clean
    out = []
    for i in range(n):
        kind = OFFTARGET_KINDS[int(rng.choice(3, p=p_off / p_off.sum()))]
        s = _offtarget_sample(kind, i, sources, weights, cyclers, class_words, cfg, rng, tag="minicomp-teacher-web")
        out.append({"uid": s["uid"], "text": s["text"], "_img": s["_img"], "meta": {"uid": s["uid"]}})
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def write_shards(samples: list[dict], out: Path, shard_size: int, prefix: str = "", desc: str | None = None) -> int:
    """img2dataset-style `{:08d}.tar` (+ `_stats.json`) of png/txt/json samples; returns the shard count.
    Shards are written side by side in processes (PNG encoding and tarfile hold the GIL); the bytes do not
    depend on how many. With `desc`, a progress bar of the samples written on stderr."""
    from ..execute import ProcessExecutor

    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(samples) // shard_size)
    bar = tqdm(total=len(samples), desc=desc, unit="sample", disable=desc is None, leave=False)
    tasks = [(samples[s * shard_size:(s + 1) * shard_size], out, s, prefix) for s in range(n_shards)]
    ProcessExecutor().map(_write_shard, tasks, "shards", quiet=True,
                          on_result=lambda i, n: bar.update(n))
    bar.close()
    return n_shards


def _write_shard(part: list[dict], out: Path, s: int, prefix: str) -> int:
    with atomic_path(out / f"{s:08d}.tar", ".tar") as tmp, tarfile.open(tmp, "w") as tf:
        for j, smp in enumerate(part):
            key = f"{prefix}{s:04d}{j:05d}"
            meta = {"key": key, "caption": smp["text"], "width": SIZE, "height": SIZE, **smp["meta"]}
            _add(tf, f"{key}.png", _png(smp["_img"]))
            _add(tf, f"{key}.txt", smp["text"].encode())
            _add(tf, f"{key}.json", json.dumps(meta).encode())
    save_json(out / f"{s:08d}_stats.json", {"count": len(part), "successes": len(part)})
    return len(part)


_CUTS: dict[tuple[str, int], dict] = {}


def _cuts(src: Source) -> dict[str, np.ndarray]:
    """The source's attribute tertiles (captions.levels over all its images), computed once per source."""
    key = (src.name, id(src.images))
    if key not in _CUTS:
        _CUTS[key] = cap.levels(src.images)
    return _CUTS[key]


def _clean_samples(sources: list[Source], split: str, seed: int, tag: str, limit: int | None = None,
                   p_attribute: float = 0.0) -> list[dict]:
    """Aligned English captions for every image of `split` (teacher training, downstream-train embedding),
    naming each visible attribute with probability `p_attribute`."""
    rng = np.random.default_rng([seed, 5, sum(map(ord, tag))])
    out = []
    for src in sources:
        idx = src.splits[split][:limit]
        cuts = _cuts(src)
        for j in idx:
            c = int(src.labels[j])
            uid = hashlib.md5(f"minicomp-{tag}-{seed}-{src.name}-{j}".encode()).hexdigest()
            text = cap.aligned(src.kind, src.classes, c, rng, cap.attribute_words(src.kind, src.images[j], cuts),
                               p_attribute)
            out.append({"uid": uid, "text": text, "_img": src.images[j], "meta": {"uid": uid}})
    order = rng.permutation(len(out))
    return [out[i] for i in order]


# ----------------------------------------------------------------------------------------------- tasks

def write_classification_task(task_dir: Path, src: Source) -> int:
    (task_dir / "test").mkdir(parents=True, exist_ok=True)
    idx = src.splits["test"]
    with atomic_path(task_dir / "test" / "0.tar", ".tar") as tmp, tarfile.open(tmp, "w") as tf:
        for k, j in enumerate(idx):
            _add(tf, f"s{k:07d}.png", _png(src.images[j]))
            _add(tf, f"s{k:07d}.cls", str(int(src.labels[j])).encode())
    (task_dir / "test" / "nshards.txt").write_text("1\n")
    (task_dir / "classnames.txt").write_text("\n".join(src.classes) + "\n")
    (task_dir / "zeroshot_classification_templates.txt").write_text("\n".join(cap.ZEROSHOT_TEMPLATES[src.kind]) + "\n")
    return len(idx)


def write_retrieval_task(task_dir: Path, sources: list[Source], seed: int) -> int:
    """Held-out images with 2 captions each that name the class and every visible attribute of the image
    (captions.retrieval_captions), so that images of one class are not all described alike."""
    rng = np.random.default_rng([seed, 6])
    (task_dir / "test").mkdir(parents=True, exist_ok=True)
    k = 0
    with atomic_path(task_dir / "test" / "0.tar", ".tar") as tmp, tarfile.open(tmp, "w") as tf:
        for src in sources:
            cuts = _cuts(src)
            for j in src.splits["retrieval"]:
                c = int(src.labels[j])
                words = cap.attribute_words(src.kind, src.images[j], cuts)
                texts = cap.retrieval_captions(src.kind, src.classes, c, words, rng)
                _add(tf, f"s{k:07d}.png", _png(src.images[j]))
                _add(tf, f"s{k:07d}.txt", "\n".join(texts).encode())
                k += 1
    (task_dir / "test" / "nshards.txt").write_text("1\n")
    (task_dir / "dataset_type.txt").write_text("retrieval\n")
    return k


def task_dirs(eval_dir: Path, sources: list[Source]) -> dict[str, Path]:
    """{task name: folder}: `mnist` (digits; DataComp's key, so `varalign evaluate` reads it), one
    `minicomp_{source}` per other source, and `minicomp_retrieval`."""
    out = {}
    for src in sources:
        out["mnist" if src.name == "digits" else f"minicomp_{src.name}"] = eval_dir / (
            "mnist" if src.name == "digits" else f"minicomp_{src.name}")
    out["minicomp_retrieval"] = eval_dir / "minicomp_retrieval"
    return out


# ----------------------------------------------------------------------------------------------- teacher

def train_teacher(sources: list[Source], cfg: BuildConfig, root: Path, quiet: bool = True) -> Path:
    """Train the teacher CLIP on the sources' clean `teacher` splits with `experiment.train` (open_clip_train;
    the run in `root/run`, its output in `root/train.log`); returns its checkpoint. Unless `quiet`, progress
    bars on stderr (shards written; samples seen by the teacher, with an estimate)."""
    from ..experiment.train import train

    root.mkdir(parents=True, exist_ok=True)
    config_path = root / f"{TEACHER_NAME}.json"
    for p in (root / "run", root / "shards"):
        shutil.rmtree(p, ignore_errors=True)
    save_json(config_path, teacher_config(cfg.arch))
    samples = _clean_samples(sources, "teacher", cfg.seed, "teacher", p_attribute=cfg.p_attribute)
    web = _teacher_offtarget(sources, cfg, len(samples))
    if web:  # v5: a web-like mix (v4's teacher set is left exactly as it was otherwise)
        mixed = samples + web
        samples = [mixed[j] for j in np.random.default_rng([cfg.seed, 24]).permutation(len(mixed))]
    write_shards(samples, root / "shards", 2000, desc=None if quiet else "teacher shards")
    log_path = root / "train.log"  # open_clip_train's own log is run/out.log; this keeps stdout/stderr
    try:
        # the bar moves with open_clip_train's log lines (every 10 steps), which change nothing in the training
        result = train("tiny", root / "shards", root, "run", model=TEACHER_NAME, model_config=config_path,
                       batch_size=cfg.teacher_batch, learning_rate=cfg.teacher_lr,
                       train_num_samples=cfg.teacher_samples,
                       warmup=max(1, min(100, cfg.teacher_samples // cfg.teacher_batch // 10)),
                       num_checkpoints=cfg.teacher_checkpoints, workers=1, seed=cfg.seed, resume=None,
                       nproc_per_node=1, log_every_n_steps=10, quiet=quiet, progress=True,
                       progress_desc="teacher CLIP", log_path=log_path)
    except VaralignError as exc:
        raise VaralignError(f"teacher training failed: {exc}", log_path) from None
    ckpt = root / "run" / "checkpoints" / f"epoch_{cfg.teacher_checkpoints}.pt"
    if Path(result.checkpoint) != ckpt:
        raise VaralignError("teacher training finished without its last checkpoint", log_path)
    return ckpt


# ----------------------------------------------------------------------------------------------- labels

def add_labels(metadata_dir: Path, labels: dict[str, dict]) -> None:
    """Add the hidden `label_*` columns to every parquet of the embedded pool (joined on uid)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path in sorted(metadata_dir.glob("*.parquet")):
        table = pq.read_table(path)
        if "label_caption_kind" in table.column_names:
            continue
        uids = table.column("uid").to_pylist()
        for col in LABEL_COLUMNS:
            table = table.append_column(col, pa.array([labels[u][col] for u in uids], pa.string()))
        with atomic_path(path, ".parquet") as tmp:
            pq.write_table(table, tmp)


# ----------------------------------------------------------------------------------------------- build

def finished(build_dir: str | os.PathLike) -> dict | None:
    """The manifest of the finished build in `build_dir`, or None (none there, unreadable, or unfinished)."""
    try:
        manifest = json.loads((Path(build_dir) / MANIFEST).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("complete") else None


def build(build_dir: str | os.PathLike, config: BuildConfig | None = None, *, overwrite: bool = False,
          quiet: bool = False) -> BuildResult:
    """Build the mini pool in `build_dir` (see the module docstring); stages already done are reused."""
    from ..experiment.embed import embed
    from ..target import build_target

    cfg = config or BuildConfig()
    if cfg.arch not in ARCHS:
        raise VaralignError(f"--arch must be one of {', '.join(ARCHS)}, got {cfg.arch!r}")
    if cfg.size < 1:
        raise VaralignError("--size must be >= 1")
    root = Path(build_dir)
    manifest_path = root / MANIFEST
    ident = identity(cfg)
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("config") != ident:
            if not overwrite:
                raise VaralignError("build directory holds a pool built with another configuration "
                                    "(pass --overwrite to rebuild)", manifest_path)
            for sub in ("shards", "metadata", "eval", "files", "teacher"):
                shutil.rmtree(root / sub, ignore_errors=True)
            manifest_path.unlink()
        elif old.get("complete"):
            return BuildResult(**old["result"])
    elif root.is_dir() and any(root.iterdir()) and not (root / WORK_DIR).is_dir():
        raise VaralignError("build directory is not empty and holds no minicomp build: not touched; give an empty "
                            "or new folder", root)
    root.mkdir(parents=True, exist_ok=True)
    work = WorkDir(root / WORK_DIR, digest("minicomp build", ident))
    steps = Steps(work)
    times: dict[str, float] = {}

    def log(msg: str) -> None:
        if not quiet:
            print(f"minicomp: {msg}", file=sys.stderr)

    t = time.time()
    sources = load_sources(cfg.seed, cfg.fashion_mnist_dir, cfg.use_fashion, cfg.use_mnist, cfg.fashion_test_size,
                           quiet=quiet)
    log(f"sources: {', '.join(f'{s.name} ({len(s.images):,} images)' for s in sources)}")
    samples = generate_pool(sources, cfg, quiet=quiet)
    shards_dir = root / "shards"

    def pool_shards() -> list[Path]:
        if shards_dir.exists():
            shutil.rmtree(shards_dir)
        write_shards(samples, shards_dir, cfg.shard_size, desc=None if quiet else "pool shards")
        return sorted(shards_dir.iterdir())

    _step(steps, "pool_shards", times, pool_shards, t)
    log(f"wrote {len(samples):,} pool samples in {times['pool_shards']} s")

    eval_dir = root / "eval"
    dirs = task_dirs(eval_dir, sources)
    task_sizes: dict[str, int] = {}

    def eval_tasks() -> list[Path]:
        for src in sources:
            name = "mnist" if src.name == "digits" else f"minicomp_{src.name}"
            task_sizes[name] = write_classification_task(dirs[name], src)
        task_sizes["minicomp_retrieval"] = write_retrieval_task(dirs["minicomp_retrieval"], sources, cfg.seed)
        return [d / "test" / "0.tar" for d in dirs.values()]

    task_sizes.update(_step(steps, "eval_tasks", times, eval_tasks, info=lambda: task_sizes))

    log(f"training the teacher CLIP ({cfg.teacher_samples:,} samples seen; most of the build)")
    teacher_cfg = root / "teacher" / f"{TEACHER_NAME}.json"
    ckpt = root / "teacher" / "run" / "checkpoints" / f"epoch_{cfg.teacher_checkpoints}.pt"
    _step(steps, "teacher", times, lambda: [train_teacher(sources, cfg, root / "teacher", quiet=quiet), teacher_cfg])
    log(f"teacher trained in {times['teacher']} s")

    metadata = root / "metadata"

    def pool_metadata() -> list[Path]:
        log("embedding the pool with the teacher")
        embed([shards_dir], metadata, model_config=teacher_cfg, pretrained=str(ckpt), arch=cfg.arch,
              batch_size=512, num_workers=2, overwrite=True, quiet=quiet)
        add_labels(metadata, {s["uid"]: {c: s[c] for c in LABEL_COLUMNS} for s in samples})
        return sorted(metadata.iterdir())

    _step(steps, "embed_pool", times, pool_metadata)
    log(f"pool embedded in {times['embed_pool']} s")

    files = root / "files"
    target = files / "variance" / "variance_downstream.npy"
    normsim_dir = files / "normsim_downstream"

    def targets() -> list[Path]:
        ds_shards = root / "teacher" / "downstream_train_shards"
        shutil.rmtree(ds_shards, ignore_errors=True)
        log("the VAS and NormSim targets: embedding the downstream training split")
        write_shards(_clean_samples(sources, "downstream_train", cfg.seed, "downstream",
                                    p_attribute=cfg.p_attribute),
                     ds_shards, 5000, desc=None if quiet else "downstream shards")
        ds_meta = files / "downstream_train_metadata"
        embed([ds_shards], ds_meta, model_config=teacher_cfg, pretrained=str(ckpt), arch=cfg.arch, batch_size=512,
              num_workers=2, overwrite=True, quiet=quiet)
        build_target([ds_meta], target, arch=cfg.arch, quiet=quiet)
        normsim_dir.mkdir(parents=True, exist_ok=True)
        feats = [load_npz(p, [f"{cfg.arch}_img"])[f"{cfg.arch}_img"].astype(np.float32) for p in sorted(ds_meta.glob("*.npz"))]
        np.save(normsim_dir / "train_features.npy", np.concatenate(feats))
        out = [target, normsim_dir / "train_features.npy"]
        if cfg.target_other:
            out.append(_other_target(sources, ds_meta, files, cfg))
        return out

    _step(steps, "targets", times, targets)

    counts = {col: _count(samples, col) for col in LABEL_COLUMNS}
    counts["teacher_scores"] = kind_scores(metadata)
    counts["pool"] = len(samples)
    counts["tasks"] = task_sizes
    counts["teacher_images"] = sum(len(s.splits["teacher"]) for s in sources)
    counts["downstream_train_images"] = sum(len(s.splits["downstream_train"]) for s in sources)
    times["total"] = round(sum(times.values()), 1)
    result = BuildResult(str(root), str(metadata), str(shards_dir), str(eval_dir), str(target), str(normsim_dir),
                         str(ckpt), counts, times)
    save_json(manifest_path, {"tool": "varalign minicomp build", "config": ident, "complete": True,
                              "sources": [s.name for s in sources], "result": asdict(result)})
    work.remove()  # the manifest now says the build is complete
    log(f"done in {times['total']} s: metadata {metadata}, eval tasks {eval_dir}, VAS target {target}")
    return result


def other_source(sources: list[Source]) -> Source:
    """The source whose training split alone makes the `other` VAS target: Fashion-MNIST when present (the
    largest, object photos: the ImageNet stand-in), else the one with the most downstream-train images."""
    by_name = {s.name: s for s in sources}
    return by_name.get("fashion_mnist") or max(sources, key=lambda s: len(s.splits["downstream_train"]))


def _other_target(sources: list[Source], ds_meta: Path, files: Path, cfg: BuildConfig) -> Path:
    """VAS target `other` (files/variance/variance_other.npy): the second moment of the teacher's image
    features of ONE source's downstream-train split, so it covers one task and not the others (as the
    paper's ImageNet-1k target is not its 38 test tasks)."""
    import pyarrow.parquet as pq

    src = other_source(sources)
    want = {hashlib.md5(f"minicomp-downstream-{cfg.seed}-{src.name}-{j}".encode()).hexdigest()
            for j in src.splits["downstream_train"]}
    feats = []
    for p in sorted(ds_meta.glob("*.parquet")):
        uids = pq.read_table(p, columns=["uid"]).column("uid").to_pylist()
        rows = np.array([u in want for u in uids])
        feats.append(load_npz(p.with_suffix(".npz"), [f"{cfg.arch}_img"])[f"{cfg.arch}_img"].astype(np.float64)[rows])
    from ..target import build_target

    feat_dir = files / "other_source"
    feat_dir.mkdir(parents=True, exist_ok=True)
    np.save(feat_dir / "train_features.npy", np.concatenate(feats).astype(np.float32))
    save_json(feat_dir / "source.json", {"source": src.name, "split": "downstream_train",
                                         "rows": int(sum(len(f) for f in feats))})
    out = files / "variance" / "variance_other.npy"
    build_target([feat_dir / "train_features.npy"], out, arch=cfg.arch, quiet=True, overwrite=True)
    return out


def kind_scores(metadata_dir: Path, fraction: float = 0.3) -> dict[str, dict[str, dict[str, float]]]:
    """The teacher's CLIP score per hidden kind: {label column: {kind: {"mean", "n", "kept_top"}}} for the
    image and caption kinds, `kept_top` the share of that kind CLIP score's top `fraction` keeps (threshold at
    the score of rank ⌊N·fraction⌋, keep >=, as `clip_score`)."""
    import pyarrow.parquet as pq

    cols = ["clip_l14_similarity_score", "clip_b32_similarity_score"]
    score, kinds = [], {"label_image_kind": [], "label_caption_kind": []}
    for p in sorted(Path(metadata_dir).glob("*.parquet")):
        names = pq.read_schema(p).names
        col = next(c for c in cols if c in names)
        t = pq.read_table(p, columns=[col, *kinds])
        score.append(t.column(col).to_numpy())
        for c in kinds:
            kinds[c] += t.column(c).to_pylist()
    x = np.concatenate(score)
    cut = np.sort(x)[::-1][max(0, int(len(x) * fraction) - 1)]
    keep = x >= cut
    out: dict = {}
    for c, vals in kinds.items():
        v = np.array(vals)
        out[c] = {k: {"n": int((v == k).sum()), "mean": round(float(x[v == k].mean()), 4),
                      "kept_top": round(float(keep[v == k].mean()), 4)} for k in sorted(set(vals))}
    return out


def _step(steps: Steps, name: str, times: dict[str, float], run, start: float | None = None,
          info=None) -> dict:
    """Stage `name` of the build: `run()` (returning its output files) unless a killed build finished it;
    its time in `times[name]` (from `start`, default now; a reused stage keeps the time it took). Returns the
    stage's `info()` (recorded with it), or the recorded one when reused."""
    t = time.time() if start is None else start
    done = steps.done(name)
    if done is not None:
        times[name] = done["seconds"]
        return done.get("info", {})
    files = run()
    times[name] = round(time.time() - t, 1)
    extra = info() if info is not None else {}
    steps.finish(name, files, {"seconds": times[name], "info": extra})
    return extra


def _count(samples: list[dict], col: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        out[s[col]] = out.get(s[col], 0) + 1
    return dict(sorted(out.items()))
