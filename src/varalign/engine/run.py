"""The engine: scan → stages → outputs. It names no method: a stage's method prepares a Score (a column
per shard, cut by the stage's fraction or threshold) or a Selector (given a `Context`), and the engine
keeps the pool-wide state in the work directory: each task's result in its own file (what a killed run
resumes from), and this run's arrays (uids, columns, masks, scores, sorted uid runs) one flat file each
(`flat.py`). The driver holds a window of task results and one shard's arrays at a time, plus O(shards)
bookkeeping (offsets: 8 bytes a shard and array), whatever the pool size."""

from __future__ import annotations

import functools
import itertools
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
from ..uids import first_shared, merge_runs, sort_uids
from ..workdir import WorkDir, digest
from .context import Context, Mask, safe
from .flat import Appender, Flat, offsets_of
from .options import run_option
from .plan import file_digest, listing, plain, prepare_stage, recipe_identity, stage_identity

SPAN_ROWS = 1 << 16  # the passes that read a pool-wide array whole read consecutive small shards together
WINDOW_ROWS = 1 << 19  # a window of small shards holds up to this many rows of task results
WINDOW_SHARDS = 256
SAVE_ROWS = 1 << 16  # finished tasks are saved to the work dir in groups of at least this many rows (or
# the window's end): one file for many small shards; a killed run redoes at most a group's tasks


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
        self.flats: dict[str, Flat] = {}  # this run's pool-wide arrays, by name
        self._spans: list[tuple[int, int]] | None = None  # see spans()

    # -- shards through the executor, results in the work directory -------------------------------------
    def window(self) -> int:
        """Tasks handed to the executor at once: 4 per worker, more when shards are small (up to
        WINDOW_ROWS rows), so a pool of many small shards does not pay the executor's start per few rows."""
        workers = max(1, int(getattr(self.executor, "num_workers", 1)))
        rows = max(1, max((s.num_rows for s in self.shards), default=1))
        return max(4 * workers, min(WINDOW_SHARDS, WINDOW_ROWS // rows))

    def map(self, phase: str, fn: Callable[..., Any], tasks: Iterable[tuple[int, tuple]], desc: str,
            on_result: Callable[[int, Any], dict[str, np.ndarray]] | None = None, load: bool = True,
            total: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray] | None]]:
        """Run the tasks not already finished in the work dir, a window at a time; yield every
        `(i, arrays)` in task order (`load=False`: None). `tasks` is consumed a window at a time (a
        task's arguments, e.g. a shard's row numbers, exist only while its window runs), so the
        driver holds a window's tasks and results, never the pool's. `total`: how many tasks (for
        the progress bar; default: one per shard)."""
        tasks = iter(tasks)
        window = self.window()
        done = sum(self.work.has(phase, s.name) for s in self.shards) if not self.quiet else 0
        pending = (len(self.shards) if total is None else total) - done
        with tqdm(total=max(0, pending), desc=desc, unit="shard", disable=self.quiet, leave=False) as bar:
            while part := list(itertools.islice(tasks, window)):
                todo = [(i, args) for i, args in part if not self.work.has(phase, self.shards[i].name)]
                fresh: dict[int, dict] = {}
                unsaved: dict[str, dict] = {}  # finished results of small shards, saved together
                unsaved_rows = [0]

                def finished(j: int, result: Any, todo: list = todo, fresh: dict = fresh,
                             unsaved: dict = unsaved, unsaved_rows: list = unsaved_rows) -> None:
                    i = todo[j][0]
                    arrays = on_result(i, result) if on_result is not None else result
                    unsaved[self.shards[i].name] = arrays
                    unsaved_rows[0] += max(1, self.shards[i].num_rows)
                    if unsaved_rows[0] >= SAVE_ROWS:
                        self.work.save_many(phase, unsaved)
                        unsaved.clear()
                        unsaved_rows[0] = 0
                    fresh[i] = arrays if load else None

                if todo:
                    self.executor.map(fn, [args for _, args in todo], desc, self.quiet, on_result=finished, bar=bar)
                    self.work.save_many(phase, unsaved)
                del todo, unsaved
                for i, _ in part:
                    if i in fresh:
                        yield i, fresh.pop(i)
                    elif load:
                        yield i, self.work.load(phase, self.shards[i].name)
                    else:
                        self.work.reused += 1
                        yield i, None
                del part

    # -- this run's pool-wide arrays (flat files) ---------------------------------------------------------
    def flat_path(self, name: str) -> str:
        return str(self.work.path("_flat", safe(name)))

    def scan_array(self, i: int, key: str) -> np.ndarray:
        """One array (`uids`, `col_<name>`, `rows`, `sorted_uids`) of shard i's scan."""
        return self.flats[f"scan.{key}"].get(i)

    def rows(self, alive: Mask, i: int) -> np.ndarray:
        local = np.flatnonzero(self.mask(alive, i))
        return self.scan_array(i, "rows")[local] if self.given else local.astype(np.int64)

    def pool_rows(self, i: int) -> np.ndarray | None:
        return self.scan_array(i, "rows") if self.given else None

    def mask(self, mask: Mask, i: int) -> np.ndarray:
        if mask.phase is None:
            return np.ones(self.sizes[i], dtype=bool)
        return self.flats[mask.phase].get(i)

    def spans(self) -> list[tuple[int, int]]:
        """The shards in runs of consecutive ones `(a, b)`: shards a .. b-1, up to SPAN_ROWS rows together (a
        larger shard alone). A pass over a pool-wide array reads a span at once: a pool of many small shards
        costs a few reads and array operations per 65,536 rows, not per shard."""
        if self._spans is None:
            out, a, n = [], 0, len(self.shards)
            while a < n:  # b: the last end with offsets[b] - offsets[a] <= SPAN_ROWS, at least one shard on
                b = max(a + 1, int(np.searchsorted(self.offsets, self.offsets[a] + SPAN_ROWS, side="right")) - 1)
                out.append((a, b))
                a = b
            self._spans = out
        return self._spans

    def mask_span(self, mask: Mask, a: int, b: int) -> np.ndarray:
        """The keep mask of shards a .. b-1, one after the other."""
        if mask.phase is None:
            return np.ones(int(self.offsets[b] - self.offsets[a]), dtype=bool)
        return self.flats[mask.phase].span(a, b)

    def phase(self, kind: str, label: str) -> str:
        """A fresh name for this run's own arrays (rewritten by every run)."""
        self.phases += 1
        return f"_{kind}-{self.phases}-{safe(label)}"

    def save_masks(self, label: str, masks: Iterable[np.ndarray]) -> Mask:
        phase = self.phase("keep", label)
        out = Appender(self.flat_path(phase), np.dtype(bool))
        counts = []
        for m in masks:
            out.add(m)
            counts.append(int(np.count_nonzero(m)))
        self.flats[phase] = out.close()
        if len(counts) != len(self.shards):
            raise RuntimeError(f"{label}: {len(counts)} keep masks for {len(self.shards)} shards")
        return Mask(phase, counts)

    def put_array(self, phase: str, i: int, array: np.ndarray) -> None:
        """Keep shard i's array `phase` (one value per row of the shard) for this run."""
        flat = self.flats.get(phase)
        if flat is None or flat.dtype != array.dtype:
            flat = self.flats[phase] = Flat.create(self.flat_path(phase), array.dtype, self.offsets)
        flat.put(i, array)

    def get_array(self, phase: str, i: int) -> np.ndarray:
        return self.flats[phase].get(i)

    def runs(self, name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The merged sorted uid runs in the flat file `name` (one run per part of it: a shard or a span)."""
        flat = self.flats[name]
        return merge_runs([flat.path] * (len(flat.offsets) - 1), np.diff(flat.offsets), starts=flat.offsets[:-1])

    # -- passes -------------------------------------------------------------------------------------------
    def scan(self) -> None:
        """Pass 1: every shard's uids and score columns into the work dir; uids unique across shards."""
        self.scan_phase = f"scan-{self.scan_key}"
        self.sizes = [0] * len(self.shards)
        given = str(self.given) if self.given else None
        tasks = ((i, (s, self.columns_read, given)) for i, s in enumerate(self.shards))
        keys = ["uids", "sorted_uids", *[f"col_{c}" for c in self.columns_read], *(["rows"] if given else [])]
        out = {k: Appender(self.flat_path(f"scan.{k}")) for k in keys}
        for i, arrays in self.map(self.scan_phase, scan_task, tasks, "read parquet"):
            sc = decode_scan(arrays)
            self.sizes[i] = len(sc.uids)
            got = {"uids": sc.uids, "sorted_uids": sc.sorted_uids if sc.sorted_uids is not None else sort_uids(sc.uids),
                   **{f"col_{c}": v for c, v in sc.columns.items()}, **({"rows": sc.rows} if given else {})}
            for k in keys:
                out[k].add(got[k])
            del sc, got, arrays
        self.flats |= {f"scan.{k}": a.close() for k, a in out.items()}
        self.offsets = offsets_of(self.sizes)
        later = first_shared(self.runs("scan.sorted_uids"))  # one run per shard: `later` is a shard
        if later is not None:
            raise VaralignError("duplicate uid across shards (also in an earlier shard)", self.shards[later].parquet)
        self.n_pool = int(sum(self.sizes))
        self.counts["pool"] = self.n_pool
        if self.given and self.n_pool == 0:  # not an error (a subset may miss a pool), but surely worth saying
            print(f"varalign: note: none of the uids in {self.given} is in the pool: the subset is empty",
                  file=sys.stderr)
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
            values, span, dtype = self.values(prep, alive, label, key)
            keeps = self.keep(stage, values, span, dtype, alive.total, label)
            ctx = Context(self, label, key)
            out = self.save_masks(label, (ctx.expand(alive, i, k) for i, k in enumerate(keeps)))
        self.columns[f"kept_{label}"] = lambda i: pa.array(self.mask(out, i))
        return out

    def values(self, prep: Score, alive: Mask, label: str, key: str
               ) -> tuple[Callable[[int], np.ndarray], Callable[[int, int], np.ndarray], np.dtype]:
        """The stage's score of shard i's alive rows (a function of i), the same of shards a .. b-1 one
        after the other (a function of a, b), and its dtype (float32 or bool)."""
        if prep.column is not None:
            col = f"col_{prep.column}"
            scores = self.flats[f"scan.{col}"]
            self.columns[label] = lambda i: pa.array(self.scan_array(i, col))
            if alive.phase is None:  # every row alive
                return scores.get, scores.span, np.dtype(np.float32)
            masks = self.flats[alive.phase]
            return ((lambda i: scores.get(i)[masks.get(i)]), (lambda a, b: scores.span(a, b)[masks.span(a, b)]),
                    np.dtype(np.float32))
        phase = f"{safe(label)}-{key}"
        ran = [i for i in range(len(self.shards)) if alive.counts[i] or prep.every_shard]
        tasks = ((i, (prep.fn, self.shards[i], self.rows(alive, i), prep.kwargs)) for i in ran)
        # each shard's values, in shard order, into one flat file (offsets: the alive counts) as they come
        name = self.phase("values", label)
        out, filled = Appender(self.flat_path(name)), 0
        for i, arrays in self.map(phase, score_task, tasks, label, total=len(ran)):
            while filled < i:  # shards that did not run: no values
                out.skip()
                filled += 1
            v = arrays["values"]
            out.add(v.astype(bool if v.dtype == bool or out.dtype == bool else np.float32, copy=False))
            filled += 1
            del arrays, v
        while filled < len(self.shards):
            out.skip()
            filled += 1
        flat = self.flats[name] = out.close()
        dtype = flat.dtype

        def values(i: int) -> np.ndarray:
            return flat.get(i)

        def column(i: int) -> pa.Array:
            a = self.mask(alive, i)
            full = np.zeros(len(a), dtype=bool) if dtype.kind == "b" else np.full(len(a), np.nan, dtype=np.float32)
            full[a] = values(i)
            return pa.array(full, mask=~a)

        self.columns[label] = column
        return values, flat.span, dtype

    def keep(self, stage: Stage, values: Callable[[int], np.ndarray], span: Callable[[int, int], np.ndarray],
             dtype: np.dtype, n_alive: int, label: str) -> Iterable[np.ndarray]:
        """Per shard, which of its alive rows survive the stage's keep rule."""
        def parts() -> Iterator[np.ndarray]:
            return (values(i) for i in range(len(self.shards)))

        def blocks() -> Iterator[np.ndarray]:  # the same values, consecutive small shards together
            return (span(a, b) for a, b in self.spans())

        if dtype.kind == "b":
            return parts()
        if stage.threshold is not None:
            self.thresholds[label] = float(stage.threshold)
            return (at_least(v, stage.threshold) for v in parts())
        k = count_for_fraction(self.n_pool, stage.fraction)
        if stage.select == "datacomp":
            t = threshold_at_rank_parts(blocks, k)
            self.thresholds[label] = t
            return (at_least(v, t) for v in parts())
        if k > n_alive:
            raise VaralignError(f"stage {label!r} asks for {k} rows (fraction {stage.fraction} of the pool) "
                                f"but only {n_alive} survived the previous stage")
        return top_k_parts(parts, k, blocks)


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
