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
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import storage
from .atomic import OutputGroup, check_output_path
from .errors import VaralignError

POOL_SUFFIXES = (".parquet", ".npz")


def _real(path: str | os.PathLike) -> Path | str:
    if storage.is_url(path):
        return str(path).rstrip("/")
    return Path(os.path.realpath(os.path.abspath(path)))


def _same(a: Path | str, b: Path | str) -> bool:
    if storage.is_url(a) or storage.is_url(b):
        return _real(a) == _real(b)
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: Path | str, parent: Path | str) -> bool:
    c, p = _real(child), _real(parent)
    if isinstance(c, str) or isinstance(p, str):
        return isinstance(c, str) and isinstance(p, str) and c.startswith(p + "/")
    return c != p and p in c.parents


def _parent(p: Path | str) -> Path | str:
    return str(p).rstrip("/").rpartition("/")[0] if storage.is_url(p) else Path(p).parent


def _name(p: Path | str) -> str:
    return str(p).rstrip("/").rpartition("/")[2] if storage.is_url(p) else Path(p).name


def check_paths(inputs: dict[str, object], outputs: dict[str, object], work_dir: object | None = None,
                pool_dirs: Iterable[object] = (), dir_label: str = "work directory") -> None:
    """Refuse (one line, naming both) any output that is an input, another output, or inside the
    work directory; a work directory that is or holds an input or an output; and a `.parquet`/`.npz`
    output inside a pool directory (the next run would read it as a shard).

    `inputs`/`outputs`: {flag or label: path (or a list of paths)}; None values are skipped.
    """
    ins = [(k, _as_path(p)) for k, v in inputs.items() for p in _paths(v)]
    outs = [(k, _as_path(p)) for k, v in outputs.items() for p in _paths(v)]
    for i, (ko, o) in enumerate(outs):
        for ki, p in ins:
            if _same(o, p):
                raise VaralignError(f"{ko} is the same file as the input {ki} ({p}): refused, it would be overwritten", o)
        for ko2, o2 in outs[i + 1:]:
            if _same(o, o2):
                raise VaralignError(f"{ko} and {ko2} are the same file: give each output its own path", o)
    for label, d in [("pool", _as_path(x)) for x in _paths(list(pool_dirs))]:
        for ko, o in outs:
            if _name(o).endswith(POOL_SUFFIXES) and _same(_parent(o), d):
                raise VaralignError(f"{ko} is inside the {label} directory {d}: the next run would read it as a "
                                    "shard; write it elsewhere", o)
    if work_dir is None:
        return
    w = _as_path(work_dir)
    for kind, items in (("input", ins), ("output", outs)):
        for k, p in items:
            if _same(w, p):
                raise VaralignError(f"the {dir_label} is the {kind} {k} ({p}): refused", w)
            if _inside(p, w):
                raise VaralignError(f"the {dir_label} holds the {kind} {k} ({p}): refused", w)


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

        folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "varalign" / "locks"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{hashlib.sha256(str(output).encode()).hexdigest()[:24]}.lock"
    p = Path(output)
    return p.with_name(f".{p.name}.varalign.lock")


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
