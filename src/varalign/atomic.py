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
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VaralignError

_TMP_MARK = ".varalign-"
_TMP_RE = r"\.varalign-[a-z0-9_]{8}\.tmp"


def manifest_path(output: str | os.PathLike) -> Path | str:
    """The manifest of an output: `{stem}.manifest.json` for `.npy` (DataComp's subset files), else
    `{name}.manifest.json`, so two outputs never share one (`x.npy` and `x.bin`). A URL gives a URL."""
    text = os.fspath(output)
    if "://" in text and not text.startswith("file://"):
        head, _, name = text.rpartition("/")
        return f"{head}/{name[:-4] if name.endswith('.npy') else name}.manifest.json"
    p = Path(output)
    stem = p.stem if p.suffix == ".npy" else p.name
    return p.with_name(stem + ".manifest.json")


def short_name(name: str) -> str:
    """`name`, or past 200 bytes a digest of it: the stem of the hidden files named after an output (its temps,
    its lock), so that they stay within NAME_MAX when the output's own name is long."""
    return name if len(name.encode()) <= 200 else "long-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def _tmp_prefix(dest: Path) -> str:
    return f".{short_name(dest.name)}"


def _new_tmp(dest: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(dest) + _TMP_MARK, suffix=".tmp", dir=dest.parent)
    os.close(fd)
    return Path(tmp)


def temp_pattern(dest: str | os.PathLike) -> re.Pattern:
    """The names of the temp files varalign writes `dest` through (`.{name}.varalign-XXXXXXXX.tmp`)."""
    return re.compile("^" + re.escape(_tmp_prefix(Path(dest))) + _TMP_RE + "$")


def remove_stale_temps(dest: str | os.PathLike) -> list[Path]:
    """Remove the temp files of earlier (killed) runs writing `dest`; call only under `dest`'s lock."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    pattern = temp_pattern(dest)
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

    `durable=False` skips the fsyncs (for files whose corruption is detected and repaired anyway).
    A URL: the temp is a local file, uploaded onto `path` in one put (the object appears whole or not at all)."""
    if _is_url(path):
        with _upload_path(os.fspath(path), suffix) as tmp:
            yield tmp
        return
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


