"""`varalign download`: metadata from the Hub, then the images of the pool or of a subset, resumable."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import storage
from ..atomic import save_json
from ..errors import VaralignError
from . import hub, images, outcomes, plan

RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("png", "jpg", "webp")
OUTPUT_FORMATS = ("webdataset", "tfrecord", "parquet", "files")
WORK = ".varalign-download"  # inside data_dir: state, img2dataset inputs and logs
REPORT = "download_report.json"  # beside shards/ (img2dataset reads every *.json inside shards/ as its own)
# settings that decide which shard holds what: a data_dir keeps the ones it was started with
FINGERPRINT = ("verify_hash", "skip_bbox_blurring", "image_size", "resize_mode", "resize_only_if_bigger",
               "encode_format", "output_format", "number_sample_per_shard")


@dataclass
class DownloadOptions:
    """DataComp's download_upstream.py flags (same defaults) and varalign's additions."""

    data_dir: str
    scale: str = "small"
    metadata_dir: str | None = None
    download_npz: bool = False
    skip_shards: bool = False
    overwrite_metadata: bool = False
    skip_bbox_blurring: bool = False
    processes_count: int = 16
    thread_count: int = 128
    image_size: int = 512
    resize_mode: str = "keep_ratio_largest"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    output_format: str = "webdataset"
    retries: int = 2
    enable_wandb: bool = False
    wandb_project: str = "datacomp"
    # varalign's own
    subset: list[str] = field(default_factory=list)
    verify_hash: bool = True
    retry_failed: bool = False
    force: bool = False
    timeout: float = 10.0
    number_sample_per_shard: int = 10000
    quiet: bool = False


@dataclass
class DownloadResult:
    data_dir: Path | str
    metadata: str  # "present" or "downloaded"
    report: dict | None = None  # None with skip_shards
    plan: dict | None = None


def download(opts: DownloadOptions) -> DownloadResult:
    """Fetch the metadata, then (unless `skip_shards`) the images, and write `download_report.json`.

    `data_dir` and `metadata_dir` may be folder URLs: img2dataset then writes the shards there through
    fsspec (each shard file is one object, whole once written), the metadata is read (or fetched from the
    Hub) there, and the work folder (state, img2dataset's input and logs) is on this machine."""
    _validate(opts)
    data_dir = storage.as_path(opts.data_dir)
    meta_dir = storage.as_path(opts.metadata_dir or storage.join(data_dir, "metadata"))
    work = _work_dir(data_dir)
    _prepare_dir(data_dir, work)
    _check_report(storage.join(data_dir, REPORT))
    with _locked(work, data_dir):
        fetched = hub.fetch_metadata(opts.scale, meta_dir, work / "hf", download_npz=opts.download_npz,
                                     overwrite=opts.overwrite_metadata, quiet=opts.quiet)
        _say(opts, f"metadata: {meta_dir} ({'downloaded' if fetched == 'downloaded' else 'already there'})")
        files = plan.metadata_files(meta_dir)
        rows = plan.check_metadata(files, [] if opts.skip_shards else
                                   plan.needed_columns(opts.verify_hash, not opts.skip_bbox_blurring))
        if opts.skip_shards:
            return _metadata_only(opts, data_dir, meta_dir, files, rows, fetched)
        shards = storage.as_path(storage.join(data_dir, "shards"))
        keep = plan.read_subsets(opts.subset) if opts.subset else None
        settings = _claim(work, shards, opts, files, None if keep is None else plan.uid_digest(keep))
        main = _main_plan(opts, work, meta_dir, files, rows, keep)
        save_json(work / "state.json", {"settings": settings, "main_shards": len(main.shard_rows)})
        _run_main(opts, work, shards, main)
        if opts.retry_failed:
            _run_retry(opts, work, shards, main)
        summary = outcomes.summarize(shards, len(main.shard_rows))
        report = _write_report(opts, data_dir, meta_dir, main, summary)
    if not opts.quiet:
        print(outcomes.format_table(summary))
        print(f"report: {storage.join(data_dir, REPORT)}")
    if summary.incomplete:
        raise VaralignError(f"{len(summary.incomplete)} shard(s) did not finish (log: {work}/pass_main.log); "
                            "run the same command again to resume", data_dir)
    return DownloadResult(data_dir, fetched, report, main.to_json())


# -- checks ----------------------------------------------------------------------------------------------
def _validate(opts: DownloadOptions) -> None:
    choices = {"scale": hub.SCALES, "resize_mode": RESIZE_MODES, "encode_format": ENCODE_FORMATS,
               "output_format": OUTPUT_FORMATS}
    for name, allowed in choices.items():
        if getattr(opts, name) not in allowed:
            raise VaralignError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(opts, name)!r}")
    for name in ("processes_count", "thread_count", "image_size", "number_sample_per_shard"):
        if getattr(opts, name) < 1:
            raise VaralignError(f"--{name} must be at least 1")
    if opts.retries < 0 or opts.timeout <= 0:
        raise VaralignError("--retries must be >= 0 and --timeout > 0")
    missing = [m for m in ("huggingface_hub", "img2dataset") if importlib.util.find_spec(m) is None]
    if missing:
        raise VaralignError(f"varalign download needs {' and '.join(missing)}: pip install 'varalign[download]'")
    if opts.skip_shards and (opts.subset or opts.retry_failed):
        flag = "--subset" if opts.subset else "--retry_failed"
        raise VaralignError(f"{flag} is about images; --skip_shards downloads none")


