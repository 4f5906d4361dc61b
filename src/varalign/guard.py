"""Before any work: outputs that would clobber inputs, and runs that would race each other.

- `check_paths`: every output against every input and every other output, and the work directory
  against both (resolved, symlinks followed, hard links caught by inode); a collision is one line
  naming both paths.
- `lock`: an OS lock (`flock`, released by the kernel when the process dies, kill -9 included) on
  an output or a work directory; a second run on the same one is refused with the first one's pid.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import storage
from .atomic import OutputGroup, check_output_path, short_name
from .errors import VaralignError

POOL_SUFFIXES = (".parquet", ".npz")


def _real(path: str | os.PathLike) -> Path | str:
    if storage.is_url(path):
        return str(path).rstrip("/")
    return Path(os.path.realpath(os.path.abspath(path)))


def _parent(p: Path | str) -> Path | str:
    return str(p).rstrip("/").rpartition("/")[0] if storage.is_url(p) else Path(p).parent


def _name(p: Path | str) -> str:
    return str(p).rstrip("/").rpartition("/")[2] if storage.is_url(p) else Path(p).name


class _Resolved:
    """A path resolved once: its real path (symlinks followed) and, for a local file that exists, its
    (device, inode), so that hard links compare equal."""

    def __init__(self, label: str, path: Path | str, parents: dict[str, str]) -> None:
        self.label, self._given = label, path
        self.inode: tuple[int, int] | None = None
        if storage.is_url(path):
            self.real: str = str(path).rstrip("/")
            return
        text = os.path.abspath(path)
        head, _, tail = text.rpartition(os.sep)
        try:
            st = os.lstat(text)
        except OSError:
            st = None
        if st is not None and not stat.S_ISLNK(st.st_mode):  # the usual case: resolve the folder once per folder
            if head not in parents:
                parents[head] = os.path.realpath(head or os.sep)
            self.real = os.path.join(parents[head], tail)
            self.inode = (st.st_dev, st.st_ino)
        else:
            self.real = os.path.realpath(text)
            with contextlib.suppress(OSError):
                st = os.stat(self.real)
                self.inode = (st.st_dev, st.st_ino)

    @property
    def path(self) -> Path | str:
        """The path as given (a local one as a `Path`: made only when a message names it)."""
        return _as_path(self._given) if isinstance(self._given, str) else self._given

    def same(self, other: _Resolved) -> bool:
        return self.real == other.real or (self.inode is not None and self.inode == other.inode)

    def inside(self, parent: _Resolved) -> bool:
        if storage.is_url(self.real) != storage.is_url(parent.real):
            return False
        sep = "/" if storage.is_url(self.real) else os.sep
        return self.real != parent.real and self.real.startswith(parent.real.rstrip(sep) + sep)


def check_paths(inputs: dict[str, object], outputs: dict[str, object], work_dir: object | None = None,
                pool_dirs: Iterable[object] = (), dir_label: str = "work directory") -> None:
    """Refuse (one line, naming both) any output that is an input, another output, or inside the
    work directory; a work directory that is or holds an input or an output; and a `.parquet`/`.npz`
    output inside a pool directory (the next run would read it as a shard).

    `inputs`/`outputs`: {flag or label: path (or a list of paths)}; None values are skipped. Each path
    is resolved once (its folder's real path shared with its siblings) and compared through dicts, so
    a pool of many shards costs a stat or two per shard.
    """
    parents: dict[str, str] = {}
    ins = [_Resolved(k, p, parents) for k, v in inputs.items() for p in _paths(v)]
    outs = [_Resolved(k, p, parents) for k, v in outputs.items() for p in _paths(v)]
    by_real = {r.real: r for r in reversed(ins)}  # the first input of a path names it
    by_inode = {r.inode: r for r in reversed(ins) if r.inode is not None}
    for i, o in enumerate(outs):
        p = by_real.get(o.real) or (by_inode.get(o.inode) if o.inode is not None else None)
        if p is not None:
            raise VaralignError(f"{o.label} is the same file as the input {p.label} ({p.path}): refused, it would "
                                "be overwritten", o.path)
        for o2 in outs[i + 1:]:
            if o.same(o2):
                raise VaralignError(f"{o.label} and {o2.label} are the same file: give each output its own path", o.path)
    for d in [_Resolved("pool", _as_path(x), parents) for x in _paths(list(pool_dirs))]:
        for o in outs:
            if _name(o.path).endswith(POOL_SUFFIXES) and _Resolved("", _parent(o.path), parents).same(d):
                raise VaralignError(f"{o.label} is inside the pool directory {d.path}: the next run would read it "
                                    "as a shard; write it elsewhere", o.path)
    if work_dir is None:
        return
    w = _Resolved("", _as_path(work_dir), parents)
    for kind, items in (("input", ins), ("output", outs)):
        for r in items:
            if w.same(r):
                raise VaralignError(f"the {dir_label} is the {kind} {r.label} ({r.path}): refused", w.path)
            if r.inside(w):
                raise VaralignError(f"the {dir_label} holds the {kind} {r.label} ({r.path}): refused", w.path)


def _as_path(text: str) -> Path | str:
    return text if storage.is_url(text) else Path(text)


def _paths(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


class Busy(VaralignError):
    pass


@contextlib.contextmanager
def lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive `flock` on the lock file `path` (created if missing, holding our pid) while the
    block runs; refuse if another process holds it. The file is removed at the end."""
    p = Path(path)
    while True:
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise VaralignError(f"cannot lock {what} ({exc.strerror or exc})", p) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise VaralignError(f"cannot lock {what} ({exc.strerror or exc})", p) from None
            raise Busy(f"{what} is in use by another varalign run{_owner(p)}; wait for it to finish", p) from None
        try:  # its owner may have removed the file between our open and our lock: then lock the new one
            same = os.stat(p).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(p)  # unlinked while still locked: a run waiting on the old file re-checks the inode
        os.close(fd)


def _owner(p: Path) -> str:
    try:
        text = (p.read_text().strip() if p.is_file() else "")
    except OSError:
        text = ""
    return f" (pid {text})" if text.isdigit() else ""


def lock_file_for(output: str | os.PathLike) -> Path:
    """The lock file of an output: `.{name}.varalign.lock` beside it (removed when the run ends). An
    object in a store has its lock file in `~/.cache/varalign/locks/` (it keeps out a second run on
    this machine; runs on other machines are not seen)."""
    if storage.is_url(output):
        import hashlib  # noqa: PLC0415

        folder = storage.cache_dir("locks")
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{hashlib.sha256(str(output).encode()).hexdigest()[:24]}.lock"
    p = Path(output)
    return p.with_name(f".{short_name(p.name)}.varalign.lock")


@contextlib.contextmanager
def lock_outputs(outputs: Iterable[object]) -> Iterator[None]:
    """Lock every output (sorted, so two runs never take them in opposite orders)."""
    paths = sorted({str(_real(p)) for p in _paths(list(outputs))})
    with contextlib.ExitStack() as stack:
        for p in paths:
            if not storage.is_url(p):
                Path(p).parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(lock(lock_file_for(p), f"the output {p}"))
        yield


@contextlib.contextmanager
def guarded_outputs(outputs: dict[str, object], inputs: dict[str, object], manifest: object | None = None,
                    overwrite: bool = False, pool_dirs: Iterable[object] = ()) -> Iterator[OutputGroup]:
    """Everything a command does before and around writing its output files: each path writable, no
    output an input or another output, every output locked, a killed commit recovered, no file that
    varalign did not write replaced (unless `overwrite`); temps removed whatever happens.

    `outputs`: {flag: path}; the first is the primary one (the manifest goes beside it unless given).
    Use: `with guarded_outputs(...) as group: with group.write(path) as tmp: ...; group.commit(manifest)`.
    """
    paths = {k: _as_path(str(v)) for k, v in outputs.items() if v is not None}
    for p in paths.values():
        check_output_path(p)
    group = OutputGroup(list(paths.values()), manifest, overwrite=overwrite)
    named = dict(paths) | ({"the manifest": group.manifest} if group.manifest is not None else {})
    check_paths(inputs, named, pool_dirs=pool_dirs)
    with lock_outputs(group.all_paths()):
        group.recover()
        group.check_overwrite()
        with group.writing():
            yield group
