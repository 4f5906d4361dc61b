"""`filter_pool`: one filter job from options to files. Checks every path, locks the outputs and the work
directory, runs the engine (`run.py`), and writes the subset, the scores and the manifest together."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from .._version import __version__
from ..atomic import OutputGroup, check_output_path, manifest_path
from ..errors import VaralignError
from ..guard import check_paths, lock, lock_file_for, lock_outputs
from ..methods import METHODS, NAMES, recipe_for_name
from ..methods.base import fields_of, flag_name
from ..npz import load_npy
from ..recipe import Recipe, list_presets, load_recipe, validate_recipe
from ..uids import UID_DTYPE, sort_uids, stream_subset, uids_to_hex
from ..workdir import WorkDir, digest, is_ours
from .context import Mask
from .flat import Appender
from .options import FilterOptions, all_fields, check_options, run_option
from .run import Run


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
    up_to_date: bool = False  # the outputs of an earlier run with the same inputs and configuration, verified


def describe_methods() -> dict[str, str]:
    """Every `--name`, every score usable in a recipe stage, and every shipped preset."""
    out = {n: m.description for n, m in NAMES.items()}
    out |= {f"score:{n}": m.description for n, m in METHODS.items()}
    out |= {f"preset:{n}": text for n, text in list_presets().items()}
    return out


def make_recipe(name: str | None, options: dict[str, Any]) -> Recipe:
    """The `--name` preset (or the `--recipe` file) as a recipe; checks the options first."""
    recipe = options.get("recipe")
    if (name is None) == (recipe is None):
        raise VaralignError("give exactly one of --name or --recipe")
    out = load_recipe(recipe) if recipe is not None else recipe_for_name(name, options)
    if recipe is not None:
        _check_recipe_flags(out, options)
    validate_recipe(out, {n for n, m in METHODS.items() if m.keep == "rule"}, set(METHODS),
                    {n for n, m in METHODS.items() if m.keep == "fraction"})
    return out


def _check_recipe_flags(recipe: Recipe, options: dict[str, Any]) -> None:
    """With --recipe, a method flag fills only the stages' parameters the recipe leaves unset (a model path, a
    target): a flag that would change nothing (the recipe sets it in every stage that takes it, or no stage
    takes it, or it is a --name keep flag such as --fraction) is refused rather than silently ignored."""
    keep_flags = ("fraction", "threshold", "fraction_vas", "threshold_vas")
    open_flags: set[str] = set()
    method_flags: set[str] = set()
    for stage in recipe.all_stages():
        method = METHODS.get(stage.score)
        for f, meta in fields_of(method.params) if method is not None else ():
            flag = flag_name(f, meta)
            if flag is not None:
                method_flags.add(flag)
                if f.name not in stage.params:
                    open_flags.add(flag)
    every_method_flag = {flag_name(f, meta) for m in METHODS.values() for f, meta in fields_of(m.params)}
    for flag in sorted(options):
        if options[flag] is None or options[flag] is False:
            continue
        if flag in keep_flags or (flag in every_method_flag and flag not in open_flags):
            where = "the recipe sets it" if flag in method_flags else "no stage of the recipe takes it"
            if flag in keep_flags:
                where = "a recipe's stages set their own fraction or threshold"
            raise VaralignError(f"--{flag} does not apply with --recipe {recipe.name} ({where}): change the "
                                "recipe file, or use --name")


def filter_pool(metadata_dir: str | os.PathLike, save_path: str | os.PathLike | None = None,
                name: str | None = None, **options: Any) -> FilterResult:
    """Select a subset of the DataComp pool in `metadata_dir` and save it as DataComp's subset file.

    `name` is a `--name` method; or pass `recipe=` (a TOML file or preset name). `options` are the
    flags of `varalign filter` as keywords (e.g. `arch="l14", fraction=0.45, fraction_vas=0.3, target=...`).
    Nothing is written unless the whole run succeeds, and then every output appears together (the
    manifest last); a killed run resumes from its work directory; nothing varalign did not write is
    removed or overwritten (`overwrite=True` allows replacing an existing output file).
    """
    options = check_options({k: v for k, v in options.items() if v is not None})
    if options.get("storage_options") is not None:
        storage.configure(options["storage_options"])
    clock = Clock()
    local_options = localized(options)  # inputs given as URLs fetched (the pool itself is streamed)
    recipe = make_recipe(name, local_options)
    options["name"] = local_options["name"] = name
    for out in (save_path, options.get("save_scores")):
        if out is not None:
            check_output_path(out)
    job = Job(Run(recipe, metadata_dir, local_options, clock), save_path, options)
    clock.lap("validate")
    job.check_paths()
    with lock_outputs(job.group.all_paths()), job.work_dir_lock():
        job.group.recover()
        done = job.up_to_date()
        if done is not None:
            job.drop_stale_work_dir()  # e.g. left by a run killed after its last rename
            return done
        job.group.check_overwrite()
        job.open_work_dir()
        try:
            with job.group.writing():
                job.run.scan()
                selected = job.run.evaluate(recipe, Mask(None, list(job.run.sizes)), prefix="", key=job.run.scan_key)
                result = job.finish(selected)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the finished tasks, to resume
            job.remove_temp_dir()
            raise
        except BaseException:  # bad input or an I/O fault: leave nothing behind (unless --keep_work_dir)
            job.discard_work_dir()
            raise
        job.remove_temp_dir()
        job.close_work_dir()
    return result


class Job:
    """The files around one run: inputs, outputs, the work directory, the manifest."""

    def __init__(self, run: Run, save_path: object, options: dict[str, Any]) -> None:
        self.run, self.save_path = run, save_path
        self.options = options  # as given (URLs kept), for the manifest
        self.keep_work_dir = bool(self.options.get("keep_work_dir"))
        scores = self.options.get("save_scores")
        self.outputs = [p if storage.is_url(p) else Path(p) for p in (save_path, scores) if p is not None]
        manifest = manifest_path(save_path if save_path is not None else scores) if self.outputs else None
        self.group = OutputGroup(self.outputs, manifest, overwrite=bool(self.options.get("overwrite")))
        work = self.options.get("work_dir")
        if work and storage.is_url(work):
            raise VaralignError("--work_dir must be a local folder (it holds resumable per-shard results)", work)
        self.work_root = Path(work) if work else (default_work_dir(save_path) if save_path is not None else None)

    # -- paths and locks ------------------------------------------------------------------------------------
    def input_paths(self) -> dict[str, object]:
        """Every file and folder this run reads, by flag."""
        o = self.options
        found: dict[str, object] = {"--metadata_dir": str(self.run.metadata_dir),
                                    "a pool shard": [f for s in self.run.shards for f in (s.parquet, s.npz) if f],
                                    "--given_uids_path": o.get("given_uids_path"),
                                    "--recipe": o["recipe"] if o.get("recipe") and os.path.exists(o["recipe"]) else None}
        for key, meta in all_fields().items():
            if meta["path"] and isinstance(o.get(key), str):
                found[f"--{key}"] = o[key]
        for p in self.run.prepared.values():  # what the methods resolved (e.g. --target_variance_name's file)
            found |= {f"the {p.__class__.__name__} input {i}": f for i, f in enumerate(p.inputs) if os.path.isfile(f)}
            for k, v in p.info.items():
                if isinstance(v, str) and len(v) < 4096 and os.path.isfile(v):
                    found[f"the {k} file"] = v
        return found

    def check_paths(self) -> None:
        """No output is an input or another output; the work directory holds neither."""
        outs = {"--save_path": self.save_path, "--save_scores": self.options.get("save_scores")}
        if self.group.outputs:
            outs["the manifest"] = str(self.group.manifest)
        check_paths(self.input_paths(), outs, self.work_root, pool_dirs=[self.run.metadata_dir])

    @contextlib.contextmanager
    def work_dir_lock(self) -> Iterator[None]:
        if self.work_root is None:
            yield
            return
        self.work_root.absolute().parent.mkdir(parents=True, exist_ok=True)
        with lock(lock_file_for(self.work_root.absolute()), f"the work directory {self.work_root}"):
            yield

    # -- the work directory -----------------------------------------------------------------------------------
    def open_work_dir(self) -> None:
        """The user's (or the default) work dir; a temporary one, removed at the end, when there is none."""
        root = self.work_root
        if root is None:
            self.run.temp_dir = tempfile.mkdtemp(prefix="varalign-work-")
            root = Path(self.run.temp_dir) / "work"
        self.run.work = WorkDir(root, self.run.plan)

    def drop_stale_work_dir(self) -> None:
        root = self.work_root
        if root is not None and not self.keep_work_dir and root.is_dir() and is_ours(root):
            WorkDir(root, self.run.plan).remove()

    def discard_work_dir(self) -> None:
        """After an error: remove the work dir (only if it is varalign's), unless --keep_work_dir."""
        self.remove_temp_dir()
        work = self.run.work
        if work is not None and not self.keep_work_dir and is_ours(work.root):
            with contextlib.suppress(OSError, VaralignError):
                work.remove()

    def close_work_dir(self) -> None:
        if self.run.work is not None and not self.keep_work_dir:
            self.run.work.remove()

    def remove_temp_dir(self) -> None:
        # the pool-wide arrays' files are closed first: held open (e.g. by a reference cycle), a removed
        # file's disk space would stay allocated until the process ends
        for flat in self.run.flats.values():
            flat.close()
        if self.run.temp_dir is not None:
            shutil.rmtree(self.run.temp_dir, ignore_errors=True)
            self.run.temp_dir = None

    # -- outputs --------------------------------------------------------------------------------------------
    def up_to_date(self) -> FilterResult | None:
        """The previous result, if its outputs are there, unchanged (sizes and SHA-256 as the manifest
        records them), and were made from the same inputs and configuration."""
        if self.save_path is None:
            return None
        manifest = self.group.up_to_date(self.run.plan)
        if manifest is None:
            return None
        if not self.run.quiet:
            print(f"varalign: {self.save_path} is up to date (same inputs and configuration, output verified); "
                  "nothing to do", file=sys.stderr)
        return FilterResult(open_subset(self.save_path), manifest["counts"], {"total": 0.0},
                            manifest.get("thresholds", {}), str(self.save_path), str(self.group.manifest),
                            self.options.get("save_scores"), up_to_date=True)

    def finish(self, selected: Mask) -> FilterResult:
        run = self.run
        run.counts["selected"] = selected.total
        run.columns["selected"] = lambda i: pa.array(run.mask(selected, i))
        # the selection of each span of shards (one shard, or consecutive small ones), sorted: runs to merge
        runs, uids = Appender(run.flat_path("selected.sorted_uids"), UID_DTYPE), run.flats["scan.uids"]
        for a, b in run.spans():
            runs.add(sort_uids(uids.span(a, b)[run.mask_span(selected, a, b)]))
        run.flats["selected"] = runs.close()
        result = FilterResult(np.empty(0, dtype=UID_DTYPE), run.counts, run.clock.laps, run.thresholds)
        # every output goes to a temp file first; they are renamed together only when all were written,
        # the manifest (with each output's size and SHA-256) last
        scores = self.options.get("save_scores")
        if scores:
            with self.group.write(scores) as tmp:
                self.write_scores(tmp)
            result.scores_path = str(scores)
        if self.save_path is not None:
            with self.group.write(self.save_path) as tmp:
                stream_subset(tmp, selected.total, (b for b, _ in run.runs("selected")))
            result.save_path = str(self.save_path)
            run.clock.lap("write")
        if self.group.outputs:
            result.manifest_path = str(self.group.manifest)
            self.group.commit(self.manifest(result, selected.total))
        if self.save_path is not None:
            result.uids = open_subset(self.save_path)  # the saved file, mapped: not a copy in RAM
        else:
            batches = [b for b, _ in run.runs("selected")]  # the result in memory: no file
            result.uids = np.concatenate(batches) if batches else np.empty(0, dtype=UID_DTYPE)
        return result

    def write_scores(self, path: Path) -> None:
        """The --save_scores parquet, one row group per shard: uid, then every stage's columns."""
        run, writer = self.run, None
        try:
            for i in range(len(run.shards)):
                cols = {"uid": uids_to_hex(run.scan_array(i, "uids"))} | {k: f(i) for k, f in run.columns.items()}
                table = pa.table(cols)
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table, row_group_size=max(1, table.num_rows))
        finally:
            if writer is not None:
                writer.close()

    def manifest(self, result: FilterResult, n_uids: int) -> dict:
        run = self.run
        options = {f: run_option(self.options, f) for f in FilterOptions.__dataclass_fields__} | self.options
        return {
            "tool": "varalign filter",
            "varalign_version": __version__,
            "command": sys.argv if Path(sys.argv[0]).name.startswith("varalign") else None,
            "plan": run.plan,
            "recipe": run.recipe.name,
            "options": options,
            "stages": run.info,
            "inputs": {
                "metadata_dir": str(run.metadata_dir),
                "shards": len(run.shards),
                "rows": int(sum(s.num_rows for s in run.shards)),
                "shard_listing_sha256": digest(run.listing),
                "given_uids_path": self.options.get("given_uids_path"),
                **({"objects": run.listing} if storage.is_url(run.metadata_dir) else {}),  # name, size, ETag
            },
            "output": {"path": result.save_path, "uids": n_uids, "scores": result.scores_path},
            "counts": result.counts,
            "thresholds": result.thresholds,
            "executor": run.executor.name,
            "resumed_tasks": run.work.reused if run.work else 0,
            "timings_s": {k: round(v, 3) for k, v in run.clock.laps.items()},
            "versions": versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def open_subset(path: str | os.PathLike) -> np.ndarray:
    """A subset file this tool wrote (sorted, unique), memory-mapped copy-on-write (read whole from a URL)."""
    if storage.is_url(path):
        with storage.open_read(path) as fh:
            return load_npy(fh)
    return load_npy(path, mmap_mode="c")


def default_work_dir(save_path: str | os.PathLike) -> Path:
    """`.{stem}.varalign-work` beside a local output; for an output URL, a folder of this machine's
    cache named after the URL (so a killed run resumes from the same place)."""
    if storage.is_url(save_path):
        import hashlib  # noqa: PLC0415

        return storage.cache_dir("work", hashlib.sha256(str(save_path).encode()).hexdigest()[:24])
    p = Path(save_path)
    return p.with_name(f".{p.stem}.varalign-work")


def localized(options: dict[str, Any]) -> dict[str, Any]:
    """The options with every input file given as a URL replaced by a local copy (targets, subsets,
    centroids are small next to a pool; the pool itself is streamed from its URL, never copied)."""
    out = dict(options)
    for key, meta in all_fields().items():
        if meta["path"] and isinstance(out.get(key), str):
            out[key] = storage.localize(out[key])
    return out


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    out = {"python": sys.version.split()[0]}
    for dist in ("numpy", "pyarrow", "zlib-ng", "tqdm", "torch", "fasttext-predict", "faiss-cpu"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


class Clock:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.laps["total"] = now - self.t0
        self.last = now
