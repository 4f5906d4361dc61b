"""The in-memory filter engine as it was before the out-of-core rewrite, kept as a test oracle.

It concatenates pool-wide arrays in RAM; tests/test_bounded.py checks the streaming engine
(`varalign.filter`) writes byte-identical outputs. Not part of the package."""

from __future__ import annotations

import contextlib
import json
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

from varalign import __version__
from varalign.atomic import atomic_path, check_output_path, save_json
from varalign.backend import check_device
from varalign.errors import VaralignError
from varalign.execute import default_workers, make_executor
from varalign.pool import Shard, discover_shards, embedding_member
from varalign.recipe import Recipe, Stage, list_presets, load_recipe, validate_recipe
from varalign.scorers import SCORERS, Context, Prepared, prepare, rule_scores
from varalign.scores.scan import scan_shard
from varalign.scores.vas_d import CandidateStore, collect_shard, lowrank_basis, project_store, vas_d_iterate, write_rows
from varalign.select import at_least, count_for_fraction, threshold_at_rank, top_k_mask
from varalign.uids import first_duplicate, load_subset, save_subset, sort_uids, uids_to_hex
from varalign.workdir import WorkDir, digest

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
    quiet: bool = False

    def to_recipe(self) -> Recipe:
        """The `--name` preset (or the `--recipe` file) as a recipe; checks the flags first."""
        if (self.name is None) == (self.recipe is None):
            raise VaralignError("give exactly one of --name or --recipe")
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
               "batch_size": self.batch_size or 32768}
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
    Nothing is written unless the whole run succeeds; a killed run resumes from its work directory.
    """
    spec = FilterSpec(name=name, **options)  # type: ignore[arg-type]
    recipe = spec.to_recipe()
    validate_recipe(recipe, rule_scores(), set(SCORERS))
    for out in (save_path, spec.save_scores):
        if out is not None:
            check_output_path(out)
    run = _Run(spec, recipe, metadata_dir, save_path)
    done = run.up_to_date()
    if done is not None:
        return done
    run.open_work_dir()
    try:
        run.scan()
        selected = run.evaluate(recipe, np.ones(run.n_pool, dtype=bool), prefix="", key=run.scan_key)
        result = run.finish(selected)
    except VaralignError:
        run.discard_work_dir()  # bad input: leave nothing behind
        raise
    run.close_work_dir()
    return result


class _Run:
    """State of one filter run: the pool's uids, per-stage columns, counts and timings."""

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
        self.columns: dict[str, pa.Array] = {}
        self.info: dict[str, dict] = {}
        self.work: WorkDir | None = None
        self.clock.lap("validate")

    # -- work directory and resume ------------------------------------------------------------
    def up_to_date(self) -> FilterResult | None:
        """The previous result, if the outputs exist and were made from the same inputs and config."""
        if self.save_path is None or not Path(self.save_path).exists():
            return None
        try:
            manifest = json.loads(_manifest_path(self.save_path).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("plan") != self.plan or (self.spec.save_scores and not Path(self.spec.save_scores).exists()):
            return None
        if not self.spec.quiet:
            print(f"varalign: {self.save_path} is up to date (same inputs and configuration); nothing to do",
                  file=sys.stderr)
        return FilterResult(load_subset(self.save_path), manifest["counts"], {"total": 0.0},
                            manifest.get("thresholds", {}), str(self.save_path), str(_manifest_path(self.save_path)),
                            self.spec.save_scores)

    def open_work_dir(self) -> None:
        root = self.spec.work_dir or (_default_work_dir(self.save_path) if self.save_path is not None else None)
        if root is not None:
            self.work = WorkDir(root, self.plan)

    def discard_work_dir(self) -> None:
        if self.work is not None and self.work.created:
            self.work.remove()

    def close_work_dir(self) -> None:
        if self.work is not None and not self.spec.keep_work_dir:
            self.work.remove()

    def _map(self, phase: str, fn, tasks: list[tuple], names: list[str], desc: str,
             encode=None, decode=None, on_result=None) -> list:
        """Run tasks through the executor, skipping those the work directory already holds."""
        encode = encode or (lambda r: {"values": r})
        decode = decode or (lambda a: a["values"])
        results: list = [None] * len(tasks)
        todo = []
        for i, name in enumerate(names):
            cached = self.work.load(phase, name) if self.work else None
            if cached is None:
                todo.append(i)
            else:
                results[i] = decode(cached)

        def finished(j: int, result) -> None:
            i = todo[j]
            if on_result is not None:
                result = on_result(i, result)
            if self.work is not None:
                self.work.save(phase, names[i], encode(result))
            results[i] = result

        self.executor.map(fn, [tasks[i] for i in todo], desc, self.spec.quiet, on_result=finished)
        return results

    # -- passes -------------------------------------------------------------------------------
    def scan(self) -> None:
        cols = sorted({p.column for p in self.prepared.values() if p.column})
        given = str(self.spec.given_uids_path) if self.spec.given_uids_path else None
        tasks = [(s, cols, given) for s in self.shards]
        self.scans = self._map(f"scan-{self.scan_key}", scan_shard, tasks, [s.name for s in self.shards],
                               "read parquet", encode=_encode_scan, decode=_decode_scan)
        self.uids = np.concatenate([sc.uids for sc in self.scans])
        self.offsets = np.cumsum([0] + [len(sc.uids) for sc in self.scans])
        ordered = sort_uids(self.uids)
        dup = first_duplicate(ordered)
        if dup is not None:
            raise VaralignError("duplicate uid across shards (also in an earlier shard)",
                                self._shard_of(ordered[dup]).parquet)
        self.n_pool = len(self.uids)
        self.counts["pool"] = self.n_pool
        self.clock.lap("scan")

    def evaluate(self, recipe: Recipe, alive: np.ndarray, prefix: str, key: str) -> np.ndarray:
        """Boolean mask over the pool of the rows `recipe` keeps, starting from `alive`."""
        if recipe.op:
            masks = [self.evaluate(p, alive.copy(), f"{prefix}{p.name}.", key) for p in recipe.parts]
            combine = np.logical_and if recipe.op == "intersection" else np.logical_or
            out = masks[0]
            for m in masks[1:]:
                out = combine(out, m)
            return out
        for stage in recipe.stages:
            key = digest(key, _stage_identity(stage, self.prepared[id(stage)]))
            alive = self._stage(stage, alive, prefix + stage.label, key)
            self.counts[prefix + stage.label] = int(alive.sum())
            self.clock.lap(prefix + stage.label)
        return alive

    def _stage(self, stage: Stage, alive: np.ndarray, label: str, key: str) -> np.ndarray:
        prep = self.prepared[id(stage)]
        self.info[label] = {"score": stage.score, "params": _plain(stage.params), "fraction": stage.fraction,
                            "threshold": stage.threshold, "select": stage.select, **prep.info}
        if prep.kind == "vas_d":
            return self._vas_d(stage, prep, alive, label, key)
        values = self._values(prep, alive, label, key)
        keep = self._keep(stage, values[alive], int(alive.sum()), label)
        out = np.zeros_like(alive)
        out[np.flatnonzero(alive)[keep]] = True
        self.columns[f"kept_{label}"] = pa.array(out)
        return out

    def _values(self, prep: Prepared, alive: np.ndarray, label: str, key: str) -> np.ndarray:
        """The stage's score for every pool row (computed for `alive` rows; the rest NaN/False)."""
        if prep.kind == "column":
            values = np.concatenate([sc.columns[prep.column] for sc in self.scans])
            self.columns[label] = pa.array(values)
            return values
        rows = self._rows_per_shard(alive)
        idx = [i for i, r in enumerate(rows) if len(r) or prep.every_shard]
        tasks = [(prep.fn, self.shards[i], rows[i], prep.kwargs) for i in idx]
        parts = self._map(f"{_safe(label)}-{key}", _call, tasks, [self.shards[i].name for i in idx], label)
        got = np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)
        if got.dtype == bool:
            values = np.zeros(self.n_pool, dtype=bool)
        else:
            values = np.full(self.n_pool, np.nan, dtype=np.float32)
        values[alive] = got
        self.columns[label] = pa.array(values, mask=~alive)
        return values

    def _keep(self, stage: Stage, values: np.ndarray, n_alive: int, label: str) -> np.ndarray:
        """Which of the alive rows survive the stage's keep rule."""
        if values.dtype == bool:
            return values
        if stage.threshold is not None:
            self.thresholds[label] = float(stage.threshold)
            return at_least(values, stage.threshold)
        k = count_for_fraction(self.n_pool, stage.fraction)
        if stage.select == "datacomp":
            t = threshold_at_rank(values, k)
            self.thresholds[label] = t
            return at_least(values, t)
        if k > n_alive:
            raise VaralignError(f"stage {label!r} asks for {k} rows (fraction {stage.fraction} of the pool) "
                                f"but only {n_alive} survived the previous stage")
        return top_k_mask(values, k)

    def _vas_d(self, stage: Stage, prep: Prepared, alive: np.ndarray, label: str, key: str) -> np.ndarray:
        key_name, dim, iters = prep.kwargs["key"], prep.kwargs["dim"], prep.kwargs["num_iters"]
        cand = np.flatnonzero(alive)
        target_count = count_for_fraction(self.n_pool, stage.fraction)
        if target_count > len(cand):
            raise VaralignError(f"stage {label!r} asks for {target_count} rows but only {len(cand)} survived "
                                "the previous stage")
        cand_rows = self._rows_per_shard(alive)
        store_offsets = np.cumsum([0] + [len(r) for r in cand_rows])
        dtype = np.result_type(*[m.dtype for m in self.members[(key_name, dim)]])
        phase = f"{_safe(label)}-{key}"
        scratch = None
        if self.work is not None:
            store_dir = self.work.path(phase)
        else:
            scratch = tempfile.mkdtemp(prefix=".varalign-vas_d-", dir=self._scratch_root())
            store_dir = Path(scratch)
        try:
            store = CandidateStore.create(str(store_dir / "candidates.bin"), len(cand), dim, dtype)
            direct = self.executor.shared_filesystem
            tasks = [(s, key_name, dim, sc.rows, r, store.path if direct else None, int(o))
                     for s, sc, r, o in zip(self.shards, self.scans, cand_rows, store_offsets[:-1], strict=True)]

            def write_returned(i: int, result: tuple) -> tuple:
                if result[2] is not None:
                    write_rows(store.path, int(store_offsets[i]), result[2])
                return result[:2]

            grams = self._map(f"{phase}-collect", collect_shard, tasks, [s.name for s in self.shards],
                              f"{label} (npz)", encode=lambda r: {"g_all": r[0], "g_cand": r[1]},
                              decode=lambda a: (a["g_all"], a["g_cand"]), on_result=write_returned)
            g_all = np.sum([g[0] for g in grams], axis=0)
            g_cand = np.sum([g[1] for g in grams], axis=0)
            first_target = (g_all / self.n_pool).astype(np.float32)
            if prep.kwargs["mode"] == "lowrank":  # fast mode: every round in a rank-r subspace
                basis = lowrank_basis(g_cand, prep.kwargs["rank"])
                store = project_store(store, basis)
                b64 = basis.astype(np.float64)
                g_cand = b64.T @ g_cand @ b64
                first_target = (b64.T @ first_target.astype(np.float64) @ b64).astype(np.float32)
            state, checkpoint = self._vas_d_state(phase)
            res = vas_d_iterate(store, g_cand, first_target, target_count, iters, self.executor_threads(),
                                self.spec.quiet, state=state, checkpoint=checkpoint, device=self.spec.device)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        removed_at = np.full(self.n_pool, -1, dtype=np.int32)
        removed_at[cand] = res.removed_at
        last = np.full(self.n_pool, np.nan, dtype=np.float32)
        last[cand] = res.last_score
        self.columns[f"{label}_removed_at"] = pa.array(removed_at)
        self.columns[f"{label}_score"] = pa.array(last, mask=~alive)
        out = np.zeros_like(alive)
        out[cand[res.keep]] = True
        self.columns[f"kept_{label}"] = pa.array(out)
        return out

    def _vas_d_state(self, phase: str):
        """The last saved VAS-D round (if resuming) and a function that saves each round."""
        if self.work is None:
            return None, None
        path = self.work.path(phase, "rounds.npz")
        state = None
        if path.exists():
            with np.load(path, allow_pickle=False) as npz:
                state = {k: npz[k] for k in npz.files}

        def save(st: dict) -> None:
            with atomic_path(path, ".npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **st)

        return state, save

    def executor_threads(self) -> int:
        return self.spec.num_workers or default_workers()

    def _rows_per_shard(self, alive: np.ndarray) -> list[np.ndarray]:
        """Shard-local row numbers of the alive pool rows."""
        out = []
        for i, sc in enumerate(self.scans):
            local = np.flatnonzero(alive[self.offsets[i] : self.offsets[i + 1]])
            out.append(sc.rows[local] if sc.rows is not None else local.astype(np.int64))
        return out

    def _scratch_root(self) -> Path | None:
        return None

    def _shard_of(self, uid: np.ndarray) -> Shard:
        hits = np.flatnonzero((self.uids["f0"] == uid["f0"]) & (self.uids["f1"] == uid["f1"]))
        return self.shards[int(np.searchsorted(self.offsets, int(hits[-1]), side="right") - 1)]

    def finish(self, selected: np.ndarray) -> FilterResult:
        spec = self.spec
        self.counts["selected"] = int(selected.sum())
        self.columns["selected"] = pa.array(selected)
        result = FilterResult(sort_uids(self.uids[selected]), self.counts, self.clock.laps, self.thresholds)
        # every output goes to a temp file first; they are renamed together only when all were written
        with contextlib.ExitStack() as outputs:
            if spec.save_scores:
                table = pa.table({"uid": uids_to_hex(self.uids), **self.columns})
                pq.write_table(table, outputs.enter_context(atomic_path(spec.save_scores, ".parquet")))
                result.scores_path = str(spec.save_scores)
            if self.save_path is not None:
                save_subset(outputs.enter_context(atomic_path(self.save_path, ".npy")), result.uids)
                result.save_path = str(self.save_path)
                self.clock.lap("write")
                result.manifest_path = str(_manifest_path(self.save_path))
                save_json(outputs.enter_context(atomic_path(result.manifest_path, ".json")), self._manifest(result))
        return result

    def _manifest(self, result: FilterResult) -> dict:
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
            "output": {"path": result.save_path, "uids": int(len(result.uids)), "scores": result.scores_path},
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
    return out


def _decode_scan(a: dict[str, np.ndarray]):
    from varalign.scores.scan import ShardScan  # noqa: PLC0415

    return ShardScan(a["uids"], {k[4:]: v for k, v in a.items() if k.startswith("col_")}, a.get("rows"))


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


def _manifest_path(save_path: str | os.PathLike) -> Path:
    p = Path(save_path)
    return p.with_name(p.stem + ".manifest.json")


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
