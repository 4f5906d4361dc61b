"""Compute CLIP metadata for a user's data in DataComp's pool format.

For every input shard (a webdataset `.tar`, or a chunk of a folder of image/caption pairs) writes
`{name}.npz` (`{arch}_img`, `{arch}_txt`: L2-normalised float16, rows aligned) and `{name}.parquet`
(`uid`, `key`, `text`, `url`, `original_width`, `original_height`, `sha256`,
`clip_{arch}_similarity_score` = float16-rounded dot product of the stored embeddings), so any
`varalign filter` method can select from it.

Resume: each shard is a step of the work directory `{output_dir}/.embed-work` (a record naming the
shard's two files and their sizes; see `workdir.Steps`): a killed run resumes from the shards it
finished, a shard whose files went missing or changed is redone. A finished run removes the work
directory; `embed.json` (written last) then names every finished shard, so a re-run reuses them.
Shards are mapped through the executor (`--executor ray` embeds them on a Ray cluster; locally they
run one after another, each on every core).

Input shards (a `.tar` URL, or a folder URL of them) are streamed from object storage; an output folder
URL gets each shard's two files as objects, each written locally and uploaded in one put as the shard
finishes (`embed.json` first and last, as locally); the work directory is then on this machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .. import storage
from ..atomic import atomic_path, save_json
from ..errors import VaralignError
from ..execute import LocalExecutor, make_executor
from ..guard import check_paths, lock, lock_file_for
from ..npz import write_npz
from ..pool import ARCHS, SCORE_COLUMN, image_key, text_key
from ..ptfile import checkpoint_problem
from ..uids import hex_to_uids
from ..workdir import Steps, WorkDir, digest, is_ours
from .wds import IMAGE_EXTS, ends_whole, iter_samples, list_tars, open_tar, read_json, read_member, sample_uid

MANIFEST = "embed.json"
WORK_DIR = ".embed-work"


@dataclass
class EmbedResult:
    """What was written: shard names, rows, skipped samples, embedding dim."""

    output_dir: str
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    skipped: int = 0
    reused: int = 0
    dim: int = 0
    seconds: float = 0.0


@dataclass
class _Unit:
    name: str
    tar: Path | str | None = None  # a local path or a URL
    files: list[tuple[str, Path, Path]] | None = None  # (key, image, caption) for a folder chunk
    folder: str = ""


def embed(inputs: list[str | os.PathLike], output_dir: str | os.PathLike, *, model: str | None = None,
          pretrained: str | None = None, model_config: str | os.PathLike | None = None, arch: str = "l14",
          batch_size: int = 256, device: str | None = None, num_workers: int = 2, shard_size: int = 10_000,
          random_init: bool = False, seed: int = 0, overwrite: bool = False, quiet: bool = False,
          executor: str = "local", ray_address: str | None = None) -> EmbedResult:
    """Embed images and captions of `inputs` with an open_clip model into a DataComp-format pool.

    `model` + `pretrained` (a tag such as `datacomp_xl_s13b_b90k`, or a checkpoint path); or a local
    `model_config` JSON (+ `pretrained` checkpoint). `random_init` allows no weights (tests only).
    `executor`: `local` (one shard after another, the model on every core) or `ray` (shards as Ray
    tasks, each worker loading the model once; every node must see the inputs at the same paths).
    """
    start = time.time()
    if arch not in ARCHS:
        raise VaralignError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if model is None and model_config is None:
        raise VaralignError("give --model (an open_clip name) or --model_config (a model JSON)")
    if pretrained is None and not random_init:
        raise VaralignError("give --pretrained (tag or checkpoint); --random_init embeds with untrained weights")
    units = _units(inputs, shard_size)
    out = storage.as_path(output_dir)
    check_paths({"an input": [str(i) for i in inputs]}, {}, work_dir=out, dir_label="output directory")
    for i in inputs:
        if storage.is_url(i) or storage.is_url(out):
            if str(i).rstrip("/") == str(out):
                raise VaralignError("the output directory is an input: refused", out)
        elif Path(i).is_dir() and Path(i).resolve() == out.resolve():
            raise VaralignError("the output directory is an input: refused", out)
    if not storage.is_url(out):
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    with lock(lock_file_for(out if storage.is_url(out) else out.absolute()), f"the output directory {out}"):
        try:
            return _embed(units, out, model=model, pretrained=pretrained, model_config=model_config, arch=arch,
                          batch_size=batch_size, device=device, num_workers=num_workers, random_init=random_init,
                          seed=seed, overwrite=overwrite, quiet=quiet, start=start, executor=executor,
                          ray_address=ray_address)
        finally:
            _MODELS.clear()  # loaded once per call, as before (a Ray worker keeps its own)


def _embed(units: list[_Unit], out: Path | str, *, model: str | None, pretrained: str | None,
           model_config: str | os.PathLike | None, arch: str, batch_size: int, device: str | None, num_workers: int,
           random_init: bool, seed: int, overwrite: bool, quiet: bool, start: float, executor: str,
           ray_address: str | None) -> EmbedResult:
    remote = storage.is_url(out)
    non_empty = bool(storage.check_folder(out)) if remote else out.is_dir() and any(out.iterdir())
    if non_empty and _read_manifest(out) is None:
        raise VaralignError("output directory is not empty and holds no varalign embed output "
                            f"({MANIFEST}): not touched; give an empty or new folder", out)
    if not remote:
        out.mkdir(parents=True, exist_ok=True)
    config = {"model": model, "pretrained": pretrained, "model_config": str(model_config) if model_config else None,
              "arch": arch, "random_init": random_init, "seed": seed}
    spec = (model, pretrained, str(model_config) if model_config else None, random_init, seed, device)
    if executor == "local":  # a model that cannot load (a wrong --pretrained) fails before the folder is marked
        _MODELS[spec] = _load(*spec)
    _check_manifest(out, config, overwrite)
    result = EmbedResult(str(out))
    old = _read_manifest(out) or {}
    manifest: dict = {"config": config, "shards": {},
                      "planned": sorted(set(old.get("planned", [])) | {u.name for u in units})}
    # written before the first shard: the folder is varalign's from now on, and the shards it will hold
    # are named, so --overwrite later removes exactly those (a killed run's included)
    save_json(storage.join(out, MANIFEST), {**old, **{k: v for k, v in manifest.items() if k != "shards"},
                                            "shards": old.get("shards", {})})
    work = WorkDir(_work_root(out), digest("embed", config))
    steps = Steps(work, "shards")
    todo = []
    for u in units:
        info = steps.done(u.name)
        if info is not None and remote and not _shard_there(out, u.name, info.get("objects")):  # removed or changed
            steps.drop(u.name)
            info = None
        if info is not None:
            info = {k: v for k, v in info.items() if k != "objects"}
        info = info or _finished_before(out, old, u.name)
        if info is None:
            todo.append(u)
        else:  # a killed run's shard joins the manifest too; the result counts the whole pool
            manifest["shards"][u.name] = info
            result.rows += int(info.get("rows", 0))
            result.skipped += int(info.get("skipped", 0))
    result.reused = len(units) - len(todo)

    def commit(i: int, res: tuple) -> None:  # in this process, as each shard finishes
        unit = todo[i]
        arrays, table, skipped = res
        files = [storage.join(out, f"{unit.name}{suffix}") for suffix in (".npz", ".parquet")]
        with atomic_path(files[0], ".npz") as tmp:  # a URL: a local temp uploaded in one put
            write_npz(tmp, arrays)
        with atomic_path(files[1], ".parquet") as tmp:
            pq.write_table(table, tmp)
        rows, dim = table.num_rows, arrays[image_key(arch)].shape[1]
        result.rows += rows
        result.skipped += skipped
        result.dim = dim
        manifest["shards"][unit.name] = {"rows": rows, "skipped": skipped}
        # the step's files are checked on resume by size; objects (put whole) by `_shard_there`, against the
        # size and ETag each had when it was put
        objects = {f: _identity(f) for f in files} if remote else None
        steps.finish(unit.name, [] if remote else files, {**manifest["shards"][unit.name], "objects": objects})
        # embed.json says how far the run is (readers refuse the folder until `shards` names every planned one);
        # `shards` itself changes only at the end: a resumed run trusts this run's shards by its work directory
        save_json(storage.join(out, MANIFEST), {**old, **{k: v for k, v in manifest.items() if k != "shards"},
                                                "shards": old.get("shards", {}), "progress": sorted(manifest["shards"])})

    if todo:
        # locally one shard after another, each with the process's torch threads; on Ray one task per shard
        runner = LocalExecutor(1, limit_kernels=False) if executor == "local" else make_executor(executor, None,
                                                                                               ray_address)
        runner.map(_embed_task, [(u, spec, arch, batch_size, num_workers, quiet) for u in todo], "embed",
                   quiet=quiet or len(todo) == 1, on_result=commit)
        if result.dim != ARCHS[arch] and not quiet:
            print(f"note: embeddings are {result.dim}-d; DataComp's {arch} features are {ARCHS[arch]}-d, so VAS "
                  f"targets built from other {arch} data will not match", file=sys.stderr)
    result.shards = [u.name for u in units]
    result.seconds = round(time.time() - start, 2)
    old = _read_manifest(out) or {}
    manifest["shards"] = {**old.get("shards", {}), **manifest["shards"]}
    # the pool is now the finished shards: a plan an earlier run left unfinished (and this one did not take up)
    # no longer makes readers refuse it; its names are kept so that --overwrite still removes their files
    for name in set(manifest["planned"]) - set(manifest["shards"]):  # finished by a killed run of this config
        info = steps.done(name)
        if info is not None and (not remote or _shard_there(out, name, info.get("objects"))):
            manifest["shards"][name] = {k: v for k, v in info.items() if k != "objects"}
    manifest["abandoned"] = sorted((set(manifest["planned"]) | set(old.get("abandoned", []))) - set(manifest["shards"]))
    manifest["planned"] = sorted(manifest["shards"])
    save_json(storage.join(out, MANIFEST), manifest)
    work.remove()  # the manifest now names every finished shard
    return result


def _work_root(out: Path | str) -> Path:
    """The work directory: inside a local output folder; for an output URL, on this machine."""
    if not storage.is_url(out):
        return Path(out) / WORK_DIR
    from ..engine.job import default_work_dir  # noqa: PLC0415

    return default_work_dir(storage.join(out, WORK_DIR))


def _identity(path: str) -> dict:
    meta = storage.info(path)
    return {k: meta.get(k) for k in ("size", "etag", "versionid")}


def _shard_there(out: Path | str, name: str, objects: dict | None = None) -> bool:
    """Both files of a shard are there (and, given what `_identity` recorded when they were put, unchanged)."""
    for suffix in (".parquet", ".npz"):
        f = storage.join(out, f"{name}{suffix}")
        if not storage.isfile(f):
            return False
        if objects and f in objects and _identity(f) != objects[f]:
            return False
    return True


def _finished_before(out: Path | str, old: dict, name: str) -> dict | None:
    """A shard of the finished run that wrote `old` (the manifest, same config): its record, if its files are there."""
    info = (old.get("shards") or {}).get(name)
    if isinstance(info, dict) and _shard_there(out, name):
        return info
    return None


def _remote_tars(url: str) -> list[str]:
    """A `.tar` URL itself, or the `.tar` objects directly under a folder URL (sorted)."""
    if url.endswith(".tar") and storage.isfile(url):
        return [url]
    if not storage.isdir(url):
        raise VaralignError("input not found", url)
    tars = [storage.join(url, n) for n in sorted(storage.listdir(url)) if n.endswith(".tar") and not n.startswith(".")]
    if not tars:
        raise VaralignError("no .tar shards under this URL (a folder of image + .txt pairs must be local)", url)
    return tars


def _units(inputs: list[str | os.PathLike], shard_size: int) -> list[_Unit]:
    units: list[_Unit] = []
    for item in inputs:
        if storage.is_url(item):
            units += [_Unit(storage.basename(t)[: -len(".tar")], tar=t) for t in _remote_tars(str(item).rstrip("/"))]
            continue
        p = Path(item)
        if not p.exists():
            raise VaralignError("input not found", p)
        tars = list_tars(p)
        if tars:
            units += [_Unit(t.name[: -len(".tar")], tar=t) for t in tars]
            continue
        pairs = _folder_pairs(p)
        if not pairs:
            raise VaralignError("no .tar shards and no image + .txt caption pairs", p)
        for i in range(0, len(pairs), shard_size):
            units.append(_Unit(f"{p.name}-{i // shard_size:05d}", files=pairs[i:i + shard_size], folder=p.name))
    names = [u.name for u in units]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise VaralignError(f"two inputs give the same shard name {dup!r} (outputs would collide)")
    return units


def _folder_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    pairs = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower().lstrip(".") in IMAGE_EXTS and path.with_suffix(".txt").exists():
            key = str(path.relative_to(root).with_suffix(""))
            pairs.append((key, path, path.with_suffix(".txt")))
    return pairs


def _read_manifest(out: Path | str) -> dict | None:
    import json

    path = storage.join(out, MANIFEST)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError:
        raise VaralignError("unreadable embed manifest (delete it or pass --overwrite)", path) from None


def _check_manifest(out: Path | str, config: dict, overwrite: bool) -> None:
    old = _read_manifest(out)
    if old is not None and old.get("config") != config:
        # a run that wrote no shard (its model failed to load, or it was stopped first) is simply replaced
        names = set(old.get("shards") or {}) | set(old.get("planned") or []) | set(old.get("abandoned") or [])
        started = any(storage.exists(storage.join(out, f"{Path(str(n)).name}{suffix}"))
                      for n in names for suffix in (".parquet", ".npz"))
        if not overwrite and started:
            raise VaralignError("output was embedded with another model/config (pass --overwrite to redo it)",
                                storage.join(out, MANIFEST))
        for name in names:  # only embed's own shards
            for suffix in (".parquet", ".npz"):
                p = storage.join(out, f"{Path(str(name)).name}{suffix}")
                if storage.is_url(p):
                    storage.remove(p)
                elif os.path.isfile(p):
                    os.unlink(p)
        if is_ours(_work_root(out)):  # its records are of the shards just removed
            WorkDir(_work_root(out), "").remove()
        if storage.is_url(out):
            storage.remove(storage.join(out, MANIFEST))
        else:
            (out / MANIFEST).unlink()


def _load(model: str | None, pretrained: str | None, model_config: str | os.PathLike | None, random_init: bool,
          seed: int, device: str | None):
    import open_clip
    import torch

    from .train import CUSTOM_MODELS

    if model_config is not None:
        cfg = Path(model_config)
        if not cfg.is_file():
            raise VaralignError("model config not found", cfg)
        try:
            json.loads(cfg.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise VaralignError(f"model config is not JSON ({exc})", cfg) from None
        open_clip.add_model_config(cfg)
        model = model or cfg.stem
    assert model is not None
    if model in CUSTOM_MODELS and model not in open_clip.list_models():
        import tempfile

        with tempfile.TemporaryDirectory(prefix="varalign-model-") as d:  # read at once, then removed
            (Path(d) / f"{model}.json").write_text(json.dumps(CUSTOM_MODELS[model]))
            open_clip.add_model_config(Path(d) / f"{model}.json")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the failure is reported
            net, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=None if random_init else pretrained, device=dev)
    except (RuntimeError, ValueError, OSError, KeyError, AttributeError, TypeError, EOFError,
            pickle.UnpicklingError) as exc:  # a checkpoint that is not one: a .npy, a refused pickle, a truncated file
        raise VaralignError(f"cannot load open_clip model {model!r} / {pretrained!r} "
                            f"({checkpoint_problem(exc, pretrained)})") from None
    net.eval()
    return net, preprocess, open_clip.get_tokenizer(model), dev


_MODELS: dict[tuple, tuple] = {}  # spec -> (net, preprocess, tokenizer, device): loaded once per process


def _embed_task(unit: _Unit, spec: tuple, arch: str, batch_size: int, num_workers: int,
                quiet: bool) -> tuple[dict, pa.Table, int]:
    """One shard: its arrays, its parquet table and the samples skipped (written by the caller)."""
    if spec not in _MODELS:
        _MODELS.clear()
        _MODELS[spec] = _load(*spec)
    net, preprocess, tokenizer, dev = _MODELS[spec]
    return _embed_unit(unit, net, preprocess, tokenizer, dev, arch, batch_size, num_workers, quiet)


def _iter_unit(unit: _Unit) -> Iterator[tuple[str, str, bytes | None, str | None, dict]]:
    """(key, uid, image bytes, caption, json meta) per sample."""
    if unit.tar is not None:
        with open_tar(unit.tar) as tf:
            for s in iter_samples(tf):
                meta = read_json(read_member(tf, s.members["json"])) if "json" in s.members else {}
                ext = s.image_ext()
                img = read_member(tf, s.members[ext]) if ext else None
                txt = read_member(tf, s.members["txt"]).decode("utf-8", "replace") if "txt" in s.members else None
                yield s.key, sample_uid(s.key, storage.basename(unit.tar), meta), img, txt, meta
            if not ends_whole(tf):
                raise VaralignError("truncated tar: no end-of-archive blocks after its last member", unit.tar)
    else:
        for key, img_path, txt_path in unit.files or []:
            yield (key, hashlib.md5(f"{unit.folder}/{key}".encode()).hexdigest(), img_path.read_bytes(),
                   txt_path.read_text(errors="replace").strip(), {})


def _decode(item: tuple, preprocess) -> tuple | None:
    from PIL import Image

    key, uid, img, txt, meta = item
    if img is None or txt is None:
        return None
    try:
        with Image.open(io.BytesIO(img)) as im:
            size = im.size
            tensor = preprocess(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return (key, uid, txt, meta, size, hashlib.sha256(img).hexdigest(), tensor)


def _embed_unit(unit: _Unit, net, preprocess, tokenizer, device: str, arch: str,
                batch_size: int, num_workers: int, quiet: bool) -> tuple[dict, pa.Table, int]:
    import torch

    rows: dict[str, list] = {k: [] for k in ("uid", "key", "text", "url", "original_width", "original_height",
                                            "sha256")}
    img_chunks, txt_chunks = [], []
    skipped = 0
    source = unit.tar or unit.name
    bar = tqdm(desc=f"embed {unit.name}", unit="sample", disable=quiet, leave=False)
    decoder = LocalExecutor(max(1, num_workers), limit_kernels=False)  # image decoding threads
    items = _iter_unit(unit)
    while True:
        batch = [x for _, x in zip(range(batch_size), items, strict=False)]
        if not batch:
            break
        decoded = [d for d in decoder.map(_decode, [(it, preprocess) for it in batch], "decode", quiet=True)
                   if d is not None]
        skipped += len(batch) - len(decoded)
        bar.update(len(batch))
        if not decoded:
            continue
        with torch.no_grad():
            images = torch.stack([d[6] for d in decoded]).to(device)
            texts = tokenizer([d[2] for d in decoded]).to(device)
            fi = torch.nn.functional.normalize(net.encode_image(images).float(), dim=-1)
            ft = torch.nn.functional.normalize(net.encode_text(texts).float(), dim=-1)
        img_chunks.append(fi.cpu().numpy().astype(np.float16))
        txt_chunks.append(ft.cpu().numpy().astype(np.float16))
        for key, uid, txt, meta, size, sha, _ in decoded:
            rows["uid"].append(uid)
            rows["key"].append(key)
            rows["text"].append(txt)
            rows["url"].append(meta.get("url") if isinstance(meta.get("url"), str) else None)
            w, h = meta.get("original_width"), meta.get("original_height")
            rows["original_width"].append(int(w) if isinstance(w, int) else size[0])
            rows["original_height"].append(int(h) if isinstance(h, int) else size[1])
            rows["sha256"].append(sha)
    bar.close()
    hex_to_uids(rows["uid"], source=source)  # malformed json uids fail here, naming the shard
    dim = int(net.visual.output_dim if hasattr(net.visual, "output_dim") else img_chunks[0].shape[1]) \
        if img_chunks else 0
    img = np.concatenate(img_chunks) if img_chunks else np.zeros((0, dim), np.float16)
    txt = np.concatenate(txt_chunks) if txt_chunks else np.zeros((0, dim), np.float16)
    score = (img.astype(np.float32) * txt.astype(np.float32)).sum(axis=1).astype(np.float16).astype(np.float32)
    table = pa.table({**{k: rows[k] for k in ("uid", "key", "text", "url")},
                      "original_width": pa.array(rows["original_width"], pa.int64()),
                      "original_height": pa.array(rows["original_height"], pa.int64()),
                      SCORE_COLUMN[arch]: pa.array(score, pa.float32()),
                      "sha256": pa.array(rows["sha256"], pa.string())})
    return {image_key(arch): img, text_key(arch): txt}, table, skipped