def _work_dir(data_dir: Path | str) -> Path:
    """The work folder: inside a local data_dir; for a data_dir URL, on this machine (named after the URL)."""
    if not storage.is_url(data_dir):
        return data_dir / WORK
    from ..engine.job import default_work_dir  # noqa: PLC0415

    return default_work_dir(storage.join(data_dir, WORK))


def _prepare_dir(data_dir: Path | str, work: Path) -> None:
    if storage.is_url(data_dir):
        storage.check_folder(str(data_dir))  # the bucket is there and we may list it; no object by that name
    elif data_dir.exists() and not data_dir.is_dir():
        raise VaralignError("--data_dir is a file, not a directory", data_dir)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VaralignError(f"cannot create the download directory ({exc.strerror})", data_dir) from None
    if not os.access(work, os.W_OK):
        raise VaralignError("the download directory is not writable", data_dir)


def _check_report(path: Path | str) -> None:
    """A download_report.json that an earlier download wrote is replaced; another file of that name is not."""
    if not storage.exists(path):
        return
    try:
        report = json.loads(storage.read_bytes(path))
    except (OSError, ValueError, UnicodeDecodeError, VaralignError):
        report = None
    if not (isinstance(report, dict) and isinstance(report.get("versions"), dict) and "varalign" in report["versions"]
            and "settings" in report):
        raise VaralignError(f"exists and is not a varalign {REPORT}: not overwritten; move it away or give "
                            "another --data_dir", path)


