"""DataComp-compatible resharder: input webdataset shards + subset file -> output shards of the subset.

Two streaming passes, each mapped over shards through the executor (`execute.py`: local processes,
since writing a tar holds the GIL; or Ray tasks):
1. index: each input tar is scanned (headers + `.json` members only), its uids looked up in the
   sorted subset (`np.searchsorted`), and the byte ranges of the matching samples saved as that
   shard's task result in the work directory `{output_dir}/.reshard-work` (`workdir.WorkDir`: a run
   interrupted by Ctrl-C or killed keeps it, and the same command run again resumes: it reuses the
   shards indexed; removed at the end otherwise);
2. write: output shard `o` holds global positions `[o*S, (o+1)*S)` of the matched sequence (input
   shards in name order, samples in tar order, a uid repeated k times in the subset written k times
   with keys `{uid}-{j}`), copied by seek + read from the input tars into an atomically renamed tar.
The output is deterministic and independent of the number of workers.

Input shards, the subset file and the output folder may be URLs (`storage.py`). An input tar is streamed
(the index pass reads it once in large blocks; the write pass fetches only the matched samples' byte
ranges); the subset file is fetched once. To an output URL, every shard is written to a local temp file
and uploaded in one put under the folder's staging prefix; when all are there they are copied onto their
names (server-side, one object at a time: an object store has no rename of many objects at once), then
`sample_ids.npy`, then `meta.json`, the commit point: a run killed before the copies leaves no shard under
its final name, one killed during them leaves some, beside the in-progress marker and without `meta.json`
(a folder is a finished output only when `meta.json` is there; `--overwrite` then replaces it). The work
directory is then on this machine (`~/.cache/varalign/work/`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import string
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import storage
from ..atomic import atomic_path, save_json, save_npy
from ..errors import VaralignError
from ..execute import make_executor
from ..guard import check_paths, lock, lock_file_for
from ..npz import load_npy, load_npz
from ..uids import UID_DTYPE, hex_to_uids, load_subset_counts, sort_uids, uids_to_hex
from ..workdir import WorkDir, digest, is_ours
from .wds import add_bytes, ends_whole, iter_samples, open_tar, read_json, read_member, sample_uid

WORK_DIR = ".reshard-work"
STAGING = ".reshard-staging"  # in an output URL: shards uploaded here, moved onto their names at the end


@dataclass
class ReshardResult:
    """Counters of one reshard run (also written to `meta.json`)."""

    output_dir: str
    input_shard_count: int = 0
    input_samples: int = 0
    subset_size: int = 0
    subset_unique: int = 0
    found_unique: int = 0
    not_found: int = 0
    output_samples: int = 0
    output_shard_count: int = 0
    output_shard_format: str = "{:08d}.tar"
    failed_shards: list[str] = field(default_factory=list)
    seconds: float = 0.0


def reshard(input_dir: str | os.PathLike, output_dir: str | os.PathLike, subset_file: str | os.PathLike, *,
            num_shards: int | None = None, first_shard: int = 0, num_workers: int | None = None,
            shard_size: int = 10_000, shard_format: str = "{:08d}.tar",
            output_shard_format: str = "{:08d}.tar", output_shard_stats_format: str = "{:08d}_stats.json",
            overwrite: bool = False, dry_run: bool = False, quiet: bool = False, executor: str = "local",
            ray_address: str | None = None) -> ReshardResult:
    """Write the samples of `input_dir` whose uid is in `subset_file` as new shards in `output_dir`.

    Refuses a non-empty `output_dir` that holds no reshard of its own; resumes an unfinished one there (its
    marker, no `meta.json`); replaces a finished one only with `overwrite` (which deletes only the shards and
    stats its `meta.json` counts, `meta.json` and `sample_ids.npy`); refuses an
    output directory that is, or holds, the input or the subset file. Writes `meta.json` (arguments + counters) and
    `sample_ids.npy` (the subset file). Subset uids absent from the input are counted in `not_found`.
    `executor`: `local` (`num_workers` processes) or `ray` (Ray tasks: the subset and each shard's index
    travel through Ray, so a cluster without a shared filesystem works when the input and output are URLs;
    a local input or output folder must be seen by every node at the same path).
    """
    out = storage.as_path(output_dir)
    with contextlib.ExitStack() as stack:
        if not dry_run:  # a second reshard into the same folder is refused (naming this one's pid)
            if not storage.is_url(out):
                out.absolute().parent.mkdir(parents=True, exist_ok=True)
                out = out.absolute()
            stack.enter_context(lock(lock_file_for(out), f"the output directory {output_dir}"))
        return _reshard(input_dir, output_dir, subset_file, num_shards=num_shards, first_shard=first_shard,
                        num_workers=num_workers, shard_size=shard_size, shard_format=shard_format,
                        output_shard_format=output_shard_format, output_shard_stats_format=output_shard_stats_format,
                        overwrite=overwrite, dry_run=dry_run, quiet=quiet, executor=executor,
                        ray_address=ray_address)


def _reshard(input_dir: str | os.PathLike, output_dir: str | os.PathLike, subset_file: str | os.PathLike, *,
             num_shards: int | None, first_shard: int, num_workers: int | None, shard_size: int, shard_format: str,
             output_shard_format: str, output_shard_stats_format: str, overwrite: bool, dry_run: bool,
             quiet: bool, executor: str, ray_address: str | None) -> ReshardResult:
    start = time.time()
    if shard_size < 1:
        raise VaralignError(f"--shard-size must be >= 1, got {shard_size}")
    inputs = _input_shards(storage.as_path(input_dir), num_shards, first_shard, shard_format, quiet)
    local_subset = storage.localize(str(subset_file))
    unique, counts = load_subset_counts(local_subset)
    out = storage.as_path(output_dir)
    remote = storage.is_url(out)
    if not dry_run:
        _prepare_output(out, overwrite, input_dir, subset_file, output_shard_format, output_shard_stats_format)
    root = _work_root(out) if not dry_run else \
        Path(os.environ.get("TMPDIR", "/tmp")) / f"varalign-reshard-{os.getpid()}"
    stamps = [_stamp(p) for p in inputs]
    work = WorkDir(root, digest("reshard", stamps, _stamp(subset_file)))
    workers = max(1, num_workers or os.cpu_count() or 1)
    # processes, not threads: tarfile builds each member's header in Python, so writing holds the GIL
    runner = make_executor(executor, workers, ray_address, processes=True)
    result = ReshardResult(str(out), input_shard_count=len(inputs), subset_size=int(counts.sum()),
                           subset_unique=len(unique), output_shard_format=output_shard_format)
    try:
        work.put_array("subset", "unique", unique)
        work.put_array("subset", "counts", counts)
        index = _run_index(inputs, work, runner, quiet, unique, counts)
        result.input_samples = sum(r["samples"] for r in index)
        result.failed_shards = [f"{r['path']}: {r['error']}" for r in index if r["error"]]
        for msg in result.failed_shards:
            _warn(f"warning: {msg} (samples after the error skipped)", quiet=False)
        copies = np.array([r["copies"] for r in index], dtype=np.int64)
        result.output_samples = int(copies.sum())
        result.found_unique = _count_found(index)
        result.not_found = result.subset_unique - result.found_unique
        result.output_shard_count = -(-result.output_samples // shard_size)
        if not dry_run:
            _write_marker(out, {"output_shard_format": output_shard_format,
                                "output_shard_stats_format": output_shard_stats_format,
                                "output_shard_count": result.output_shard_count})
            names = [f(o) for o in range(result.output_shard_count)
                     for f in (output_shard_format.format, output_shard_stats_format.format)]
            staged = storage.join(out, STAGING) if remote else out
            _run_write(index, copies, staged, shard_size, output_shard_format, output_shard_stats_format,
                       result.output_shard_count, runner, quiet)
            for p, before in zip(inputs, stamps, strict=True):  # the write pass read byte ranges indexed before
                if _stamp(p) != before:
                    raise VaralignError("input shard changed during the run (size, modification time or ETag); "
                                        "no meta.json written: run again", p)
            if remote:  # every shard is there: onto their names together, then the staging prefix goes
                storage.move([storage.join(staged, n) for n in names], [storage.join(out, n) for n in names])
                storage.remove_tree(staged)
            save_npy(storage.join(out, "sample_ids.npy"), load_npy(local_subset)
                     if _is_npy(local_subset) else np.fromfile(local_subset, dtype=UID_DTYPE))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the shards indexed are kept for the next run
        if dry_run:
            work.remove()
        raise
    except BaseException:
        with contextlib.suppress(OSError, VaralignError):
            work.remove()
        raise
    work.remove()
    result.seconds = round(time.time() - start, 3)
    if not dry_run:
        meta = {"args": {"input_dir": str(input_dir), "output_dir": str(output_dir), "subset_file": str(subset_file),
                         "num_shards": num_shards, "first_shard": first_shard, "num_workers": workers,
                         "shard_size": shard_size, "shard_format": shard_format,
                         "output_shard_format": output_shard_format,
                         "output_shard_stats_format": output_shard_stats_format},
                **asdict(result)}
        save_json(storage.join(out, "meta.json"), meta)
        # meta.json now proves the folder is a reshard output
        if remote:
            storage.remove(storage.join(out, MARKER))
        else:
            (out / MARKER).unlink(missing_ok=True)
    if result.not_found:
        _warn(f"{result.not_found:,} uids in the subset were not found in the input", quiet)
    return result


def _stamp(path: Path | str) -> tuple:
    """A file's identity for the work directory's plan: path, size, modification time (an object: its ETag)."""
    if storage.is_url(path):
        meta = storage.info(path)
        return str(path), meta["size"], meta.get("etag") or meta.get("last_modified") or meta.get("mtime") or ""
    path = Path(path)
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _work_root(out: Path | str) -> Path:
    """The work directory: inside a local output folder; for an output URL, on this machine."""
    if not storage.is_url(out):
        return Path(out) / WORK_DIR
    from ..engine.job import default_work_dir  # noqa: PLC0415

    return default_work_dir(storage.join(out, WORK_DIR))


def _input_shards(root: Path | str, num_shards: int | None, first: int, fmt: str,
                  quiet: bool) -> list[Path | str]:
    if not storage.isdir(root):
        raise VaralignError("input directory not found", root)
    if num_shards is None:
        shards = [storage.as_path(storage.join(root, n)) for n in sorted(storage.listdir(root))
                  if n.endswith(".tar") and not n.startswith(".")]
    else:
        shards = []
        for i in range(first, first + num_shards):
            path = storage.as_path(storage.join(root, fmt.format(i)))
            if storage.exists(path):
                shards.append(path)
            else:
                _warn(f"warning: input shard {path} not found, skipped", quiet)
    if not shards:
        raise VaralignError("no .tar shards in input directory", root)
    return shards


MARKER = ".varalign-reshard"


def _prepare_output(out: Path | str, overwrite: bool, input_dir: object, subset_file: object,
                    output_shard_format: str, output_shard_stats_format: str) -> None:
    """A new or empty folder; one an unfinished reshard left (its marker, no meta.json: the run resumes); or,
    with `overwrite`, one that a finished reshard wrote (meta.json). Only the files that reshard wrote are
    removed (the shards its meta.json or marker counts, meta.json, sample_ids.npy); nothing else is touched."""
    check_paths({"--input_dir": str(input_dir), "--subset_file": str(subset_file)}, {},
                work_dir=out, dir_label="output directory")
    remote = storage.is_url(out)
    if remote:
        names = storage.check_folder(str(out))
    else:
        if out.exists() and not out.is_dir():
            raise VaralignError("output path exists and is not a directory", out)
        names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names:
        meta, marker = _reshard_meta(out), _read_marker_file(out)
        if meta is None and marker is None:
            raise VaralignError("output directory is not empty and holds no varalign reshard output: not touched; "
                                "give an empty or new folder", out)
        if meta is not None and not overwrite:
            raise VaralignError("output directory holds a finished reshard (meta.json): pass --overwrite to replace "
                                "its shards", out)
        if not remote and WORK_DIR in names and not is_ours(out / WORK_DIR):
            raise VaralignError(f"{WORK_DIR} in the output directory was not created by varalign: not touched; "
                                "move it away or give another folder", out / WORK_DIR)
        if meta is None and not isinstance(marker.get("output_shard_count"), int):
            stray = sorted(n for n in names if _shard_name_pattern(marker).fullmatch(n))
            if stray:  # an older varalign marked the run before counting: which shards are its own is unknown
                raise VaralignError(f"an unfinished reshard that did not record its shard count left {len(stray)} "
                                    f"shard-named file(s) here (first: {stray[0]}): not touched; remove them or "
                                    "give another folder", out)
        for name in sorted(set(names) & _own_names(meta if meta is not None else marker)):
            if remote:
                storage.remove(storage.join(out, name))
            else:
                (out / name).unlink()
        if remote and STAGING in names:  # a killed run's uploads
            storage.remove_tree(storage.join(out, STAGING))
    if not remote:
        out.mkdir(parents=True, exist_ok=True)
    _write_marker(out, {"output_shard_format": output_shard_format,
                        "output_shard_stats_format": output_shard_stats_format})


def _own_names(record: dict) -> set[str]:
    """The files a reshard wrote, from its meta.json or marker: `output_shard_count` shards (and their stats)
    in its formats, sample_ids.npy and meta.json. A marker written before the shards were counted: none."""
    count = record.get("output_shard_count")
    formats = {record.get("output_shard_format"),
               (record.get("args") or {}).get("output_shard_stats_format") or record.get("output_shard_stats_format")}
    names = {"meta.json", "sample_ids.npy"}
    if isinstance(count, int) and count >= 0:
        names |= {f.format(i) for f in formats if isinstance(f, str) for i in range(count)}
    return names


def _shard_name_pattern(record: dict) -> re.Pattern:
    """The names the record's shard and stats formats give (each `{...}` field: digits)."""
    alts = []
    for fmt in (record.get("output_shard_format"), record.get("output_shard_stats_format")):
        if isinstance(fmt, str):
            try:
                parts = list(string.Formatter().parse(fmt))
            except ValueError:
                continue
            alts.append("".join(re.escape(text) + (r"\d+" if field is not None else "")
                                for text, field, _, _ in parts))
    return re.compile("|".join(f"(?:{a})" for a in alts) or r"(?!)")


