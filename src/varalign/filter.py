"""`filter_pool`: run a selection recipe over a DataComp pool, shard by shard, and write the subset."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ._version import __version__
from .atomic import OutputGroup, atomic_path, check_output_path, manifest_path
from .backend import check_device
from .errors import VaralignError
from .execute import default_workers, make_executor
from .guard import check_paths, lock, lock_file_for, lock_outputs
from .pool import Shard, discover_shards, embedding_member
from .recipe import Recipe, Stage, list_presets, load_recipe, validate_recipe
from .scan import ShardScan, scan_shard
from .scorers import SCORERS, Context, Prepared, prepare, rule_scores
from .scores.vas_d import (
    CandidateStore,
    VasDResult,
    collect_shard,
    lowrank_basis,
    project_store,
    vas_d_iterate,
    write_rows,
)
from .select import at_least, count_for_fraction, threshold_at_rank_parts, top_k_parts
from .uids import UID_DTYPE, first_shared, merge_runs, save_run, sort_uids, stream_subset, uids_to_hex
from .workdir import WorkDir, digest, is_ours

METHODS = {
    "no_filter": "every uid of the pool",
    "basic_filter": "DataComp basic: English (fastText), >2 words, >5 chars, min side >= 200, aspect <= 3",
    "text_based": "DataComp text-based: English and a caption word naming an ImageNet-21k class (WordNet)",
    "image_based": "DataComp image-based: caption rule and an image cluster that holds ImageNet-1k images",
    "image_based_intersect_clip_score": "DataComp image-based ∩ CLIP score (threshold-at-rank on the pool)",
    "clip_score": "DataComp CLIP-score filter: keep score >= threshold (or the score at rank ⌊N·f⌋)",
    "laion2b": "DataComp LAION-2B filter: CLD3 English and CLIP B/32 score >= 0.28",
    "vas": "VAS ∩ CLIP score: top ⌊N·f⌋ by CLIP score, then top ⌊N·f_vas⌋ by VAS against a target",
    "vas_d": "VAS-D ∩ CLIP score: CLIP stage, then greedy VAS against the selection itself",
    "negcliploss": "negCLIPLoss top ⌊N·f⌋; with --fraction_vas < --fraction, then NormSim top ⌊N·f_vas⌋ "
                   "(the negCLIPLoss paper's cs_new)",
    "cs_new": "alias of negcliploss (the name in the negCLIPLoss_NormSim reference scripts)",
}
RULE_METHODS = ("basic_filter", "text_based", "image_based", "laion2b")


@dataclass
class FilterSpec:
    """Every option of `varalign filter`; names follow DataComp's and the VAS reference's flags."""

    name: str | None = None
    recipe: str | None = None
    arch: str | None = None
    fraction: float | None = None
    threshold: float | None = None
    fraction_vas: float | None = None
    threshold_vas: float | None = None
    target: str | None = None
    target_variance_name: str | None = None
    files_path: str | None = None
    cache_path: str | None = None
    num_iters: int | None = None
    image_based_scale: str | None = None
    centroid_path: str | None = None
    fasttext_model: str | None = None
    download: bool = False
    temperature: float = 0.01
    average_num: int = 10
    norm: float | str = "inf"
    proxy_name: str | None = None
    proxy_path: str | None = None
    vas_d_mode: str = "exact"
    vas_d_rank: int = 128
    given_uids_path: str | None = None
    num_workers: int | None = None
    batch_size: int | None = None
    batch_size_vass: int | None = None
    save_scores: str | None = None
    seed: int = 0
    device: str = "cpu"
    executor: str = "local"
    ray_address: str | None = None
    work_dir: str | None = None
    keep_work_dir: bool = False
    overwrite: bool = False
    quiet: bool = False

    def to_recipe(self) -> Recipe:
        """The `--name` preset (or the `--recipe` file) as a recipe; checks the flags first."""
        if (self.name is None) == (self.recipe is None):
            raise VaralignError("give exactly one of --name or --recipe")
        self._check_options()
        if self.recipe is not None:
            return load_recipe(self.recipe)
        if self.name not in METHODS:
            raise VaralignError(f"--name must be one of {', '.join(METHODS)}, got {self.name!r}")
        if self.name == "no_filter":
            return Recipe("no_filter", METHODS["no_filter"])
        if self.name in RULE_METHODS:
            return Recipe(self.name, METHODS[self.name], [self._rule_stage(self.name)])
        _one_of(self.fraction, self.threshold, "--fraction", "--threshold", self.name)
        _check_fraction(self.fraction, "--fraction")
        if self.name == "clip_score":
            return Recipe("clip_score", METHODS["clip_score"], [self._clip_stage("datacomp")])
        if self.name == "image_based_intersect_clip_score":
            return Recipe(self.name, METHODS[self.name], [self._clip_stage("datacomp"), self._rule_stage("image_based")])
        if self.name in ("negcliploss", "cs_new"):
            return self._negcliploss_recipe()
        if self.name == "vas_d" and (self.fraction_vas is None or self.threshold_vas is not None):
            raise VaralignError("vas_d needs --fraction_vas (not --threshold_vas)")
        _one_of(self.fraction_vas, self.threshold_vas, "--fraction_vas", "--threshold_vas", self.name)
        _check_fraction(self.fraction_vas, "--fraction_vas")
        if self.fraction_vas is not None and self.fraction is not None and self.fraction_vas > self.fraction:
            raise VaralignError(f"--fraction_vas ({self.fraction_vas}) cannot exceed --fraction ({self.fraction})")
        params = {"arch": self.arch}
        if self.name == "vas":
            params |= {"target": self.target, "target_variance_name": self.target_variance_name}
        else:
            params |= {"num_iters": self.num_iters, "mode": self.vas_d_mode, "rank": self.vas_d_rank}
        second = Stage(self.name, {k: v for k, v in params.items() if v is not None}, self.fraction_vas,
                       self.threshold_vas)
        return Recipe(self.name, METHODS[self.name], [self._clip_stage("top_k"), second])

    def _check_options(self) -> None:
        """Numbers in range and finite, no two options that contradict each other (before any work)."""
        for flag in ("threshold", "threshold_vas"):
            v = getattr(self, flag)
            if v is not None and not math.isfinite(float(v)):
                raise VaralignError(f"--{flag} must be a finite number, got {v}")
        for flag in ("fraction", "fraction_vas"):
            _check_fraction(getattr(self, flag), f"--{flag}")
        for flag, low in (("num_iters", 1), ("vas_d_rank", 1), ("batch_size", 1), ("batch_size_vass", 1),
                          ("num_workers", 1), ("average_num", 1), ("seed", 0)):
            v = getattr(self, flag)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low):
                raise VaralignError(f"--{flag} must be an integer >= {low}, got {v!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise VaralignError(f"--temperature must be a finite number > 0, got {self.temperature!r}")
        from .scores.normsim import parse_p  # noqa: PLC0415

        parse_p(self.norm)
        for a, b in (("target", "target_variance_name"), ("proxy_path", "proxy_name"),
                     ("centroid_path", "image_based_scale")):
            if getattr(self, a) is not None and getattr(self, b) is not None:
                raise VaralignError(f"--{a} and --{b} both choose the same input: give one")

    def _rule_stage(self, name: str) -> Stage:
        if name == "laion2b" and any(v is not None for v in (self.fraction, self.threshold, self.arch)):
            raise VaralignError("laion2b does not take --fraction, --threshold or --arch (it uses B/32 >= 0.28)")
        params: dict = {}
        if name == "image_based":
            params = {"image_based_scale": self.image_based_scale, "centroids": self.centroid_path}
        return Stage(name, {k: v for k, v in params.items() if v is not None})

    def _negcliploss_recipe(self) -> Recipe:
        """cs_new: negCLIPLoss top ⌊N·f⌋, then (if --fraction_vas < --fraction) NormSim top ⌊N·f_vas⌋."""
        _check_fraction(self.fraction_vas, "--fraction_vas")
        if None not in (self.fraction_vas, self.fraction) and self.fraction_vas > self.fraction:
            raise VaralignError(f"--fraction_vas ({self.fraction_vas}) cannot exceed --fraction ({self.fraction})")
        ncl = {"arch": self.arch, "temperature": self.temperature, "average_num": self.average_num,
               "batch_size": 32768 if self.batch_size is None else self.batch_size}
        stages = [Stage("negcliploss", ncl, self.fraction, self.threshold)]
        if self.threshold_vas is not None or (self.fraction_vas is not None and self.fraction_vas != self.fraction):
            norm = {"arch": self.arch, "p": self.norm}
            if self.proxy_path:
                norm["target"] = self.proxy_path
            elif self.proxy_name not in (None, "imagenet_1k", "imagenet-1k"):
                raise VaralignError("--proxy_name: only imagenet_1k is built in; pass --proxy_path DIR for others")
            stages.append(Stage("normsim", norm, self.fraction_vas, self.threshold_vas))
        return Recipe(self.name, METHODS[self.name], stages)

    def _clip_stage(self, select: str) -> Stage:
        return Stage("clip_score", {"arch": self.arch} if self.arch else {}, self.fraction, self.threshold, select)


def _one_of(a: float | None, b: float | None, na: str, nb: str, name: str) -> None:
    if (a is None) == (b is None):
        raise VaralignError(f"{name} needs exactly one of {na} or {nb}")


def _check_fraction(value: float | None, flag: str) -> None:
    if value is not None and not (0.0 < value <= 1.0):
        raise VaralignError(f"{flag} must be in (0, 1], got {value}")


def describe_methods() -> dict[str, str]:
    """Every `--name`, every score usable in a recipe stage, and every shipped preset."""
    out = {name: text for name, text in METHODS.items()}
    out |= {f"score:{name}": info.description for name, info in SCORERS.items()}
    out |= {f"preset:{name}": text for name, text in list_presets().items()}
    return out


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
                name: str | None = None, **options: object) -> FilterResult:
    """Select a subset of the DataComp pool in `metadata_dir` and save it as DataComp's subset file.

    `name` is a `--name` method; or pass `recipe=` (a TOML file or preset name). `options` are the
    fields of `FilterSpec` (e.g. `arch="l14", fraction=0.45, fraction_vas=0.3, target=...`).
    Nothing is written unless the whole run succeeds, and then every output appears together (the
    manifest last); a killed run resumes from its work directory; nothing varalign did not write is
    removed or overwritten (`overwrite=True` allows replacing an existing output file).
    """
    spec = FilterSpec(name=name, **options)  # type: ignore[arg-type]
    recipe = spec.to_recipe()
    validate_recipe(recipe, rule_scores(), set(SCORERS))
    for out in (save_path, spec.save_scores):
        if out is not None:
            check_output_path(out)
    run = _Run(spec, recipe, metadata_dir, save_path)
    run.check_paths()
    with lock_outputs(run.group.all_paths()), run.work_dir_lock():
        run.group.recover()
        done = run.up_to_date()
        if done is not None:
            run.drop_stale_work_dir()  # e.g. left by a run killed after its last rename
            return done
        run.group.check_overwrite()
        run.open_work_dir()
        try:
            with run.group.writing():
                run.scan()
                selected = run.evaluate(recipe, run.everything(), prefix="", key=run.scan_key)
                result = run.finish(selected)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the finished tasks, to resume
            run.remove_temp_dir()
            raise
        except BaseException:  # bad input or an I/O fault: leave nothing behind (unless --keep_work_dir)
            run.discard_work_dir()
            raise
        run.remove_temp_dir()
        run.close_work_dir()
    return result


@dataclass
class Mask:
    """A keep mask over the pool, stored one `.npy` per shard in the work dir (`phase` None: all rows)."""

    phase: str | None
    counts: list[int]  # rows set, per shard

    @property
    def total(self) -> int:
        return int(sum(self.counts))


class _Run:
    """One filter run. Pool-wide state lives in the work directory, one file per shard and stage;
    the driver holds one shard's arrays at a time (plus O(shards) bookkeeping), whatever the pool size."""

    def __init__(self, spec: FilterSpec, recipe: Recipe, metadata_dir: object, save_path: object) -> None:
        self.spec, self.recipe, self.metadata_dir, self.save_path = spec, recipe, metadata_dir, save_path
        self.clock = _Clock()
        self.executor = make_executor(spec.executor, spec.num_workers, spec.ray_address)
        ctx = Context(spec.files_path, spec.cache_path, spec.seed, check_device(spec.device), spec.download,
                      spec.fasttext_model, spec.image_based_scale, spec.centroid_path)
        self.prepared = {id(s): prepare(s.score, s.params, ctx) for s in recipe.all_stages()}
        need_npz = any(p.members for p in self.prepared.values())
        self.shards = discover_shards(metadata_dir, need_npz=need_npz)
        self.members = {(key, dim): [embedding_member(s, key, dim) for s in self.shards]
                        for p in self.prepared.values() for key, dim in p.members}
        self.listing = _listing(self.shards)
        given = _file_digest(spec.given_uids_path) if spec.given_uids_path else None
        self.scan_key = digest("scan", self.listing, given, sorted({p.column for p in self.prepared.values()
                                                                     if p.column}))
        self.plan = digest(__version__, self.scan_key, _recipe_identity(recipe, self.prepared), spec.save_scores)
        self.counts: dict[str, int] = {}
        self.thresholds: dict[str, float] = {}
        self.columns: dict[str, Callable[[int], pa.Array]] = {}  # --save_scores columns, built shard by shard
        self.info: dict[str, dict] = {}
        self.work: WorkDir | None = None
        self.temp_dir: str | None = None
        self.outputs = [Path(p) for p in (save_path, spec.save_scores) if p is not None]
        manifest = manifest_path(save_path if save_path is not None else spec.save_scores) if self.outputs else None
        self.group = OutputGroup(self.outputs, manifest, overwrite=spec.overwrite)
        self.work_root = self._work_root()
        self.phases = 0
        self.clock.lap("validate")

    # -- work directory and resume ------------------------------------------------------------
    def _work_root(self) -> Path | None:
        if self.spec.work_dir:
            return Path(self.spec.work_dir)
        return _default_work_dir(self.save_path) if self.save_path is not None else None

    def input_paths(self) -> dict[str, object]:
        """Every file and folder this run reads, by flag."""
        spec = self.spec
        found = {"--metadata_dir": str(self.metadata_dir),
                 "a pool shard": [f for s in self.shards for f in (s.parquet, s.npz) if f],
                 "--given_uids_path": spec.given_uids_path, "--target": spec.target,
                 "--centroid_path": spec.centroid_path, "--proxy_path": spec.proxy_path,
                 "--fasttext_model": spec.fasttext_model, "--recipe": spec.recipe if spec.recipe and
                 os.path.exists(spec.recipe) else None}
        for p in self.prepared.values():  # what the scorers resolved (e.g. --target_variance_name's file)
            for k, v in p.info.items():
                if isinstance(v, str) and len(v) < 4096 and os.path.isfile(v):
                    found[f"the {k} file"] = v
        return found

    def check_paths(self) -> None:
        """No output is an input or another output; the work directory holds neither."""
        outs = {"--save_path": self.save_path, "--save_scores": self.spec.save_scores}
        if self.group.outputs:
            outs["the manifest"] = str(self.group.manifest)
        check_paths(self.input_paths(), outs, self.work_root, pool_dirs=[self.metadata_dir])

    @contextlib.contextmanager
    def work_dir_lock(self) -> Iterator[None]:
        if self.work_root is None:
            yield
            return
        with lock(lock_file_for(self.work_root.absolute()), f"the work directory {self.work_root}"):
            yield

    # -- work directory and resume ------------------------------------------------------------
    def up_to_date(self) -> FilterResult | None:
        """The previous result, if its outputs are there, unchanged (sizes and SHA-256 as the manifest
        records them), and were made from the same inputs and configuration."""
        if self.save_path is None:
            return None
        manifest = self.group.up_to_date(self.plan)
        if manifest is None:
            return None
        if not self.spec.quiet:
            print(f"varalign: {self.save_path} is up to date (same inputs and configuration, output verified); "
                  "nothing to do", file=sys.stderr)
        return FilterResult(_open_subset(self.save_path), manifest["counts"], {"total": 0.0},
                            manifest.get("thresholds", {}), str(self.save_path), str(self.group.manifest),
                            self.spec.save_scores)

    def open_work_dir(self) -> None:
        """The user's (or the default) work dir; a temporary one, removed at the end, when there is none."""
        root = self.work_root
        if root is None:
            self.temp_dir = tempfile.mkdtemp(prefix="varalign-work-")
            root = Path(self.temp_dir) / "work"
        self.work = WorkDir(root, self.plan)

    def drop_stale_work_dir(self) -> None:
        root = self.work_root
        if root is not None and not self.spec.keep_work_dir and root.is_dir() and is_ours(root):
            WorkDir(root, self.plan).remove()

    def discard_work_dir(self) -> None:
        """After an error: remove the work dir (only if it is varalign's), unless --keep_work_dir."""
        self.remove_temp_dir()
        if self.work is not None and not self.spec.keep_work_dir and is_ours(self.work.root):
            with contextlib.suppress(OSError, VaralignError):
                self.work.remove()

    def close_work_dir(self) -> None:
        if self.work is not None and not self.spec.keep_work_dir:
            self.work.remove()

    def remove_temp_dir(self) -> None:
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def _map(self, phase: str, fn: Callable, make_task: Callable[[int], tuple], indices: Iterable[int], desc: str,
             encode: Callable | None = None, decode: Callable | None = None, on_result: Callable | None = None,
             on_done: Callable[[int, Any], None] | None = None) -> None:
        """Run `fn(*make_task(i))` for the shards not already in the work dir, saving each result there.

        Tasks go to the executor a window at a time, so the driver holds a window's results, not the
        pool's; `on_result(i, r)` may transform a new result before it is saved, and `on_done(i, r)`
        sees every result (new or cached) in shard order.
        """
        encode = encode or (lambda r: {"values": r})
        decode = decode or (lambda a: a["values"])
        indices = list(indices)
        window = max(1, 4 * int(getattr(self.executor, "num_workers", 1)))
        pending = sum(not self.work.has(phase, self.shards[i].name) for i in indices)
        with tqdm(total=pending, desc=desc, unit="shard", disable=self.spec.quiet, leave=False) as bar:
            for start in range(0, len(indices), window):
                self._map_window(phase, fn, make_task, indices[start : start + window], desc, encode, decode,
                                 on_result, on_done, bar)

    def _map_window(self, phase: str, fn: Callable, make_task: Callable[[int], tuple], part: list[int], desc: str,
                    encode: Callable, decode: Callable, on_result: Callable | None,
                    on_done: Callable[[int, Any], None] | None, bar: Any) -> None:
        """One window of `_map`: run the missing tasks, then hand every result to `on_done` in order."""
        todo = [i for i in part if not self.work.has(phase, self.shards[i].name)]
        fresh: dict[int, Any] = {}

        def finished(j: int, result: Any, todo: list[int] = todo, fresh: dict = fresh) -> None:
            i = todo[j]
            if on_result is not None:
                result = on_result(i, result)
            self.work.save(phase, self.shards[i].name, encode(result))
            fresh[i] = result if on_done is not None else None

        self.executor.map(fn, [make_task(i) for i in todo], desc, self.spec.quiet, on_result=finished, bar=bar)
        if on_done is not None:
            for i in part:
                on_done(i, fresh.pop(i) if i in fresh else decode(self.work.load(phase, self.shards[i].name)))
        else:
            for i in part:
                if i not in fresh:
                    self.work.reused += 1

    # -- per-shard state in the work dir ------------------------------------------------------
    def _scan(self, i: int, key: str) -> np.ndarray:
        """One array (`uids`, `col_<name>`, `rows`) of shard i's scan."""
        return self.work.read(self.scan_phase, self.shards[i].name, key)

    def _rows(self, alive: Mask, i: int) -> np.ndarray:
        """Shard-local row numbers of shard i's alive rows."""
        local = np.flatnonzero(self._mask(alive, i))
        return self._scan(i, "rows")[local] if self.restricted else local.astype(np.int64)

    def _pool_rows(self, i: int) -> np.ndarray | None:
        return self._scan(i, "rows") if self.restricted else None

    def _mask(self, mask: Mask, i: int) -> np.ndarray:
        if mask.phase is None:
            return np.ones(self.sizes[i], dtype=bool)
        return self.work.get_array(mask.phase, self.shards[i].name)

    def _phase(self, kind: str, label: str) -> str:
        """A fresh work-dir folder for this run's own per-shard arrays (rewritten by every run)."""
        self.phases += 1
        return f"_{kind}-{self.phases}-{_safe(label)}"

    def _save_masks(self, label: str, masks: Iterable[np.ndarray]) -> Mask:
        phase = self._phase("keep", label)
        counts = []
        for i, m in enumerate(masks):
            self.work.put_array(phase, self.shards[i].name, m)
            counts.append(int(m.sum()))
        return Mask(phase, counts)

    def everything(self) -> Mask:
        return Mask(None, list(self.sizes))

    def _run_path(self, kind: str, i: int) -> str:
        return str(self.work.path(f"_runs-{kind}", f"{self.shards[i].name}.u8u8"))

    # -- passes -------------------------------------------------------------------------------
    def scan(self) -> None:
        """Pass 1: every shard's uids and score columns into the work dir; uids unique across shards."""
        cols = sorted({p.column for p in self.prepared.values() if p.column})
        given = str(self.spec.given_uids_path) if self.spec.given_uids_path else None
        self.restricted = given is not None
        self.scan_phase = f"scan-{self.scan_key}"
        self.sizes = [0] * len(self.shards)

        def done(i: int, sc: ShardScan) -> None:
            self.sizes[i] = len(sc.uids)
            save_run(self._run_path("pool", i), sc.sorted_uids if sc.sorted_uids is not None else sort_uids(sc.uids))

        self._map(self.scan_phase, scan_shard, lambda i: (self.shards[i], cols, given), range(len(self.shards)),
                  "read parquet", encode=_encode_scan, decode=_decode_scan, on_done=done)
        runs = [self._run_path("pool", i) for i in range(len(self.shards))]
        later = first_shared(merge_runs(runs, self.sizes))
        if later is not None:
            raise VaralignError("duplicate uid across shards (also in an earlier shard)", self.shards[later].parquet)
        self.n_pool = int(sum(self.sizes))
        self.counts["pool"] = self.n_pool
        self.clock.lap("scan")

    def evaluate(self, recipe: Recipe, alive: Mask, prefix: str, key: str) -> Mask:
        """The rows `recipe` keeps, starting from `alive`."""
        if recipe.op:
            masks = [self.evaluate(p, alive, f"{prefix}{p.name}.", key) for p in recipe.parts]
            combine = np.logical_and if recipe.op == "intersection" else np.logical_or
            return self._save_masks(prefix + recipe.op, (functools.reduce(combine, [self._mask(m, i) for m in masks])
                                                         for i in range(len(self.shards))))
        for stage in recipe.stages:
            key = digest(key, _stage_identity(stage, self.prepared[id(stage)]))
            alive = self._stage(stage, alive, prefix + stage.label, key)
            self.counts[prefix + stage.label] = alive.total
            self.clock.lap(prefix + stage.label)
        return alive

    def _stage(self, stage: Stage, alive: Mask, label: str, key: str) -> Mask:
        prep = self.prepared[id(stage)]
        self.info[label] = {"score": stage.score, "params": _plain(stage.params), "fraction": stage.fraction,
                            "threshold": stage.threshold, "select": stage.select, **prep.info}
        if prep.kind == "vas_d":
            return self._vas_d(stage, prep, alive, label, key)
        values, dtype = self._values(prep, alive, label, key)
        keeps = self._keep(stage, values, dtype, alive.total, label)
        out = self._save_masks(label, (self._expand(alive, i, k) for i, k in enumerate(keeps)))
        self.columns[f"kept_{label}"] = lambda i: pa.array(self._mask(out, i))
        return out

    def _expand(self, alive: Mask, i: int, keep: np.ndarray) -> np.ndarray:
        """A keep mask over the alive rows of shard i, as a mask over all its rows."""
        a = self._mask(alive, i)
        out = np.zeros_like(a)
        out[np.flatnonzero(a)[keep]] = True
        return out

    def _values(self, prep: Prepared, alive: Mask, label: str, key: str) -> tuple[Callable[[int], np.ndarray],
                                                                                   np.dtype]:
        """The stage's score of shard i's alive rows (a function of i), and its dtype (float32 or bool)."""
        if prep.kind == "column":
            col = f"col_{prep.column}"
            self.columns[label] = lambda i: pa.array(self._scan(i, col))
            return (lambda i: self._scan(i, col)[self._mask(alive, i)]), np.dtype(np.float32)
        phase = f"{_safe(label)}-{key}"
        ran = [i for i in range(len(self.shards)) if alive.counts[i] or prep.every_shard]
        self._map(phase, _call, lambda i: (prep.fn, self.shards[i], self._rows(alive, i), prep.kwargs), ran, label)
        first = self.work.read(phase, self.shards[ran[0]].name, "values") if ran else None
        dtype = np.dtype(bool) if first is not None and first.dtype == bool else np.dtype(np.float32)
        has = set(ran)

        def values(i: int) -> np.ndarray:
            if i not in has:
                return np.empty(0, dtype=dtype)
            return self.work.read(phase, self.shards[i].name, "values").astype(dtype, copy=False)

        def column(i: int) -> pa.Array:
            a = self._mask(alive, i)
            full = np.zeros(len(a), dtype=bool) if dtype.kind == "b" else np.full(len(a), np.nan, dtype=np.float32)
            full[a] = values(i)
            return pa.array(full, mask=~a)

        self.columns[label] = column
        return values, dtype

    def _keep(self, stage: Stage, values: Callable[[int], np.ndarray], dtype: np.dtype, n_alive: int,
              label: str) -> Iterable[np.ndarray]:
        """Per shard, which of its alive rows survive the stage's keep rule."""
        def parts() -> Iterator[np.ndarray]:
            return (values(i) for i in range(len(self.shards)))

        if dtype.kind == "b":
            return parts()
        if stage.threshold is not None:
            self.thresholds[label] = float(stage.threshold)
            return (at_least(v, stage.threshold) for v in parts())
        k = count_for_fraction(self.n_pool, stage.fraction)
        if stage.select == "datacomp":
            t = threshold_at_rank_parts(parts, k)
            self.thresholds[label] = t
            return (at_least(v, t) for v in parts())
        if k > n_alive:
            raise VaralignError(f"stage {label!r} asks for {k} rows (fraction {stage.fraction} of the pool) "
                                f"but only {n_alive} survived the previous stage")
        return top_k_parts(parts, k)

    def _vas_d(self, stage: Stage, prep: Prepared, alive: Mask, label: str, key: str) -> Mask:
        key_name, dim, iters = prep.kwargs["key"], prep.kwargs["dim"], prep.kwargs["num_iters"]
        target_count = count_for_fraction(self.n_pool, stage.fraction)
        if target_count > alive.total:
            raise VaralignError(f"stage {label!r} asks for {target_count} rows but only {alive.total} survived "
                                "the previous stage")
        if iters > alive.total - target_count:  # every round would drop at most one row: the rest do nothing
            capped = max(1, alive.total - target_count)
            print(f"varalign: note: --num_iters {iters} capped at {capped} (VAS-D drops {alive.total - target_count} "
                  "rows, at least one per round; the subset is the same)", file=sys.stderr)
            iters = capped
        self.info[label]["num_iters_run"] = iters
        offsets = np.cumsum([0] + alive.counts)
        dtype = np.result_type(*[m.dtype for m in self.members[(key_name, dim)]])
        phase = f"{_safe(label)}-{key}"
        store = CandidateStore.create(str(self.work.path(phase) / "candidates.bin"), alive.total, dim, dtype)
        direct = self.executor.shared_filesystem

        def task(i: int) -> tuple:
            return (self.shards[i], key_name, dim, self._pool_rows(i), self._rows(alive, i),
                    store.path if direct else None, int(offsets[i]), self.spec.device)

        def write_returned(i: int, result: tuple) -> tuple:
            if result[2] is not None:
                write_rows(store.path, int(offsets[i]), result[2])
            return result[:2]

        grams = [np.zeros((dim, dim), dtype=np.float64), np.zeros((dim, dim), dtype=np.float64)]

        def add(i: int, g: tuple) -> None:  # in shard order: the sums do not depend on the executor
            grams[0] += g[0]
            grams[1] += g[1]

        self._map(f"{phase}-collect", collect_shard, task, range(len(self.shards)), f"{label} (npz)",
                  encode=lambda r: {"g_all": r[0], "g_cand": r[1]}, decode=lambda a: (a["g_all"], a["g_cand"]),
                  on_result=write_returned, on_done=add)
        g_all, g_cand = grams
        first_target = (g_all / self.n_pool).astype(np.float32)
        if prep.kwargs["mode"] == "lowrank":  # fast mode: every round in a rank-r subspace
            basis = lowrank_basis(g_cand, prep.kwargs["rank"])
            store = project_store(store, basis, path=f"{store.path}.rank{prep.kwargs['rank']}",
                                  num_workers=self.executor_threads(), device=self.spec.device)
            b64 = basis.astype(np.float64)
            with threadpool_limits(limits=1):  # the same numbers whatever the core count
                g_cand = b64.T @ g_cand @ b64
                first_target = (b64.T @ first_target.astype(np.float64) @ b64).astype(np.float32)
        state, checkpoint = self._vas_d_state(phase)
        # the greedy rounds hold O(candidates) state in RAM: alive (1 B), removed_at (4 B) and last score
        # (4 B) per candidate, 9 B in all; the embeddings stay in the on-disk store
        res = vas_d_iterate(store, g_cand, first_target, target_count, iters, self.executor_threads(),
                            self.spec.quiet, state=state, checkpoint=checkpoint, device=self.spec.device)
        return self._vas_d_outputs(label, alive, offsets, res)

    def _vas_d_outputs(self, label: str, alive: Mask, offsets: np.ndarray, res: VasDResult) -> Mask:
        """Split VAS-D's per-candidate result into per-shard keep masks and --save_scores columns."""
        phase = self._phase("cols", label)

        def split(i: int) -> np.ndarray:
            a = self._mask(alive, i)
            part = slice(int(offsets[i]), int(offsets[i + 1]))
            removed = np.full(len(a), -1, dtype=np.int32)
            removed[a] = res.removed_at[part]
            last = np.full(len(a), np.nan, dtype=np.float32)
            last[a] = res.last_score[part]
            self.work.put_array(phase, f"{self.shards[i].name}.removed_at", removed)
            self.work.put_array(phase, f"{self.shards[i].name}.score", last)
            return self._expand(alive, i, res.keep[part])

        out = self._save_masks(label, (split(i) for i in range(len(self.shards))))
        self.columns[f"{label}_removed_at"] = lambda i: pa.array(
            self.work.get_array(phase, f"{self.shards[i].name}.removed_at"))
        self.columns[f"{label}_score"] = lambda i: pa.array(
            self.work.get_array(phase, f"{self.shards[i].name}.score"), mask=~self._mask(alive, i))
        self.columns[f"kept_{label}"] = lambda i: pa.array(self._mask(out, i))
        return out

    def _vas_d_state(self, phase: str):
        """The last saved VAS-D round (if resuming) and a function that saves each round."""
        if self.temp_dir is not None:  # nothing to resume into
            return None, None
        path = self.work.path(phase, "rounds.npz")
        state = None
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as npz:
                    state = {k: npz[k] for k in npz.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # torn by a power loss: start over
                state = None

        def save(st: dict) -> None:
            with atomic_path(path, ".npz", durable=False) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **st)

        return state, save

    def executor_threads(self) -> int:
        return self.spec.num_workers or default_workers()

    # -- outputs ------------------------------------------------------------------------------
    def finish(self, selected: Mask) -> FilterResult:
        spec = self.spec
        self.counts["selected"] = selected.total
        self.columns["selected"] = lambda i: pa.array(self._mask(selected, i))
        for i in range(len(self.shards)):
            save_run(self._run_path("selected", i), sort_uids(self._scan(i, "uids")[self._mask(selected, i)]))
        runs = [self._run_path("selected", i) for i in range(len(self.shards))]
        result = FilterResult(np.empty(0, dtype=UID_DTYPE), self.counts, self.clock.laps, self.thresholds)
        # every output goes to a temp file first; they are renamed together only when all were written,
        # the manifest (with each output's size and SHA-256) last
        if spec.save_scores:
            with self.group.write(spec.save_scores) as tmp:
                self._write_scores(tmp)
            result.scores_path = str(spec.save_scores)
        if self.save_path is not None:
            with self.group.write(self.save_path) as tmp:
                stream_subset(tmp, selected.total, (b for b, _ in merge_runs(runs, selected.counts)))
            result.save_path = str(self.save_path)
            self.clock.lap("write")
        if self.group.outputs:
            result.manifest_path = str(self.group.manifest)
            self.group.commit(self._manifest(result, selected.total))
        if self.save_path is not None:
            result.uids = _open_subset(self.save_path)  # the saved file, mapped: not a copy in RAM
        else:
            batches = [b for b, _ in merge_runs(runs, selected.counts)]
            result.uids = np.concatenate(batches) if batches else np.empty(0, dtype=UID_DTYPE)
        return result

    def _write_scores(self, path: Path) -> None:
        """The --save_scores parquet, one row group per shard: uid, then every stage's columns."""
        writer = None
        try:
            for i in range(len(self.shards)):
                cols = {"uid": uids_to_hex(self._scan(i, "uids"))} | {k: f(i) for k, f in self.columns.items()}
                table = pa.table(cols)
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table, row_group_size=max(1, table.num_rows))
        finally:
            if writer is not None:
                writer.close()

    def _manifest(self, result: FilterResult, n_uids: int) -> dict:
        return {
            "tool": "varalign filter",
            "varalign_version": __version__,
            "command": sys.argv if Path(sys.argv[0]).name.startswith("varalign") else None,
            "plan": self.plan,
            "recipe": self.recipe.name,
            "options": asdict(self.spec),
            "stages": self.info,
            "inputs": {
                "metadata_dir": str(self.metadata_dir),
                "shards": len(self.shards),
                "rows": int(sum(s.num_rows for s in self.shards)),
                "shard_listing_sha256": digest(self.listing),
                "given_uids_path": self.spec.given_uids_path,
            },
            "output": {"path": result.save_path, "uids": n_uids, "scores": result.scores_path},
            "counts": result.counts,
            "thresholds": result.thresholds,
            "executor": self.executor.name,
            "resumed_tasks": self.work.reused if self.work else 0,
            "timings_s": {k: round(v, 3) for k, v in self.clock.laps.items()},
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def _encode_scan(sc) -> dict[str, np.ndarray]:
    out = {"uids": sc.uids, **{f"col_{k}": v for k, v in sc.columns.items()}}
    if sc.rows is not None:
        out["rows"] = sc.rows
    if sc.sorted_uids is not None:
        out["sorted_uids"] = sc.sorted_uids
    return out


def _decode_scan(a: dict[str, np.ndarray]) -> ShardScan:
    return ShardScan(a["uids"], {k[4:]: v for k, v in a.items() if k.startswith("col_")}, a.get("rows"),
                     a.get("sorted_uids"))


def _open_subset(path: str | os.PathLike) -> np.ndarray:
    """A subset file this tool wrote (sorted, unique), memory-mapped copy-on-write."""
    return np.load(path, mmap_mode="c", allow_pickle=False)


def _listing(shards: list[Shard]) -> list[list]:
    out = []
    for s in shards:
        for f in (s.parquet, s.npz):
            if f:
                st = os.stat(f)
                out.append([os.path.basename(f), st.st_size, st.st_mtime_ns])
    return out


def _file_digest(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _stage_identity(stage: Stage, prep: Prepared) -> list:
    return [stage.score, _plain(stage.params), stage.fraction, stage.threshold, stage.select, stage.label,
            _plain(prep.info)]


def _recipe_identity(recipe: Recipe, prepared: dict[int, Prepared]) -> list:
    if recipe.op:
        return [recipe.op, [_recipe_identity(p, prepared) for p in recipe.parts]]
    return [_stage_identity(s, prepared[id(s)]) for s in recipe.stages]


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


def _default_work_dir(save_path: str | os.PathLike) -> Path:
    p = Path(save_path)
    return p.with_name(f".{p.stem}.varalign-work")


def _call(fn, shard: Shard, rows: np.ndarray, kwargs: dict) -> np.ndarray:
    return fn(shard=shard, rows=rows, **kwargs)


def _plain(params: dict) -> dict:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in params.items()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    out = {"python": sys.version.split()[0]}
    for dist in ("numpy", "pyarrow", "zlib-ng", "tqdm", "torch", "fasttext-predict", "faiss-cpu"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
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
