"""The engine: scan → stages → outputs. It names no method: a stage's method prepares a Score (a column
per shard, cut by the stage's fraction or threshold) or a Selector (given a `Context`), and the engine
keeps the pool-wide state in the work directory, one file per shard and stage, so the driver holds one
shard's arrays at a time (plus O(shards) bookkeeping) whatever the pool size."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from .._version import __version__
from ..backend import check_device
from ..errors import VaralignError
from ..execute import default_workers, make_executor
from ..methods import METHODS
from ..methods.base import RunSettings, Score, Selector
from ..pool import discover_shards, embedding_member
from ..recipe import Recipe, Stage
from ..scan import ShardScan, scan_shard
from ..select import at_least, count_for_fraction, threshold_at_rank_parts, top_k_parts
from ..uids import first_shared, merge_runs, save_run, sort_uids
from ..workdir import WorkDir, digest
from .context import Context, Mask, safe
from .options import run_option
from .plan import file_digest, listing, plain, prepare_stage, recipe_identity, stage_identity


class Run:
    """One filter run over the pool in `metadata_dir` with `recipe` and the `varalign filter` options."""

    def __init__(self, recipe: Recipe, metadata_dir: object, options: dict[str, Any], clock: Any) -> None:
        self.recipe, self.metadata_dir, self.options, self.clock = recipe, metadata_dir, options, clock
        self.quiet = bool(run_option(options, "quiet"))
        self.threads = run_option(options, "num_workers") or default_workers()
        self.executor = make_executor(run_option(options, "executor"), options.get("num_workers"),
                                      options.get("ray_address"))
        self.settings = RunSettings(options.get("files_path"), options.get("cache_path"), run_option(options, "seed"),
                                    check_device(run_option(options, "device")), bool(options.get("download")))
        self.prepared = {id(s): prepare_stage(s, options, self.settings) for s in recipe.all_stages()}
        on_cpu = sorted({s.score for s in recipe.all_stages() if not METHODS[s.score].uses_device
                         and not (isinstance(self.prepared[id(s)], Score) and self.prepared[id(s)].column)})
        if self.settings.device != "cpu" and on_cpu:
            on_device = ", ".join(n for n, m in METHODS.items() if m.uses_device)
            print(f"varalign: note: --device {self.settings.device}: {', '.join(on_cpu)} run(s) on the CPU (the "
                  f"methods that use the device so far: {on_device})", file=sys.stderr)
        need_npz = any(p.members for p in self.prepared.values())
        self.shards = discover_shards(metadata_dir, need_npz=need_npz)
        self.members = {(key, dim): [embedding_member(s, key, dim) for s in self.shards]
                        for p in self.prepared.values() for key, dim in p.members}
        self.given = options.get("given_uids_path")
        self.columns_read = sorted({p.column for p in self.prepared.values() if isinstance(p, Score) and p.column})
        self.listing = listing(self.shards)
        self.scan_key = digest("scan", self.listing, file_digest(self.given) if self.given else None, self.columns_read)
        self.plan = digest(__version__, self.scan_key, recipe_identity(recipe, self.prepared),
                           options.get("save_scores"))
        self.counts: dict[str, int] = {}
        self.thresholds: dict[str, float] = {}
        self.columns: dict[str, Callable[[int], pa.Array]] = {}  # --save_scores columns, built shard by shard
        self.info: dict[str, dict] = {}
        self.work: WorkDir | None = None
        self.temp_dir: str | None = None
        self.phases = 0

    # -- shards through the executor, results in the work directory -------------------------------------
    def map(self, phase: str, fn: Callable[..., Any], tasks: Iterable[tuple[int, tuple]], desc: str,
            on_result: Callable[[int, Any], dict[str, np.ndarray]] | None = None, load: bool = True
            ) -> Iterator[tuple[int, dict[str, np.ndarray] | None]]:
        """Run the tasks not already finished in the work dir, a window at a time (the driver holds a
        window's results, not the pool's); yield every `(i, arrays)` in task order (`load=False`: None)."""
        tasks = list(tasks)
        window = max(1, 4 * int(getattr(self.executor, "num_workers", 1)))
        pending = sum(not self.work.has(phase, self.shards[i].name) for i, _ in tasks)
        with tqdm(total=pending, desc=desc, unit="shard", disable=self.quiet, leave=False) as bar:
            for start in range(0, len(tasks), window):
                part = tasks[start : start + window]
                todo = [(i, args) for i, args in part if not self.work.has(phase, self.shards[i].name)]
                fresh: dict[int, dict] = {}

                def finished(j: int, result: Any, todo: list = todo, fresh: dict = fresh) -> None:
                    i = todo[j][0]
                    arrays = on_result(i, result) if on_result is not None else result
                    self.work.save(phase, self.shards[i].name, arrays)
                    fresh[i] = arrays if load else None

                self.executor.map(fn, [args for _, args in todo], desc, self.quiet, on_result=finished, bar=bar)
                for i, _ in part:
                    if i in fresh:
                        yield i, fresh.pop(i)
                    elif load:
                        yield i, self.work.load(phase, self.shards[i].name)
                    else:
                        self.work.reused += 1
                        yield i, None

    # -- per-shard state in the work dir ------------------------------------------------------------------
    def scan_array(self, i: int, key: str) -> np.ndarray:
        """One array (`uids`, `col_<name>`, `rows`) of shard i's scan."""
        return self.work.read(self.scan_phase, self.shards[i].name, key)

    def rows(self, alive: Mask, i: int) -> np.ndarray:
        local = np.flatnonzero(self.mask(alive, i))
        return self.scan_array(i, "rows")[local] if self.given else local.astype(np.int64)

    def pool_rows(self, i: int) -> np.ndarray | None:
        return self.scan_array(i, "rows") if self.given else None

    def mask(self, mask: Mask, i: int) -> np.ndarray:
        if mask.phase is None:
            return np.ones(self.sizes[i], dtype=bool)
        return self.work.get_array(mask.phase, self.shards[i].name)

    def phase(self, kind: str, label: str) -> str:
        """A fresh work-dir folder for this run's own per-shard arrays (rewritten by every run)."""
        self.phases += 1
        return f"_{kind}-{self.phases}-{safe(label)}"

    def save_masks(self, label: str, masks: Iterable[np.ndarray]) -> Mask:
        phase = self.phase("keep", label)
        counts = []
        for i, m in enumerate(masks):
            self.work.put_array(phase, self.shards[i].name, m)
            counts.append(int(m.sum()))
        return Mask(phase, counts)

    def run_path(self, kind: str, i: int) -> str:
        return str(self.work.path(f"_runs-{kind}", f"{self.shards[i].name}.u8u8"))

    # -- passes -------------------------------------------------------------------------------------------
    def scan(self) -> None:
        """Pass 1: every shard's uids and score columns into the work dir; uids unique across shards."""
        self.scan_phase = f"scan-{self.scan_key}"
        self.sizes = [0] * len(self.shards)
        given = str(self.given) if self.given else None
        tasks = ((i, (s, self.columns_read, given)) for i, s in enumerate(self.shards))
        for i, arrays in self.map(self.scan_phase, scan_task, tasks, "read parquet"):
            sc = decode_scan(arrays)
            self.sizes[i] = len(sc.uids)
            save_run(self.run_path("pool", i), sc.sorted_uids if sc.sorted_uids is not None else sort_uids(sc.uids))
        runs = [self.run_path("pool", i) for i in range(len(self.shards))]
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
            return self.save_masks(prefix + recipe.op, (functools.reduce(combine, [self.mask(m, i) for m in masks])
                                                        for i in range(len(self.shards))))
        for stage in recipe.stages:
            key = digest(key, stage_identity(stage, self.prepared[id(stage)]))
            alive = self.stage(stage, alive, prefix + stage.label, key)
            self.counts[prefix + stage.label] = alive.total
            self.clock.lap(prefix + stage.label)
        return alive

    def stage(self, stage: Stage, alive: Mask, label: str, key: str) -> Mask:
        prep = self.prepared[id(stage)]
        self.info[label] = {"score": stage.score, "params": plain(stage.params), "fraction": stage.fraction,
                            "threshold": stage.threshold, "select": stage.select, **prep.info}
        if isinstance(prep, Selector):
            out = prep.select(Context(self, label, key, self.info[label]), stage, alive)
        else:
            values, dtype = self.values(prep, alive, label, key)
            keeps = self.keep(stage, values, dtype, alive.total, label)
            ctx = Context(self, label, key)
            out = self.save_masks(label, (ctx.expand(alive, i, k) for i, k in enumerate(keeps)))
        self.columns[f"kept_{label}"] = lambda i: pa.array(self.mask(out, i))
        return out

    def values(self, prep: Score, alive: Mask, label: str, key: str) -> tuple[Callable[[int], np.ndarray], np.dtype]:
        """The stage's score of shard i's alive rows (a function of i), and its dtype (float32 or bool)."""
        if prep.column is not None:
            col = f"col_{prep.column}"
            self.columns[label] = lambda i: pa.array(self.scan_array(i, col))
            return (lambda i: self.scan_array(i, col)[self.mask(alive, i)]), np.dtype(np.float32)
        phase = f"{safe(label)}-{key}"
        ran = [i for i in range(len(self.shards)) if alive.counts[i] or prep.every_shard]
        tasks = ((i, (prep.fn, self.shards[i], self.rows(alive, i), prep.kwargs)) for i in ran)
        for _ in self.map(phase, score_task, tasks, label, load=False):
            pass
        first = self.work.read(phase, self.shards[ran[0]].name, "values") if ran else None
        dtype = np.dtype(bool) if first is not None and first.dtype == bool else np.dtype(np.float32)
        has = set(ran)

        def values(i: int) -> np.ndarray:
            if i not in has:
                return np.empty(0, dtype=dtype)
            return self.work.read(phase, self.shards[i].name, "values").astype(dtype, copy=False)

        def column(i: int) -> pa.Array:
            a = self.mask(alive, i)
            full = np.zeros(len(a), dtype=bool) if dtype.kind == "b" else np.full(len(a), np.nan, dtype=np.float32)
            full[a] = values(i)
            return pa.array(full, mask=~a)

        self.columns[label] = column
        return values, dtype

    def keep(self, stage: Stage, values: Callable[[int], np.ndarray], dtype: np.dtype, n_alive: int,
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


# -- tasks (module level: they travel to Ray workers) ----------------------------------------------------
def scan_task(shard: Any, columns: list[str], given: str | None) -> dict[str, np.ndarray]:
    sc = scan_shard(shard, columns, given)
    out = {"uids": sc.uids, **{f"col_{k}": v for k, v in sc.columns.items()}}
    if sc.rows is not None:
        out["rows"] = sc.rows
    if sc.sorted_uids is not None:
        out["sorted_uids"] = sc.sorted_uids
    return out


def decode_scan(a: dict[str, np.ndarray]) -> ShardScan:
    return ShardScan(a["uids"], {k[4:]: v for k, v in a.items() if k.startswith("col_")}, a.get("rows"),
                     a.get("sorted_uids"))


def score_task(fn: Callable[..., np.ndarray], shard: Any, rows: np.ndarray, kwargs: dict) -> dict[str, np.ndarray]:
    return {"values": fn(shard=shard, rows=rows, **kwargs)}
