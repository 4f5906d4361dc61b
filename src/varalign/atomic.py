"""Safe outputs: temp file + fsync + rename, group commits with the manifest last, ownership checks.

The rules every command follows (README, "Your data is safe"):
- an output is written to a hidden temp file beside it (`.{name}.varalign-XXXXXXXX.tmp`), fsynced,
  then renamed; a run's outputs are renamed together only when all were written, the manifest last;
- the manifest records each output's size and SHA-256, so "up to date" is proven, not assumed, and
  a file under an output's name that no manifest accounts for is not varalign's: it is never
  overwritten unless the user says so (`overwrite=True`, `--overwrite`);
- before the renames the new manifest is written to a pending name (a one-entry journal): a run
  killed between two renames is rolled forward or discarded by the next run, never half-trusted;
- stale temp files of killed runs are removed by the next run on the same output (under its lock).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VaralignError

_TMP_MARK = ".varalign-"
_TMP_RE = r"\.varalign-[a-z0-9_]{8}\.tmp"


def manifest_path(output: str | os.PathLike) -> Path:
    """The manifest of an output: `{stem}.manifest.json` for `.npy` (DataComp's subset files), else
    `{name}.manifest.json`, so two outputs never share one (`x.npy` and `x.bin`)."""
    p = Path(output)
    stem = p.stem if p.suffix == ".npy" else p.name
    return p.with_name(stem + ".manifest.json")


def _tmp_prefix(dest: Path) -> str:
    name = dest.name
    if len(name.encode()) > 200:  # keep the temp name within NAME_MAX when the output's name is long
        name = "long-" + hashlib.sha256(name.encode()).hexdigest()[:16]
    return f".{name}"


def _new_tmp(dest: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(dest) + _TMP_MARK, suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return Path(tmp)


def remove_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove the temp files of earlier (killed) runs writing `dest`; call only under `dest`'s lock."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    pattern = re.compile("^" + re.escape(_tmp_prefix(dest)) + _TMP_RE + "$")
    removed = []
    for entry in dest.parent.iterdir():
        if pattern.match(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames in `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def os_error(exc: OSError, what: str, path: object) -> VaralignError:
    """An OSError as one line naming the user's file (not our temp file) and the OS's reason."""
    return VaralignError(f"{what} ({exc.strerror or exc})", path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path`; fsync and rename it onto `path` only if the block succeeds.

    `durable=False` skips the fsyncs (for files whose corruption is detected and repaired anyway)."""
    dest = Path(path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _new_tmp(dest)
    except OSError as exc:
        raise os_error(exc, "cannot create the output", dest) from None
    try:
        yield tmp_path
        try:
            os.chmod(tmp_path, 0o666 & ~_umask())
            if durable:
                fsync_file(tmp_path)
            os.replace(tmp_path, dest)
            if durable:
                fsync_dir(dest.parent)
        except OSError as exc:
            raise os_error(exc, "cannot write the output", dest) from None
    except OSError as exc:  # the block's own write failed (disk full...): name the output, not the temp
        if _writing_failed(exc, tmp_path):
            raise os_error(exc, "cannot write the output", dest) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


# what a write into our temp file fails with (a write on an open handle carries no file name)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def _writing_failed(exc: OSError, tmp: Path) -> bool:
    if exc.filename is not None:
        return Path(exc.filename) == tmp
    return exc.errno in _WRITE_ERRNOS


def check_output_path(path: str | os.PathLike) -> None:
    """Fail before any work if `path` cannot be written: a folder, a parent that is a file, a name
    longer than the filesystem allows, or a folder we may not write into."""
    dest = Path(path)
    if dest.is_dir():
        raise VaralignError("output path is a directory", dest)
    parent = next((p for p in dest.parents if p.exists()), None)
    if parent is None:
        return
    if not parent.is_dir():
        raise VaralignError(f"cannot create the output: {parent} is not a directory", dest)
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    for part in dest.relative_to(parent).parts if dest != parent else ():
        if len(part.encode()) > limit:
            raise VaralignError(f"file name too long for this filesystem ({len(part.encode())} bytes, "
                                f"at most {limit})", dest)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VaralignError(f"cannot write into {parent} (permission denied or read-only)", dest)
    if dest.exists() and not os.access(dest.parent, os.W_OK):
        raise VaralignError(f"cannot replace the output: {dest.parent} is not writable", dest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """`np.save` atomically (no pickle)."""
    with atomic_path(path, ".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    """Write pretty JSON atomically."""
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(dump_json(obj))


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (Path,)):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _pending_path(manifest: Path) -> Path:
    return manifest.with_name(f".{manifest.name}.pending")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _recorded(manifest: dict | None) -> dict[str, dict]:
    """{absolute output path: {"size", "sha256"}} as a manifest records them."""
    files = (manifest or {}).get("files")
    return {str(k): v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _matches(path: Path, record: dict | None) -> bool:
    if not record:
        return False
    try:
        if path.stat().st_size != record.get("size"):
            return False
        return file_sha256(path) == record.get("sha256")
    except OSError:
        return False


class OutputGroup:
    """The outputs of one run: written to temps, then renamed together with the manifest last.

    `outputs`: the files the run writes (the manifest excluded); `manifest`: where the manifest goes.
    """

    def __init__(self, outputs: Sequence[str | os.PathLike], manifest: str | os.PathLike | None,
                 overwrite: bool = False) -> None:
        self.outputs = [Path(p) for p in outputs]
        if manifest is None and self.outputs:
            manifest = manifest_path(self.outputs[0])
        self.manifest = Path(manifest) if manifest is not None else None
        self.pending = _pending_path(self.manifest) if self.manifest is not None else None
        self.overwrite = overwrite
        self.temps: dict[Path, Path] = {}

    def all_paths(self) -> list[Path]:
        return [*self.outputs, self.manifest] if self.manifest is not None else []

    # -- before any work --------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish or discard the commit of a run killed between its renames; drop stale temps.
        Call under the outputs' locks."""
        if self.manifest is None:
            return
        for p in [*self.all_paths(), self.pending]:
            remove_stale_temps(p)
        pending = _read_json(self.pending)
        if pending is None:
            with contextlib.suppress(FileNotFoundError):
                self.pending.unlink()
            return
        records = _recorded(pending)
        if records and all(_matches(Path(p), r) for p, r in records.items()):
            os.replace(self.pending, self.manifest)  # every output was renamed: roll the commit forward
            fsync_dir(self.manifest.parent)
        # else: killed before every rename; owned() below still recognises the renamed ones

    def owned(self, path: Path) -> bool:
        """Whether the file at `path` is one varalign wrote (recorded in this group's manifest or its
        pending commit, with the same size and digest; or named by an earlier varalign manifest)."""
        for source in (self.manifest, self.pending):
            data = _read_json(source) if source is not None else None
            if data is None:
                continue
            if _matches(path, _recorded(data).get(str(path.absolute()))):
                return True
            if not _recorded(data) and str(data.get("tool", "")).startswith("varalign"):
                named = (data.get("output") or {}).get("path") or data.get("path")
                if named and Path(named).absolute() == path.absolute():  # a manifest of an earlier version
                    return True
        return False

    def check_overwrite(self) -> None:
        """Refuse to replace a file varalign did not write, unless `overwrite`."""
        if self.overwrite:
            return
        for p in self.all_paths():
            if p.is_symlink() or p.exists():
                if p == self.manifest:
                    data = _read_json(p)
                    if data is not None and str(data.get("tool", "")).startswith("varalign"):
                        continue
                elif self.owned(p):
                    continue
                raise VaralignError("exists and was not written by varalign (or was changed since): not "
                                    "overwritten; remove it, choose another output, or pass --overwrite", p)

    def up_to_date(self, plan: str) -> dict | None:
        """The manifest if it was made with `plan` and every output it records is there, unchanged."""
        if self.manifest is None:
            return None
        data = _read_json(self.manifest)
        if data is None or data.get("plan") != plan:
            return None
        records = _recorded(data)
        if set(records) != {str(p.absolute()) for p in self.outputs}:
            return None
        if not all(_matches(Path(p), r) for p, r in records.items()):
            return None
        return data

    # -- writing ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def write(self, path: str | os.PathLike) -> Iterator[Path]:
        """`with group.write(out) as tmp:` write `tmp`; an I/O error while writing names `out`."""
        dest = Path(path)
        tmp = self.temp(dest)
        try:
            yield tmp
        except OSError as exc:
            if _writing_failed(exc, tmp):
                raise os_error(exc, "cannot write the output", dest) from None
            raise

    def temp(self, path: str | os.PathLike) -> Path:
        """A temp file for output `path` (created empty), renamed onto it by `commit`."""
        dest = Path(path)
        if dest not in self.outputs:
            raise ValueError(f"{dest} is not an output of this group")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = _new_tmp(dest)
        except OSError as exc:
            raise os_error(exc, "cannot create the output", dest) from None
        self.temps[dest] = tmp
        return tmp

    def commit(self, manifest: dict) -> dict:
        """fsync every temp, record sizes and digests, then rename: outputs first, manifest last."""
        if self.manifest is None:
            raise ValueError("a group without outputs has nothing to commit")
        files = {}
        for dest in self.outputs:
            tmp = self.temps.get(dest)
            if tmp is None:
                raise ValueError(f"{dest} was not written")
            try:
                os.chmod(tmp, 0o666 & ~_umask())
                fsync_file(tmp)
                files[str(dest.absolute())] = {"size": tmp.stat().st_size, "sha256": file_sha256(tmp)}
            except OSError as exc:
                raise os_error(exc, "cannot write the output", dest) from None
        manifest = {**manifest, "files": files}
        try:
            with atomic_path(self.pending, ".json") as tmp:
                tmp.write_text(dump_json(manifest))
            for dest in self.outputs:
                os.replace(self.temps.pop(dest), dest)
            for d in {dest.parent for dest in self.outputs}:
                fsync_dir(d)
            os.replace(self.pending, self.manifest)
            fsync_dir(self.manifest.parent)
        except OSError as exc:
            raise os_error(exc, "cannot write the outputs", self.outputs[0] if self.outputs else self.manifest) \
                from None
        return manifest

    def abort(self) -> None:
        """Remove every temp file not yet renamed."""
        for tmp in self.temps.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self.temps.clear()

    @contextlib.contextmanager
    def writing(self) -> Iterator[OutputGroup]:
        """`with group.writing(): ... group.commit(m)`: temps removed whatever happens."""
        try:
            yield self
        finally:
            self.abort()
