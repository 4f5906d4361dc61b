"""`filter_pool`: score a DataComp pool shard by shard and write the selected subset."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .atomic import atomic_path, check_output_path, save_json
from .errors import VaralignError
from .execute import default_workers, run_tasks
from .pool import ARCHS, SCORE_COLUMN, Shard, discover_shards, embedding_member, image_key
from .scores.scan import scan_shard
from .scores.vas import vas_shard
from .scores.vas_d import CandidateStore, collect_shard, vas_d_iterate
from .select import at_least, count_for_fraction, datacomp_threshold, top_k_mask
from .target import load_target, target_path_for
from .uids import first_duplicate, save_subset, sort_uids, uids_to_hex

METHODS = {
    "no_filter": "every uid of the pool",
    "clip_score": "DataComp CLIP-score filter: keep score >= threshold (or the score at rank ⌊N·f⌋)",
    "vas": "VAS ∩ CLIP score: top ⌊N·f⌋ by CLIP score, then top ⌊N·f_vas⌋ by VAS against a target",
    "vas_d": "VAS-D ∩ CLIP score: CLIP stage, then greedy VAS against the selection itself",
}


@dataclass
class FilterSpec:
    """Every option of `varalign filter`; names follow DataComp's and the VAS reference's flags."""

    name: str
    arch: str | None = None
    fraction: float | None = None
    threshold: float | None = None
    fraction_vas: float | None = None
    threshold_vas: float | None = None
    target: str | None = None
    target_variance_name: str | None = None
    files_path: str | None = None
    num_iters: int | None = None
    given_uids_path: str | None = None
    num_workers: int | None = None
    batch_size: int | None = None
    batch_size_vass: int | None = None
    save_scores: str | None = None
    quiet: bool = False

    def validate(self) -> None:
        if self.name not in METHODS:
            raise VaralignError(f"--name must be one of {', '.join(METHODS)}, got {self.name!r}")
        if self.name == "no_filter":
            return
        if self.arch not in ARCHS:
            raise VaralignError(f"--arch must be one of {', '.join(ARCHS)} for {self.name}")
        _one_of(self.fraction, self.threshold, "--fraction", "--threshold", self.name)
        _check_fraction(self.fraction, "--fraction")
        if self.name == "clip_score":
            return
        if self.name == "vas_d":
            if self.fraction_vas is None or self.threshold_vas is not None:
                raise VaralignError("vas_d needs --fraction_vas (not --threshold_vas)")
            if self.num_iters is None or self.num_iters < 1:
                raise VaralignError("vas_d needs --num_iters >= 1")
        _one_of(self.fraction_vas, self.threshold_vas, "--fraction_vas", "--threshold_vas", self.name)
        _check_fraction(self.fraction_vas, "--fraction_vas")
        if self.fraction_vas is not None and self.fraction is not None and self.fraction_vas > self.fraction:
            raise VaralignError(f"--fraction_vas ({self.fraction_vas}) cannot exceed --fraction ({self.fraction})")
        if self.name == "vas" and self.target is None and self.target_variance_name is None:
            raise VaralignError("vas needs a target: --target PATH, or --target_variance_name NAME --files_path DIR")
        if self.target is None and self.target_variance_name is not None and self.files_path is None:
            raise VaralignError("--target_variance_name needs --files_path DIR (target read from DIR/variance/)")

    def target_file(self) -> Path | None:
        if self.name != "vas":
            return None
        if self.target is not None:
            return Path(self.target)
        return target_path_for(self.files_path, self.target_variance_name)


def _one_of(a: float | None, b: float | None, na: str, nb: str, name: str) -> None:
    if (a is None) == (b is None):
        raise VaralignError(f"{name} needs exactly one of {na} or {nb}")


def _check_fraction(value: float | None, flag: str) -> None:
    if value is not None and not (0.0 < value <= 1.0):
        raise VaralignError(f"{flag} must be in (0, 1], got {value}")


@dataclass
class FilterResult:
    """What `filter_pool` selected and how: uids (sorted u8,u8), counts per stage, timings."""

    uids: np.ndarray
    counts: dict[str, int]
    timings: dict[str, float]
    thresholds: dict[str, float] = field(default_factory=dict)
    save_path: str | None = None
    manifest_path: str | None = None
    scores_path: str | None = None


def filter_pool(metadata_dir: str | os.PathLike, save_path: str | os.PathLike | None = None,
                name: str = "clip_score", **options: object) -> FilterResult:
    """Select a subset of the DataComp pool in `metadata_dir` and save it as DataComp's subset file.

    `options` are the fields of `FilterSpec` (e.g. `arch="l14", fraction=0.45, fraction_vas=0.3,
    target="variance_imagenet_1k.npy"`). Nothing is written unless the whole run succeeds.
    """
    spec = FilterSpec(name=name, **options)  # type: ignore[arg-type]
    spec.validate()
    for out in (save_path, spec.save_scores):
        if out is not None:
            check_output_path(out)
    clock = _Clock()
    workers = spec.num_workers or default_workers()
    shards = discover_shards(metadata_dir, need_npz=spec.name in ("vas", "vas_d"))
    dim = ARCHS.get(spec.arch or "", None)
    target_file = spec.target_file()
    target = load_target(target_file, dim) if target_file else None
    if spec.name in ("vas", "vas_d"):
        members = [embedding_member(s, image_key(spec.arch), dim) for s in shards]
        store_dtype = np.result_type(*[m.dtype for m in members])
    clock.lap("validate")

    score_col = SCORE_COLUMN[spec.arch] if spec.name != "no_filter" else None
    given = str(spec.given_uids_path) if spec.given_uids_path else None
    scans = run_tasks(scan_shard, [(s, score_col, given) for s in shards], workers, "read parquet", spec.quiet)
    uids = np.concatenate([sc.uids for sc in scans])
    offsets = np.cumsum([0] + [len(sc.uids) for sc in scans])
    dup = first_duplicate(sort_uids(uids))
    if dup is not None:
        shard = _shard_of_uid(uids, sort_uids(uids)[dup], shards, offsets)
        raise VaralignError("duplicate uid across shards (also in an earlier shard)", shard.parquet)
    n_pool = len(uids)
    counts = {"pool": n_pool}
    thresholds: dict[str, float] = {}
    columns: dict[str, np.ndarray] = {}
    clock.lap("scan")

    if spec.name == "no_filter":
        selected = np.ones(n_pool, dtype=bool)
    else:
        clip = np.concatenate([sc.clip for sc in scans])
        columns["clip_score"] = clip
        if spec.name == "clip_score":
            t = datacomp_threshold(clip, spec.fraction) if spec.fraction is not None else spec.threshold
            thresholds["clip_score"] = float(t)
            selected = at_least(clip, t)
        else:
            stage = _clip_stage(clip, spec, n_pool, thresholds)
            counts["clip_stage"] = int(stage.sum())
            columns["in_clip_stage"] = stage
            if spec.name == "vas":
                selected = _vas_stage(spec, shards, scans, offsets, stage, target, n_pool, workers,
                                      thresholds, columns)
            else:
                selected = _vas_d_stage(spec, shards, scans, offsets, stage, dim, store_dtype, n_pool,
                                        workers, save_path, columns)
        clock.lap("score")
    counts["selected"] = int(selected.sum())
    if spec.name == "vas_d":
        counts["vas_d_iterations"] = int(spec.num_iters)
    columns["selected"] = selected
    result = FilterResult(sort_uids(uids[selected]), counts, clock.laps, thresholds)
    # every output goes to a temp file first; they are renamed together only when all were written
    with contextlib.ExitStack() as outputs:
        if spec.save_scores:
            _save_scores(outputs.enter_context(atomic_path(spec.save_scores, ".parquet")), uids, columns)
            result.scores_path = str(spec.save_scores)
        if save_path is not None:
            save_subset(outputs.enter_context(atomic_path(save_path, ".npy")), result.uids)
            result.save_path = str(save_path)
            clock.lap("write")
            result.manifest_path = str(_manifest_path(save_path))
            save_json(outputs.enter_context(atomic_path(result.manifest_path, ".json")),
                      _manifest(spec, metadata_dir, shards, target_file, result, clock))
    return result


def _clip_stage(clip: np.ndarray, spec: FilterSpec, n_pool: int, thresholds: dict[str, float]) -> np.ndarray:
    """The VAS reference's CLIP stage: exact top ⌊N·f⌋ (argpartition), or `>= threshold`."""
    if spec.fraction is not None:
        return top_k_mask(clip, count_for_fraction(n_pool, spec.fraction))
    thresholds["clip_score"] = float(spec.threshold)
    return at_least(clip, spec.threshold)