def _write_marker(out: Path | str, record: dict) -> None:
    """The in-progress marker: what this run will write (the shard count once the index pass knows it), so that
    the next run removes exactly that if this one is cut short."""
    save_json(storage.join(out, MARKER), {"tool": "varalign reshard", "pid": os.getpid()} | record)


def _read_marker_file(out: Path | str) -> dict | None:
    record = _json_in(out, MARKER)
    return record if isinstance(record, dict) and record.get("tool") == "varalign reshard" else None


def _reshard_meta(out: Path | str) -> dict | None:
    meta = _json_in(out, "meta.json")
    return meta if isinstance(meta, dict) and "output_shard_count" in meta and "args" in meta else None


def _json_in(out: Path | str, name: str) -> object:
    """The JSON file `name` in the output folder (local or URL), or None when it is missing or unreadable."""
    try:
        return json.loads(storage.read_bytes(storage.join(out, name)))
    except (OSError, ValueError, UnicodeDecodeError, VaralignError):
        return None


def _is_npy(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(6) == b"\x93NUMPY"


# ---- pass 1: index -------------------------------------------------------------------------------

def _index_shard(i: int, path: str, subset: str | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Scan one input tar: the byte ranges of its subset samples, and its counters (`info`, JSON).
    `subset`: the work directory's folder of the sorted unique uids and their counts, or those arrays."""
    if isinstance(subset, str):  # mapped: cheap per task and per process
        unique = load_npy(Path(subset) / "unique.npy", mmap_mode="r")
        counts = load_npy(Path(subset) / "counts.npy", mmap_mode="r")
    else:
        unique, counts = subset["unique"], subset["counts"]
    keys, uid_strs, members, error = [], [], [], None
    name = os.path.basename(path)
    try:
        with open_tar(path) as tf:
            for sample in iter_samples(tf):
                meta = read_json(read_member(tf, sample.members["json"])) if "json" in sample.members else {}
                keys.append(sample.key)
                uid_strs.append(sample_uid(sample.key, name, meta))
                members.append([(ext, info.offset_data, info.size) for ext, info in sample.members.items()])
            if not ends_whole(tf):
                error = "truncated: no end-of-archive blocks after its last member (the samples after it are lost)"
    except (tarfile.TarError, OSError, EOFError, VaralignError) as exc:
        error = " ".join(str(exc).split())[:200]
    uids = hex_to_uids(uid_strs, source=path)
    if len(unique) and len(uids):
        pos = np.searchsorted(unique, uids)
        pos_c = np.minimum(pos, len(unique) - 1)
        hit = (pos < len(unique)) & (unique[pos_c]["f0"] == uids["f0"]) & (unique[pos_c]["f1"] == uids["f1"])
    else:
        pos_c, hit = np.zeros(len(uids), dtype=np.int64), np.zeros(len(uids), dtype=bool)
    rows = np.flatnonzero(hit)
    copies = np.asarray(counts)[pos_c[rows]].astype(np.int64) if len(rows) else np.zeros(0, dtype=np.int64)
    ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    ext, off, size = [], [], []
    for j, r in enumerate(rows):
        for e, o, s in members[r]:
            ext.append(e)
            off.append(o)
            size.append(s)
        ptr[j + 1] = len(ext)
    info = {"i": i, "path": path, "samples": len(uids), "matched": len(rows), "copies": int(copies.sum()),
            "error": error}
    return {"uids": uids[rows], "copies": copies, "ptr": ptr, "ext": np.array(ext, dtype=str),
            "offset": np.array(off, dtype=np.int64), "size": np.array(size, dtype=np.int64),
            "info": np.array(json.dumps(info))}


def _run_index(inputs: list[Path], work: WorkDir, runner, quiet: bool, unique: np.ndarray,
               counts: np.ndarray) -> list[dict]:
    """Index every input shard (those a Ctrl-C'd run finished are reused); their counters, in input order.
    On an executor without a shared filesystem (Ray) the subset travels through Ray's object store, not
    as a path of the driver's work directory."""
    subset: str | object = str(work.path("subset"))
    todo = [i for i in range(len(inputs)) if not work.has("index", str(i))]
    if todo and not runner.shared_filesystem:
        subset = runner.put({"unique": unique, "counts": counts})
    todo = [(i, str(inputs[i]), subset) for i in todo]
    with tqdm(total=len(inputs), initial=len(inputs) - len(todo), desc="reshard: index", unit="shard",
              disable=quiet) as bar:
        runner.map(_index_shard, todo, "reshard: index", quiet=True,
                   on_result=lambda k, arrays: (work.save("index", str(todo[k][0]), arrays), bar.update()))
    results = []
    for i in range(len(inputs)):
        info = json.loads(str(work.read("index", str(i), "info")))
        results.append({**info, "index": str(work.path("index", f"{i}.npz"))})
    return results


def _count_found(index: list[dict]) -> int:
    found = [load_npz(r["index"], ["uids"])["uids"] for r in index]
    if not found:
        return 0
    allu = sort_uids(np.concatenate(found))
    if len(allu) == 0:
        return 0
    new = np.ones(len(allu), dtype=bool)
    new[1:] = (allu["f0"][1:] != allu["f0"][:-1]) | (allu["f1"][1:] != allu["f1"][:-1])
    return int(new.sum())


# ---- pass 2: write -------------------------------------------------------------------------------

def _write_shard(job: tuple) -> int:  # a module-level function: it runs in another process
    """Write output shard `o` = positions [lo, hi) of the matched sequence."""
    o, lo, hi, pieces, out_tar, out_stats = job
    written = 0
    with atomic_path(out_tar, ".tar") as tmp, tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tf:
        for path, index, first, last in pieces:  # positions [first, last) within this input shard
            # the index: a file of the driver's work directory, or (no shared filesystem) its arrays
            members = _piece_members(load_npz(index) if isinstance(index, str) else index, first, last)
            # a local tar by seek + read; a URL by ranged requests covering neighbouring samples
            data = storage.read_ranges(path, [(off, size) for _, off, size in members])
            for (name, _, _), blob in zip(members, data, strict=True):
                add_bytes(tf, name, blob)
            written += last - first
    stats = {"count": written, "successes": written, "failed_to_download": 0, "failed_to_resize": 0,
             "input_shards": sorted({p[0] for p in pieces}), "status": "success"}
    save_json(out_stats, stats)
    return written


def _piece_members(idx, first: int, last: int) -> list[tuple[str, int, int]]:
    """(member name, offset, size) of positions [first, last) of one input shard's matched samples."""
    cum = np.concatenate([[0], np.cumsum(idx["copies"])])
    hex_uids = uids_to_hex(idx["uids"]).to_pylist()
    out = []
    s = int(np.searchsorted(cum, first, side="right") - 1)
    for pos in range(first, last):
        while pos - int(cum[s]) >= int(idx["copies"][s]):
            s += 1
        j, n_copies = pos - int(cum[s]), int(idx["copies"][s])
        key = hex_uids[s] if n_copies == 1 else f"{hex_uids[s]}-{j}"
        out += [(f"{key}.{idx['ext'][m]}", int(idx["offset"][m]), int(idx["size"][m]))
                for m in range(int(idx["ptr"][s]), int(idx["ptr"][s + 1]))]
    return out


def _run_write(index: list[dict], copies: np.ndarray, out: Path | str, shard_size: int, fmt: str, stats_fmt: str,
               n_out: int, runner, quiet: bool) -> None:
    starts = np.concatenate([[0], np.cumsum(copies)])
    jobs = []
    shared = runner.shared_filesystem
    loaded: list = [-1, None, None]  # the input index last read, its copies' cumsum (outputs take consecutive inputs)
    for o in range(n_out):
        lo, hi = o * shard_size, min((o + 1) * shard_size, int(starts[-1]))
        pieces = []
        for k, r in enumerate(index):
            a, b = max(lo, int(starts[k])), min(hi, int(starts[k + 1]))
            if a < b:
                first, last = a - int(starts[k]), b - int(starts[k])
                if shared:
                    pieces.append((r["path"], r["index"], first, last))
                else:  # the job carries the piece's rows of the index: each index's bytes travel once in all
                    if loaded[0] != k:
                        idx = load_npz(r["index"])
                        loaded[:] = [k, idx, np.concatenate([[0], np.cumsum(idx["copies"])])]
                    pieces.append((r["path"], *_index_piece(loaded[1], loaded[2], first, last)))
        jobs.append((o, lo, hi, pieces, storage.join(out, fmt.format(o)), storage.join(out, stats_fmt.format(o))))
    with tqdm(total=int(starts[-1]), desc="reshard: write", unit="sample", disable=quiet) as bar:
        runner.map(_write_shard, [(job,) for job in jobs], "reshard: write", quiet=True,
                   on_result=lambda _, n: bar.update(n))


def _index_piece(idx, cum: np.ndarray, first: int, last: int) -> tuple[dict[str, np.ndarray], int, int]:
    """The rows of an input shard's index that positions [first, last) of its matched sequence use, and
    those positions counted from the first of them (what `_piece_members` needs, nothing more); `cum`:
    0 then the cumulative sum of the index's copies."""
    s0 = int(np.searchsorted(cum, first, side="right") - 1)
    s1 = int(np.searchsorted(cum, last, side="left"))
    ptr = idx["ptr"]
    m0, m1 = int(ptr[s0]), int(ptr[s1])
    part = {"uids": idx["uids"][s0:s1], "copies": idx["copies"][s0:s1], "ptr": ptr[s0 : s1 + 1] - m0,
            "ext": idx["ext"][m0:m1], "offset": idx["offset"][m0:m1], "size": idx["size"][m0:m1]}
    return part, first - int(cum[s0]), last - int(cum[s0])


def _warn(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr)
