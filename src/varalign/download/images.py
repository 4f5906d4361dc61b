"""One img2dataset pass over a prepared input, in a child process group we can always stop, with a
progress bar fed by the shards it finishes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from .. import storage
from ..atomic import save_json
from ..errors import VaralignError
from .outcomes import finished_shards, shard_stats

# run as a file, not `-m varalign...`: img2dataset's spawned workers re-run it first, and importing the
# varalign package in each of them would cost time for nothing
RUNNER = Path(__file__).with_name("_runner.py")
# the suffixes img2dataset gives a shard's files, per output format (the `files` format writes a folder)
SHARD_SUFFIXES = (".tar", ".parquet", ".tfrecord")


def img2dataset_config(input_dir: str, shards_dir: Path | str, opts: dict, mode: str) -> dict:
    """The arguments DataComp's download_upstream.py gives img2dataset.download, plus hash verification."""
    verify = opts["verify_hash"]
    return {
        "url_list": input_dir, "output_folder": str(shards_dir), "input_format": "parquet", "url_col": "url",
        "caption_col": "text", "bbox_col": None if opts["skip_bbox_blurring"] else "face_bboxes",
        "save_additional_columns": ["uid"], "number_sample_per_shard": opts["number_sample_per_shard"],
        "oom_shard_count": 8, "processes_count": opts["processes_count"], "thread_count": opts["thread_count"],
        "image_size": opts["image_size"], "resize_mode": opts["resize_mode"],
        "resize_only_if_bigger": opts["resize_only_if_bigger"], "encode_format": opts["encode_format"],
        "output_format": opts["output_format"], "retries": opts["retries"], "timeout": opts["timeout"],
        "enable_wandb": opts["enable_wandb"], "wandb_project": opts["wandb_project"],
        "distributor": "multiprocessing", "compute_hash": "sha256",
        "verify_hash": ["sha256", "sha256"] if verify else None, "incremental_mode": mode,
    }


def remove_unfinished(shards_dir: Path | str) -> list[str]:
    """Delete the files of shards img2dataset began but did not finish (no `_stats.json`: a killed run).
    Only called on a shards folder varalign created."""
    if not storage.isdir(shards_dir):
        return []
    done = {f"{i:08d}" for i in finished_shards(shards_dir)}
    if storage.is_url(shards_dir):
        return _remove_unfinished_objects(str(shards_dir), done)
    removed = []
    for p in shards_dir.iterdir():
        stem = p.name.split(".")[0] if p.is_file() else p.name
        if len(stem) == 8 and stem.isdigit() and stem not in done and (p.is_dir() or p.suffix in SHARD_SUFFIXES):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p.name)
    return sorted(removed)


def _remove_unfinished_objects(shards_dir: str, done: set[str]) -> list[str]:
    """`remove_unfinished` in a folder URL: the objects (and a `files`-format folder) of unfinished shards."""
    removed = []
    for name in storage.listdir(shards_dir, refresh=True):
        stem = name.split(".")[0]
        if len(stem) == 8 and stem.isdigit() and stem not in done and (name == stem or name.endswith(SHARD_SUFFIXES)):
            path = storage.join(shards_dir, name)
            if name == stem:
                storage.remove_tree(path)
            else:
                storage.remove(path)
            removed.append(name)
    return sorted(removed)


def run_pass(config: dict, work_dir: Path, name: str, shard_rows: dict[int, int], quiet: bool) -> None:
    """Run img2dataset with `config` in a child process group; `shard_rows` maps the shard ids this pass
    will write to their row counts (drives the progress bar). Logs go to `work_dir/{name}.log`. A shards
    folder URL: img2dataset writes there through fsspec, given our storage options (`storage.child_env`)."""
    shards_dir = storage.as_path(config["output_folder"])
    cfg_path = work_dir / f"{name}.json"
    save_json(cfg_path, config)
    log_path = work_dir / f"{name}.log"
    seen = set(_finished(shards_dir))
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1",
           "VARALIGN_DOWNLOAD_WANDB": "1" if config["enable_wandb"] else "0",
           **storage.child_env(config["url_list"]), **storage.child_env(config["output_folder"])}
    with open(log_path, "ab") as log, _bar(sum(shard_rows.values()), quiet) as bar:
        proc = subprocess.Popen([sys.executable, str(RUNNER), str(cfg_path)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        (work_dir / "runner.pid").write_text(str(proc.pid))
        try:
            while proc.poll() is None:
                _advance(bar, shards_dir, seen, shard_rows)
                time.sleep(0.5)
            _advance(bar, shards_dir, seen, shard_rows)
        finally:
            _kill_group(proc)
    if proc.returncode != 0:
        raise VaralignError(f"img2dataset stopped with exit code {proc.returncode}: {_last_line(log_path)} "
                            f"(log: {log_path}); finished shards are kept, run the same command again to resume")


def previous_runner_alive(work_dir: Path) -> int | None:
    """The process group of an earlier pass that is still running (its parent was killed very recently)."""
    try:
        pid = int((work_dir / "runner.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if str(RUNNER).encode() in cmdline else None


def _advance(bar: tqdm, shards_dir: Path | str, seen: set[int], shard_rows: dict[int, int]) -> None:
    """Count the shards finished since the last call (their `_stats.json`) into the bar."""
    for shard in set(_finished(shards_dir)) - seen:
        try:
            stats = shard_stats(shards_dir, shard)
        except (OSError, ValueError, VaralignError):  # being written right now: next time
            continue
        seen.add(shard)
        bar.successes += int(stats.get("successes", 0))
        bar.update(int(stats.get("count", shard_rows.get(shard, 0))))
        bar.set_postfix_str(f"{bar.successes:,} ok ({100.0 * bar.successes / max(bar.n, 1):.1f}%)")


def _finished(shards_dir: Path | str) -> list[int]:
    """`finished_shards`, none while the folder does not exist yet."""
    try:
        return finished_shards(shards_dir)
    except (OSError, VaralignError):
        return []


@contextlib.contextmanager
def _bar(total: int, quiet: bool) -> Iterator[tqdm]:
    bar = tqdm(total=total, unit="url", unit_scale=True, disable=quiet, desc="images", dynamic_ncols=True)
    bar.successes = 0
    try:
        yield bar
    finally:
        bar.close()


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the runner and every img2dataset process it started (they share its process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1].strip()[:300] if lines else "no output"