@contextlib.contextmanager
def _locked(work: Path, data_dir: Path | str) -> Iterator[None]:
    with open(work / "lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise VaralignError("another `varalign download` is running on this directory", data_dir) from None
        pid = images.previous_runner_alive(work)
        if pid is not None:
            raise VaralignError(f"img2dataset processes of an interrupted download are still stopping (process "
                                f"group {pid}); run again in a moment", data_dir)
        yield


def _claim(work: Path, shards: Path | str, opts: DownloadOptions, files: list[Path | str], digest: str | None) -> dict:
    """The settings this data_dir downloads with. Refuses a shards folder varalign did not start, or one
    started with other settings (its shard ids would mean other rows). For a data_dir URL the record is
    on this machine: another machine's download into it is refused as not ours."""
    want = {k: getattr(opts, k) for k in FINGERPRINT}
    want["metadata"] = [[storage.basename(f), storage.info(f)["size"]] for f in files]
    want["subset_uids_sha256"] = digest
    state_path = work / "state.json"
    if state_path.exists():
        have = json.loads(state_path.read_text())["settings"]
        diff = [k for k in want if have.get(k) != want[k]]
        if diff:
            k = diff[0]
            what = "the metadata files" if k == "metadata" else "the subset" if k.startswith("subset") else f"--{k}"
            raise VaralignError(f"this download was started with other settings ({what} changed: "
                                f"{_short(have.get(k))} -> {_short(want[k])}); use another --data_dir",
                                storage.parent(shards))
    elif storage.isdir(shards) and storage.listdir(shards, refresh=True):
        raise VaralignError("shards/ holds files that varalign download did not write; use another --data_dir",
                            shards)
    return want


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_disk(opts: DownloadOptions, data_dir: Path | str, urls: int, est: int) -> None:
    if storage.is_url(data_dir):  # an object store: no free space to compare with
        _say(opts, f"to download: {urls:,} URLs, about {_size(est)} of shards")
        return
    free = shutil.disk_usage(data_dir).free
    _say(opts, f"to download: {urls:,} URLs, about {_size(est)} of shards ({_size(free)} free)")
    if est > free and not opts.force:
        raise VaralignError(f"not enough disk space: about {_size(est)} needed, {_size(free)} free "
                            "(--force to go on anyway)", data_dir)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


# -- the passes --------------------------------------------------------------------------------------------
def _image_settings(opts: DownloadOptions) -> dict:
    return {"image_size": opts.image_size, "resize_mode": opts.resize_mode,
            "resize_only_if_bigger": opts.resize_only_if_bigger, "encode_format": opts.encode_format}


def _main_plan(opts: DownloadOptions, work: Path, meta_dir: Path | str, files: list[Path | str], rows: list[int],
               keep: np.ndarray | None) -> plan.Plan:
    """The first pass's input: the metadata directory itself, or the subset's rows (written once)."""
    nps = opts.number_sample_per_shard
    if keep is None:
        return plan.pool_plan(meta_dir, files, rows, nps, _image_settings(opts))
    saved = work / "subset_plan.json"
    if saved.exists() and (work / "input").is_dir():  # same subset: _claim checked it
        return plan.Plan(**json.loads(saved.read_text()))
    p = plan.write_selection(files, keep, work / "input", nps, _image_settings(opts))
    if p.urls == 0:
        shutil.rmtree(work / "input")
        raise VaralignError(f"none of the subset's {len(keep):,} uids is in the pool ({meta_dir})", ", ".join(opts.subset))
    save_json(saved, p.to_json())
    return p


def _run_main(opts: DownloadOptions, work: Path, shards: Path | str, main: plan.Plan) -> None:
    removed = images.remove_unfinished(shards)
    if removed:
        _say(opts, f"resuming: removed {len(removed)} unfinished shard file(s) of an interrupted run")
    done = set(outcomes.finished_shards(shards)) if storage.isdir(shards) else set()
    pending = {i: n for i, n in enumerate(main.shard_rows) if i not in done}
    if main.subset_uids:
        _say(opts, f"subset: {main.urls:,} of its {main.subset_uids:,} uids are in the pool"
                   + (f" ({main.not_in_pool:,} not in the pool)" if main.not_in_pool else ""))
    if not pending:
        return
    urls = sum(pending.values())
    _check_disk(opts, storage.parent(shards), urls, int(main.est_bytes * urls / max(main.urls, 1)))
    if done:
        _say(opts, f"resuming: {len(done & set(range(len(main.shard_rows)))):,} of {len(main.shard_rows):,} "
                   "shards already finished")
    config = images.img2dataset_config(main.input_dir, shards, _opts_dict(opts), "incremental")
    images.run_pass(config, work, "pass_main", pending, opts.quiet)


def _run_retry(opts: DownloadOptions, work: Path, shards: Path | str, main: plan.Plan) -> None:
    """One more pass over the URLs whose latest attempt failed for a retryable reason, into new shards."""
    images.remove_unfinished(shards)
    summary = outcomes.summarize(shards, len(main.shard_rows))
    if summary.incomplete:
        return
    todo = summary.retryable
    if len(todo) == 0:
        _say(opts, "retry: no URL failed with a retryable status (timeout, HTTP 5xx, connection error)")
        return
    _say(opts, f"retry: {len(todo):,} URLs that failed with a timeout, HTTP 5xx or connection error")
    files = plan.metadata_files(storage.as_path(main.input_dir))
    retry = plan.write_selection(files, todo, work / "retry", opts.number_sample_per_shard, _image_settings(opts))
    _check_disk(opts, storage.parent(shards), retry.urls, retry.est_bytes)
    first = max(outcomes.finished_shards(shards), default=-1) + 1
    config = images.img2dataset_config(retry.input_dir, shards, _opts_dict(opts), "extend")
    try:
        images.run_pass(config, work, "pass_retry", {first + i: n for i, n in enumerate(retry.shard_rows)},
                        opts.quiet)
    finally:
        shutil.rmtree(work / "retry", ignore_errors=True)


def _opts_dict(opts: DownloadOptions) -> dict:
    return asdict(opts)


def _metadata_only(opts: DownloadOptions, data_dir: Path | str, meta_dir: Path | str, files: list[Path | str], rows: list[int],
                   fetched: str) -> DownloadResult:
    p = plan.pool_plan(meta_dir, files, rows, opts.number_sample_per_shard, _image_settings(opts))
    _say(opts, f"--skip_shards: {len(files):,} metadata files, {p.urls:,} URLs; downloading every image would "
               f"take about {_size(p.est_bytes)} (a subset: pass --subset)")
    return DownloadResult(data_dir, fetched, None, p.to_json())


def _write_report(opts: DownloadOptions, data_dir: Path | str, meta_dir: Path | str, main: plan.Plan,
                  summary: outcomes.Summary) -> dict:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    settings = {k: v for k, v in asdict(opts).items() if k not in ("quiet",)}
    settings["metadata_dir"] = str(meta_dir)
    report = {"settings": settings, "verify_hash": opts.verify_hash,
              "versions": {"varalign": ver("varalign"), "img2dataset": ver("img2dataset"),
                           "huggingface_hub": ver("huggingface_hub")},
              "subset": {"files": opts.subset, "uids": main.subset_uids, "in_pool": main.urls,
                         "not_in_pool": main.not_in_pool} if opts.subset else None,
              "estimated_bytes": main.est_bytes,
              **summary.to_json()}
    save_json(storage.join(data_dir, REPORT), report)
    return report


def _say(opts: DownloadOptions, text: str) -> None:
    if not opts.quiet:
        print(f"varalign: download: {text}", file=sys.stderr)


def retryable_uids(data_dir: str | os.PathLike) -> np.ndarray:
    """The uids a `--retry_failed` run would fetch again (for scripts and tests)."""
    work = _work_dir(storage.as_path(data_dir))
    state = json.loads((work / "state.json").read_text())
    return outcomes.summarize(storage.as_path(storage.join(data_dir, "shards")), int(state["main_shards"])).retryable