def _is_url(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


_UPLOADS_SWEPT = False


def _upload_dir() -> str:
    """This machine's folder for files on their way to object storage (`$TMPDIR/varalign-uploads`). Once per
    process, the temps of processes that are gone (killed before their upload ended) are removed: only
    names this function's `varalign-upload-<pid>-` pattern made, in this folder."""
    global _UPLOADS_SWEPT
    folder = os.path.join(tempfile.gettempdir(), "varalign-uploads")
    os.makedirs(folder, exist_ok=True)
    if not _UPLOADS_SWEPT:
        _UPLOADS_SWEPT = True
        for name in os.listdir(folder):
            parts = name.split("-")
            if len(parts) < 4 or parts[:2] != ["varalign", "upload"] or not parts[2].isdigit():
                continue
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                path = os.path.join(folder, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            except OSError:
                pass  # alive, another user's
    return folder


@contextlib.contextmanager
def _upload_path(url: str, suffix: str) -> Iterator[Path]:
    from . import storage  # noqa: PLC0415

    fd, tmp = tempfile.mkstemp(prefix=f"varalign-upload-{os.getpid()}-", suffix=suffix, dir=_upload_dir())
    os.close(fd)
    try:
        yield Path(tmp)
        storage.put_file(tmp, url)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# what a write into our temp file fails with (a write on an open handle carries no file name)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM}


def _writing_failed(exc: OSError, tmp: Path) -> bool:
    if exc.filename is not None:
        return Path(exc.filename) == tmp
    return exc.errno in _WRITE_ERRNOS


def check_output_path(path: str | os.PathLike) -> None:
    """Fail before any work if `path` cannot be written: a folder, a parent that is a file, a name
    longer than the filesystem allows, or a folder we may not write into."""
    if "://" in os.fspath(path) and not os.fspath(path).startswith("file://"):
        from . import storage  # noqa: PLC0415

        storage.check_writable(os.fspath(path))
        return
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


def _pending_path(manifest: Path | str) -> Path | str:
    if isinstance(manifest, str):
        head, _, name = manifest.rpartition("/")
        return f"{head}/.{name}.pending"
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


def manifest_mismatch(manifest: dict | None, output: str | os.PathLike) -> str | None:
    """Why `manifest` does not describe the file at `output` (a local path or a URL), or None when it does or
    records no files (an earlier varalign's). A manifest moved with its output is matched by file name."""
    records = _recorded(manifest)
    if not records:
        return None
    ops: _Ops = _Remote() if "://" in os.fspath(output) and not os.fspath(output).startswith("file://") else _Local()
    key = ops.key(ops.path(os.fspath(output)))
    record = records.get(key)
    if record is None:
        name = ops.name(ops.path(key))
        same = [r for k, r in records.items() if ops.name(ops.path(k)) == name]
        if not same:
            return "it records other files (" + ", ".join(sorted(ops.name(ops.path(k)) for k in records)) + ")"
        record = same[0]
    if not ops.matches(ops.path(os.fspath(output)), record):
        return "the file's size or SHA-256 differs from the one recorded (changed since)"
    return None


_DIGESTS: dict[tuple, str] = {}  # (path, device, inode, size, mtime_ns) -> sha256, for an unchanged file


def _matches(path: Path, record: dict | None) -> bool:
    """Whether the file at `path` has the recorded size and SHA-256. Recovery, "up to date" and the
    overwrite check each ask about the same outputs: an unchanged file is hashed once."""
    if not record:
        return False
    try:
        st = path.stat()
        if st.st_size != record.get("size"):
            return False
        return cached_sha256(path, st) == record.get("sha256")
    except OSError:
        return False


def cached_sha256(path: str | os.PathLike, st: os.stat_result | None = None) -> str:
    """`file_sha256`, computed once per process for an unchanged file (same inode, size and mtime)."""
    path = Path(path)
    st = st or path.stat()
    key = (str(path.absolute()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        if len(_DIGESTS) >= 64:  # a run has a handful of outputs: a small bounded memo
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


class OutputGroup:
    """The outputs of one run: written to temps, then renamed together with the manifest last.

    `outputs`: the files the run writes (the manifest excluded); `manifest`: where the manifest goes.
    Outputs may be URLs (all of a group's, or none): their temps are local files, each is uploaded in
    one put (an object appears whole or not at all), the pending manifest first and the manifest last.
    """

    def __init__(self, outputs: Sequence[str | os.PathLike], manifest: str | os.PathLike | None,
                 overwrite: bool = False) -> None:
        from . import storage  # noqa: PLC0415

        texts = [os.fspath(p) for p in outputs]
        self.remote = any(storage.is_url(t) for t in texts)
        if self.remote and not all(storage.is_url(t) for t in texts):
            raise VaralignError("give every output as a URL, or every output as a local path", texts[0])
        self.ops: _Ops = _Remote() if self.remote else _Local()
        self.outputs = [self.ops.path(t) for t in texts]
        if manifest is None and self.outputs:
            manifest = manifest_path(self.outputs[0])
        self.manifest = self.ops.path(os.fspath(manifest)) if manifest is not None else None
        self.pending = _pending_path(self.manifest) if self.manifest is not None else None
        if not self.remote and self.pending is not None:  # the commit's own names must fit too
            for p in (self.manifest, self.pending):
                if len(p.name.encode()) > 255:
                    raise VaralignError(f"file name too long: the output's {'manifest' if p == self.manifest else 'pending manifest'} "
                                        f"would be named {len(p.name.encode())} bytes (at most 255); choose a shorter "
                                        "output name", self.outputs[0])
        self.overwrite = overwrite
        self.temps: dict = {}
        self.staging: str | None = None

    def all_paths(self) -> list:
        return [*self.outputs, self.manifest] if self.manifest is not None else []

    # -- before any work --------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish or discard the commit of a run killed between its renames; drop stale temps.
        Call under the outputs' locks."""
        if self.manifest is None:
            return
        self.ops.remove_stale_temps([*self.all_paths(), self.pending])
        pending = self.ops.read_json(self.pending)
        if pending is None:
            self.ops.remove(self.pending)
            return
        records = _recorded(pending)
        if records and all(self.ops.matches(p, r) for p, r in records.items()):
            self.ops.promote(self.pending, self.manifest)  # every output was renamed: roll the commit forward
        # else: killed before every rename; owned() below still recognises the renamed ones

    def owned(self, path) -> bool:
        """Whether the file at `path` is one varalign wrote (recorded in this group's manifest or its
        pending commit, with the same size and digest; or named by an earlier varalign manifest)."""
        for source in (self.manifest, self.pending):
            data = self.ops.read_json(source) if source is not None else None
            if data is None:
                continue
            if self.ops.matches(self.ops.key(path), _recorded(data).get(self.ops.key(path))):
                return True
            if not _recorded(data) and str(data.get("tool", "")).startswith("varalign"):
                named = (data.get("output") or {}).get("path") or data.get("path")
                if named and self.ops.key(self.ops.path(named)) == self.ops.key(path):  # an earlier version's
                    return True
        return False

    def foreign_manifest(self) -> str | None:
        """The other output whose manifest sits where this group's goes (`--save_path x` after `x.npy`: both
        have `x.manifest.json`), while that output is still there; None when the manifest is this group's."""
        data = self.ops.read_json(self.manifest) if self.manifest is not None else None
        records = _recorded(data)
        if not records:
            return None
        ours = {self.ops.key(p) for p in self.outputs}
        if ours & set(records):
            return None
        if not self.remote:  # the same files by another spelling (`..`, a symlinked folder), or a copy of the
            # folder: its manifest records the originals' paths, under our outputs' names
            real = {os.path.realpath(p) for p in self.outputs}
            names = {Path(p).name for p in self.outputs}
            here = os.path.realpath(Path(self.manifest).parent)
            for k in records:
                if os.path.realpath(k) in real or (Path(k).name in names and os.path.realpath(Path(k).parent) != here):
                    return None
        others = [k for k in records if self.ops.exists(self.ops.path(k))]
        return others[0] if others else None

    def check_overwrite(self) -> None:
        """Refuse to replace a file varalign did not write, unless `overwrite`; and, even with `overwrite`,
        the manifest of another output that is still there (replacing it would leave that one undescribed)."""
        other = self.foreign_manifest()
        if other is not None:
            raise VaralignError(f"is the manifest of another varalign output ({other}): not replaced; choose "
                                "another output name, or move that output and its manifest away", self.manifest)
        if self.overwrite:
            return
        for p in self.all_paths():
            if self.ops.exists(p):
                if p == self.manifest:
                    data = self.ops.read_json(p)
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
        data = self.ops.read_json(self.manifest)
        if data is None or data.get("plan") != plan:
            return None
        records = _recorded(data)
        if set(records) != {self.ops.key(p) for p in self.outputs}:
            return None
        if not all(self.ops.matches(p, r) for p, r in records.items()):
            return None
        return data

    # -- writing ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def write(self, path: str | os.PathLike) -> Iterator[Path]:
        """`with group.write(out) as tmp:` write `tmp`; an I/O error while writing names `out`."""
        dest = self.ops.path(os.fspath(path))
        tmp = self.temp(dest)
        try:
            yield tmp
        except OSError as exc:
            if _writing_failed(exc, tmp):
                raise os_error(exc, "cannot write the output", dest) from None
            raise

    def temp(self, path) -> Path:
        """A local temp file for output `path` (created empty), renamed or uploaded onto it by `commit`."""
        dest = self.ops.path(os.fspath(path))
        if dest not in self.outputs:
            raise ValueError(f"{dest} is not an output of this group")
        try:
            if self.remote:
                self.staging = self.staging or tempfile.mkdtemp(prefix=f"varalign-upload-{os.getpid()}-",
                                                                dir=_upload_dir())
                tmp = Path(self.staging) / f"{len(self.temps)}-{self.ops.name(dest)}"
                tmp.touch()
            else:
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
                files[self.ops.key(dest)] = {"size": tmp.stat().st_size, "sha256": file_sha256(tmp)}
            except OSError as exc:
                raise os_error(exc, "cannot write the output", dest) from None
        manifest = {**manifest, "files": files}
        try:
            try:
                self.ops.write_text(self.pending, dump_json(manifest))
            except VaralignError as exc:  # the first put failed: name the user's output
                if not self.remote:
                    raise
                # a refused put (permission, credentials, missing bucket) wrote nothing; a put that failed on
                # the way (timeout, connection reset) may have stored the pending manifest, which the next run
                # sees with no output behind it and redoes: either way, no output was replaced
                refused = exc.reason.startswith(("permission denied", "no usable credentials", "not found"))
                raise VaralignError(f"{exc.reason}; {'nothing was written' if refused else 'no output was replaced'}",
                                    self.outputs[0]) from None
            for dest in self.outputs:
                self.ops.place(self.temps.pop(dest), dest)
            self.ops.sync([*self.outputs])
            self.ops.promote(self.pending, self.manifest)
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
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None

    @contextlib.contextmanager
    def writing(self) -> Iterator[OutputGroup]:
        """`with group.writing(): ... group.commit(m)`: temps removed whatever happens."""
        try:
            yield self
        finally:
            self.abort()


class _Ops:
    """File operations of an output group: on local paths (Path) or on URLs (str)."""


class _Local(_Ops):
    def path(self, text: str) -> Path:
        return Path(text)

    def key(self, p) -> str:
        # the folder resolved (`..`, symlinked folders: one file, one key), the name kept (a link is replaced)
        p = Path(p)
        return os.path.join(os.path.realpath(p.parent), p.name)

    def name(self, p: Path) -> str:
        return p.name

    def exists(self, p: Path) -> bool:
        return p.is_symlink() or p.exists()

    def read_json(self, p: Path) -> dict | None:
        return _read_json(p)

    def matches(self, p, record: dict | None) -> bool:
        return _matches(Path(p), record)

    def remove(self, p: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()

    def remove_stale_temps(self, paths: list) -> None:
        for p in paths:
            remove_stale_temps(p)

    def write_text(self, p: Path, text: str) -> None:
        with atomic_path(p, ".json") as tmp:
            tmp.write_text(text)

    def place(self, tmp: Path, dest: Path) -> None:
        os.replace(tmp, dest)

    def sync(self, paths: list) -> None:
        for d in {Path(p).parent for p in paths}:
            fsync_dir(d)

    def promote(self, pending: Path, manifest: Path) -> None:
        os.replace(pending, manifest)
        fsync_dir(manifest.parent)


class _Remote(_Ops):
    """Objects in a store: a put is atomic (a reader sees the old object or the whole new one)."""

    def path(self, text: str) -> str:
        return text

    def key(self, p) -> str:
        return str(p)

    def name(self, p: str) -> str:
        return p.rstrip("/").rsplit("/", 1)[-1]

    def exists(self, p: str) -> bool:
        from . import storage  # noqa: PLC0415

        return storage.exists(p)

    def read_json(self, p: str) -> dict | None:
        from . import storage  # noqa: PLC0415

        try:
            if not storage.exists(p):
                return None
            with storage.open_read(p, block_size=1 << 20) as fh:
                data = json.loads(fh.read().decode())
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def matches(self, p, record: dict | None) -> bool:
        from . import storage  # noqa: PLC0415

        if not record:
            return False
        try:
            if storage.info(p)["size"] != record.get("size"):
                return False
            h = hashlib.sha256()
            with storage.open_read(p) as fh:
                while chunk := fh.read(1 << 22):
                    h.update(chunk)
            return h.hexdigest() == record.get("sha256")
        except (OSError, VaralignError):
            return False

    def remove(self, p: str) -> None:
        from . import storage  # noqa: PLC0415

        if storage.exists(p):
            storage.remove(p)

    def remove_stale_temps(self, paths: list) -> None:
        pass  # nothing is ever written under a temporary key: uploads are single puts

    def write_text(self, p: str, text: str) -> None:
        from . import storage  # noqa: PLC0415

        fd, tmp = tempfile.mkstemp(prefix=f"varalign-upload-{os.getpid()}-", suffix=".json", dir=_upload_dir())
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            storage.put_file(tmp, p)
        finally:
            os.unlink(tmp)

    def place(self, tmp: Path, dest: str) -> None:
        from . import storage  # noqa: PLC0415

        storage.put_file(str(tmp), dest)
        tmp.unlink()

    def sync(self, paths: list) -> None:
        pass

    def promote(self, pending: str, manifest: str) -> None:
        from . import storage  # noqa: PLC0415

        fs, src = storage.filesystem(pending)
        _, dst = storage.filesystem(manifest)
        try:
            fs.copy(src, dst)  # server-side copy: the manifest object appears whole
            fs.rm_file(src)
        except Exception as exc:  # noqa: BLE001
            raise storage.remote_error(exc, manifest) from None