def _rows_per_shard(stage: np.ndarray, scans: list, offsets: np.ndarray) -> list[np.ndarray]:
    """Shard-local row numbers of the pool rows where `stage` is true."""
    out = []
    for i, sc in enumerate(scans):
        local = np.flatnonzero(stage[offsets[i] : offsets[i + 1]])
        out.append(sc.rows[local] if sc.rows is not None else local.astype(np.int64))
    return out


def _vas_stage(spec: FilterSpec, shards: list[Shard], scans: list, offsets: np.ndarray, stage: np.ndarray,
               target: np.ndarray, n_pool: int, workers: int, thresholds: dict, columns: dict) -> np.ndarray:
    key = image_key(spec.arch)
    rows = _rows_per_shard(stage, scans, offsets)
    tasks = [(s, key, r, target) for s, r in zip(shards, rows, strict=True)]  # every shard: NaN/inf anywhere is an error
    parts = run_tasks(vas_shard, tasks, workers, "vas (npz)", spec.quiet)
    vas = np.full(n_pool, np.nan, dtype=np.float32)
    vas[stage] = np.concatenate(parts) if parts else np.empty(0, np.float32)
    columns["vas"] = vas
    cand = np.flatnonzero(stage)
    if spec.fraction_vas is not None:
        k = count_for_fraction(n_pool, spec.fraction_vas)
        if k > len(cand):
            raise VaralignError(f"--fraction_vas asks for {k} rows but only {len(cand)} passed the CLIP stage")
        keep = top_k_mask(vas[cand], k)
    else:
        thresholds["vas"] = float(spec.threshold_vas)
        keep = at_least(vas[cand], spec.threshold_vas)
    selected = np.zeros(n_pool, dtype=bool)
    selected[cand[keep]] = True
    return selected


def _vas_d_stage(spec: FilterSpec, shards: list[Shard], scans: list, offsets: np.ndarray, stage: np.ndarray,
                 dim: int, store_dtype: np.dtype, n_pool: int, workers: int, save_path: object,
                 columns: dict) -> np.ndarray:
    key = image_key(spec.arch)
    cand = np.flatnonzero(stage)
    target_count = count_for_fraction(n_pool, spec.fraction_vas)
    if target_count > len(cand):
        raise VaralignError(f"--fraction_vas asks for {target_count} rows but only {len(cand)} passed the CLIP stage")
    cand_rows = _rows_per_shard(stage, scans, offsets)
    store_offsets = np.cumsum([0] + [len(r) for r in cand_rows])
    work_root = Path(save_path).parent if save_path is not None else None
    if work_root is not None:
        work_root.mkdir(parents=True, exist_ok=True)
    work = tempfile.mkdtemp(prefix=".varalign-vas_d-", dir=work_root)
    try:
        store = CandidateStore.create(os.path.join(work, "candidates.bin"), len(cand), dim, store_dtype)
        tasks = [(s, key, dim, sc.rows, r, store.path, int(o))
                 for s, sc, r, o in zip(shards, scans, cand_rows, store_offsets[:-1], strict=True)]
        grams = run_tasks(collect_shard, tasks, workers, "vas_d (npz)", spec.quiet)
        g_all = np.sum([g[0] for g in grams], axis=0)
        g_cand = np.sum([g[1] for g in grams], axis=0)
        first_target = (g_all / n_pool).astype(np.float32)
        res = vas_d_iterate(store, g_cand, first_target, target_count, spec.num_iters, workers, spec.quiet)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    removed_at = np.full(n_pool, -1, dtype=np.int32)
    removed_at[cand] = res.removed_at
    last = np.full(n_pool, np.nan, dtype=np.float32)
    last[cand] = res.last_score
    columns["vas_d_removed_at"] = removed_at
    columns["vas_d_score"] = last
    selected = np.zeros(n_pool, dtype=bool)
    selected[cand[res.keep]] = True
    return selected


def _shard_of_uid(uids: np.ndarray, uid: np.ndarray, shards: list[Shard], offsets: np.ndarray) -> Shard:
    hits = np.flatnonzero((uids["f0"] == uid["f0"]) & (uids["f1"] == uid["f1"]))
    last = int(hits[-1])
    return shards[int(np.searchsorted(offsets, last, side="right") - 1)]


def _save_scores(path: str | os.PathLike, uids: np.ndarray, columns: dict[str, np.ndarray]) -> None:
    """Parquet of uid + every score computed, in pool order (NaN/-1 where a row was not scored)."""
    table = pa.table({"uid": uids_to_hex(uids), **{k: pa.array(v) for k, v in columns.items()}})
    pq.write_table(table, path)


def _manifest_path(save_path: str | os.PathLike) -> Path:
    p = Path(save_path)
    return p.with_name(p.stem + ".manifest.json")


def _manifest(spec: FilterSpec, metadata_dir: object, shards: list[Shard], target_file: Path | None,
              result: FilterResult, clock: _Clock) -> dict:
    listing = hashlib.sha256()
    for s in shards:
        for f in (s.parquet, s.npz):
            if f:
                st = os.stat(f)
                listing.update(f"{os.path.basename(f)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return {
        "tool": "varalign filter",
        "varalign_version": __version__,
        "command": sys.argv if Path(sys.argv[0]).name.startswith("varalign") else None,
        "options": asdict(spec),
        "inputs": {
            "metadata_dir": str(metadata_dir),
            "shards": len(shards),
            "rows": int(sum(s.num_rows for s in shards)),
            "shard_listing_sha256": listing.hexdigest(),
            "target": str(target_file) if target_file else None,
            "target_sha256": _sha256(target_file) if target_file else None,
            "given_uids_path": spec.given_uids_path,
        },
        "output": {"path": result.save_path, "uids": int(len(result.uids)), "scores": result.scores_path},
        "counts": result.counts,
        "thresholds": result.thresholds,
        "timings_s": {k: round(v, 3) for k, v in clock.laps.items()},
        "versions": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "numpy": np.__version__, "pyarrow": pa.__version__}
    for mod in ("zlib_ng", "torch", "tqdm"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    try:
        from importlib.metadata import version  # noqa: PLC0415

        out["zlib-ng"] = version("zlib-ng")
    except Exception:  # noqa: BLE001
        pass
    return out


class _Clock:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.laps["total"] = now - self.t0
        self.last = now
