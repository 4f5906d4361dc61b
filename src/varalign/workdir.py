"""The work directory: one result file + completion marker per finished shard task, so a killed
run resumes where it stopped (datatrove-style). Results are plain numpy arrays (never pickle).

Ownership: a work directory is varalign's only if it holds the marker file varalign wrote when it
created it (`.varalign-workdir`, with a random token). varalign removes nothing else: a user-given
folder that is not empty and has no marker is refused, and `remove()` checks the marker (and its
token) first. A finished task whose files are missing, truncated or corrupt is simply redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, os_error, save_json
from .errors import VaralignError
from .npz import load_npy, load_npz

MARKER = ".varalign-workdir"
GROUP_PREFIX, GROUP_NAMES, GROUP_SEP = "g-", "__names__", "~"  # group files: many tasks' results in one
GROUP_CAT, GROUP_LEN = "cat~", "len~"  # a key's arrays of every task of a group, concatenated, and their lengths


def _concatenable(parts: list[np.ndarray]) -> bool:
    """One dtype and one shape but the first axis (or all 0-d): stored as one array and its lengths."""
    first = parts[0]
    return all(p.dtype == first.dtype and p.ndim == first.ndim and p.shape[1:] == first.shape[1:] for p in parts) \
        and first.dtype != object


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """`np.concatenate` of arrays of one dtype; a structured one (a uid's `u8,u8`) joined as plain bytes of
    its size, then viewed back: the same array, without numpy promoting the fields pair by pair (~15 us
    an array, which a group of many small shards pays for every one)."""
    dtype = parts[0].dtype
    if dtype.names is None or not all(p.flags.c_contiguous for p in parts):
        return np.concatenate(parts)
    raw = np.dtype(f"V{dtype.itemsize}")
    return np.concatenate([p.view(raw) for p in parts]).view(dtype)


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (the identity of a plan or a phase)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_marker(root: Path) -> dict | None:
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "varalign" else None


def is_ours(root: str | os.PathLike) -> bool:
    return _read_marker(Path(root)) is not None


class WorkDir:
    """`{root}/plan.json` + `{root}/{phase}/{shard}.npz` with `{shard}.done` markers."""

    def __init__(self, root: str | os.PathLike, plan: str) -> None:
        self.root = Path(root)
        self.plan = plan
        self.reused = 0
        self._verified: set[tuple[str, str]] = set()
        self._group_index: dict[str, dict[str, tuple[str, int]]] = {}
        self._markers: dict[str, set[str]] = {}  # per phase, the `.done` markers there when it was first read
        self._open_npz: tuple[tuple[str, str], Any] | None = None
        try:
            self._open()
        except OSError as exc:
            raise os_error(exc, "cannot use the work directory", self.root) from None

    def _open(self) -> None:
        root = self.root
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise VaralignError("the work directory exists and is not a folder", root)
        marker = _read_marker(root) if root.exists() else None
        if root.exists() and marker is None and any(root.iterdir()):
            raise VaralignError("the work directory is not empty and was not created by varalign (no "
                                f"{MARKER} marker): refused, nothing in it is touched; give an empty or new folder",
                                root)
        self.created = marker is None
        if marker is None:  # an empty folder the user made is emptied at the end, not removed
            marker = {"tool": "varalign", "token": secrets.token_hex(8), "pid": os.getpid(),
                      "keep_folder": root.exists()}
            root.mkdir(parents=True, exist_ok=True)
            save_json(root / MARKER, marker)
        self.token = marker["token"]
        self.keep_folder = bool(marker.get("keep_folder"))
        meta = root / "plan.json"
        try:
            same = json.loads(meta.read_text()).get("plan") == self.plan
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:  # inputs or configuration changed: nothing in here is valid (and all of it is ours)
            self._clear()
            save_json(meta, {"plan": self.plan})

    def _clear(self, marker_too: bool = False) -> None:
        self._check_owned()
        self.close()
        self._group_index, self._verified, self._markers = {}, set(), {}
        for entry in self.root.iterdir():
            if entry.name == MARKER and not marker_too:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _check_owned(self) -> None:
        marker = _read_marker(self.root)
        if marker is None or marker.get("token") != self.token:
            raise VaralignError(f"the work directory's {MARKER} marker changed or vanished: not removing it", self.root)

    def path(self, phase: str, name: str = "") -> Path:
        d = self.root / phase
        d.mkdir(exist_ok=True)
        return d / name if name else d

    def has(self, phase: str, name: str) -> bool:
        """Whether the task `name` of `phase` has finished and its result is intact (else it is redone)."""
        if (phase, name) in self._verified:
            return True
        where = self._groups(phase).get(name)
        if where is not None:  # saved with other tasks in a group file
            if self._has_file(phase, where[0]):
                self._verified.add((phase, name))
                return True
            self._forget_group(phase, where[0])
        if not self._has_file(phase, name):
            return False
        self._verified.add((phase, name))
        return True

    def _has_file(self, phase: str, name: str) -> bool:
        """Whether `{name}.npz` and its `.done` marker are there and intact (checked once per process)."""
        if (phase, f"file:{name}") in self._verified:
            return True
        self._groups(phase)  # lists the phase's markers once: a task finished by this process is in _verified
        if f"{name}.done" not in self._markers.get(phase, ()):  # no marker: not finished (no stat per task)
            return False
        done, result = self.root / phase / f"{name}.done", self.root / phase / f"{name}.npz"
        if not done.exists():
            return False
        try:
            size = int(done.read_text().strip() or -1)
            ok = result.stat().st_size == size
            if ok:
                with zipfile.ZipFile(result) as zf:
                    ok = zf.testzip() is None  # every member's CRC
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            ok = False
        if not ok:  # truncated, empty or corrupt (power loss, a full disk): redo the task(s)
            for p in (done, result):
                with contextlib.suppress(OSError):
                    p.unlink()
            return False
        self._verified.add((phase, f"file:{name}"))
        return True

    def load(self, phase: str, name: str) -> dict[str, np.ndarray] | None:
        """A finished task's arrays, or None if it has not finished."""
        if not self.has(phase, name):
            return None
        self.reused += 1
        where = self._groups(phase).get(name)
        if where is not None:
            return self._group_member(phase, where)
        return load_npz(self.root / phase / f"{name}.npz")

    def save(self, phase: str, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Write the result atomically, then its completion marker (holding the result's size). Not
        fsynced: a result torn by a power loss fails `has()`'s size and CRC checks and is redone."""
        self._save_file(phase, name, arrays)
        self._verified.add((phase, name))

    def save_many(self, phase: str, results: dict[str, dict[str, np.ndarray]]) -> None:
        """Several tasks' results in one group file (`g-<digest>.npz` + marker): a pool of many small shards
        costs one file creation per group, not two per shard (each costs ~0.5 ms on common filesystems).
        A group is all or nothing: a torn one is redone whole."""
        if len(results) <= 1:
            for name, arrays in results.items():
                self.save(phase, name, arrays)
            return
        names = list(results)
        members: dict[str, np.ndarray] = {GROUP_NAMES: np.array(names, dtype=str)}
        for key in {k: None for arrays in results.values() for k in arrays}:  # in first-seen order
            parts = [np.asarray(arrays[key]) for arrays in results.values() if key in arrays]
            if len(parts) == len(names) and _concatenable(parts):  # one member per key: few zip entries
                members[f"{GROUP_CAT}{key}"] = _concatenate([p.reshape(-1, *p.shape[1:]) for p in parts])
                members[f"{GROUP_LEN}{key}"] = np.array([len(p) if p.ndim else -1 for p in parts], dtype=np.int64)
            else:
                members |= {f"{j}{GROUP_SEP}{key}": arrays[key] for j, arrays in enumerate(results.values())
                            if key in arrays}
        file = f"{GROUP_PREFIX}{digest(phase, names)}"
        self._save_file(phase, file, members)
        self._verified.add((phase, f"file:{file}"))
        self._groups(phase).update({n: (file, j) for j, n in enumerate(names)})
        self._verified.update((phase, n) for n in names)

    def _save_file(self, phase: str, name: str, arrays: dict[str, np.ndarray]) -> None:
        dest = self.path(phase, f"{name}.npz")
        try:
            with atomic_path(dest, ".npz", durable=False) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
            with atomic_path(self.root / phase / f"{name}.done", durable=False) as tmp:
                tmp.write_text(f"{dest.stat().st_size}\n")
        except VaralignError as exc:
            raise VaralignError(f"cannot write the work directory: {exc}", self.root) from None

    def _groups(self, phase: str) -> dict[str, tuple[str, int]]:
        """{task name: (group file, index in it)} for the group files of `phase` (read once, then kept)."""
        if phase not in self._group_index:
            index: dict[str, tuple[str, int]] = {}
            folder = self.root / phase
            with contextlib.suppress(OSError):
                self._markers[phase] = {n for n in os.listdir(folder) if n.endswith(".done")}
            for done in sorted(folder.glob(f"{GROUP_PREFIX}*.done")) if folder.is_dir() else ():
                file = done.name[: -len(".done")]
                try:
                    names = load_npz(folder / f"{file}.npz", [GROUP_NAMES])[GROUP_NAMES].tolist()
                except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                    continue  # torn: its tasks are redone (has() removes it when asked)
                index.update({n: (file, j) for j, n in enumerate(names)})
            self._group_index[phase] = index
        return self._group_index[phase]

    def _forget_group(self, phase: str, file: str) -> None:
        index = self._groups(phase)
        for n in [n for n, (f, _) in index.items() if f == file]:
            del index[n]

    def _group_member(self, phase: str, where: tuple[str, int]) -> dict[str, np.ndarray]:
        """Task `where[1]`'s arrays in the group file `where[0]` (its members are read once, while consecutive
        tasks are read from the same group)."""
        key = (phase, where[0])
        if self._open_npz is None or self._open_npz[0] != key:
            self.close()
            self._open_npz = (key, load_npz(self.root / phase / f"{where[0]}.npz"))
        members, j = self._open_npz[1], where[1]
        out: dict[str, np.ndarray] = {}
        for k, v in members.items():
            if k.startswith(GROUP_CAT):
                lengths = members[GROUP_LEN + k[len(GROUP_CAT):]]
                start = int(np.where(lengths[:j] < 0, 1, lengths[:j]).sum())  # -1: a 0-d array, one row
                out[k[len(GROUP_CAT):]] = v[start] if lengths[j] < 0 else v[start : start + int(lengths[j])]
            elif k.startswith(f"{j}{GROUP_SEP}"):
                out[k[len(f"{j}{GROUP_SEP}"):]] = v
        return out

    def close(self) -> None:
        self._open_npz = None

    def finished(self, phase: str) -> list[str]:
        """The names of the tasks of `phase` whose results are on disk (single or in a group file)."""
        folder = self.root / phase
        singles = [d.name[: -len(".done")] for d in folder.glob("*.done") if not d.name.startswith(GROUP_PREFIX)] \
            if folder.is_dir() else []
        return sorted(set(singles) | set(self._groups(phase)))

    def read(self, phase: str, name: str, key: str) -> np.ndarray | None:
        """One array of a finished task's result (not counted as reused), or None if there is none."""
        where = self._groups(phase).get(name)
        if where is not None:
            return self._group_member(phase, where).get(key)
        path = self.root / phase / f"{name}.npz"
        if not path.exists():
            return None
        try:
            return load_npz(path, [key])[key]
        except KeyError:
            return None

    def put_array(self, phase: str, name: str, array: np.ndarray) -> None:
        """Store one array of the run's own state (a keep mask, a column) as `{phase}/{name}.npy`."""
        try:
            with atomic_path(self.path(phase, f"{name}.npy"), ".npy", durable=False) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, array, allow_pickle=False)
        except VaralignError as exc:
            raise VaralignError(f"cannot write the work directory: {exc}", self.root) from None

    def get_array(self, phase: str, name: str) -> np.ndarray:
        """An array stored by `put_array`."""
        return load_npy(self.root / phase / f"{name}.npy")

    def remove(self) -> None:
        """Remove the work directory, only if it still carries our marker (with our token)."""
        if not self.root.exists():
            return
        self._check_owned()
        self.close()
        if self.keep_folder:
            self._clear(marker_too=True)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


class Steps:
    """Finished steps whose results are files outside the work directory (embed's shards, reshard's index,
    minicomp's teacher, subsets, trainings): the one resume scheme of embed, reshard, minicomp and the
    experiment loop, on the work directory's terms.

    A step's record is a task result of `work` (phase `phase`, completion marker, redone when damaged)
    naming the step's output files with their sizes and holding a small JSON-able `info`. `done(name)`
    is the record's info if the step finished, with the same `key` (the identity of its inputs and
    settings, when given), and every file it names is still there with the recorded size; otherwise
    None, the record is dropped, and the step is to be redone. A changed plan (inputs or configuration)
    clears every record, as for every work directory.
    """

    def __init__(self, work: WorkDir, phase: str = "steps") -> None:
        self.work, self.phase = work, phase

    def done(self, name: str, key: str = "") -> dict | None:
        if not self.work.has(self.phase, name):
            return None
        npz = load_npz(self.work.root / self.phase / f"{name}.npz", ["files", "sizes", "info", "key"])
        files, sizes, info = npz["files"].tolist(), npz["sizes"].tolist(), str(npz["info"])
        same = str(npz["key"]) == key
        if not same:  # made from other inputs or settings
            self.drop(name)
            return None
        for f, size in zip(files, sizes, strict=True):
            try:
                ok = os.stat(f).st_size == size
            except OSError:
                ok = False
            if not ok:  # an output went missing or changed since: redo the step
                self.drop(name)
                return None
        return json.loads(info)

    def finish(self, name: str, files: Sequence[str | os.PathLike] = (), info: dict | None = None,
               key: str = "") -> None:
        """Record step `name` as finished: its output `files` (their sizes now), `info` and `key`."""
        paths = [os.path.abspath(f) for f in files]
        try:
            sizes = [os.stat(p).st_size for p in paths]
        except OSError as exc:
            raise os_error(exc, "a finished step's output is missing", self.work.root) from None
        self.work.save(self.phase, name, {"files": np.array(paths, dtype=str), "sizes": np.array(sizes, np.int64),
                                          "info": np.array(json.dumps(info or {}, sort_keys=True)),
                                          "key": np.array(key)})

    def drop(self, name: str) -> None:
        """Forget step `name` (it will be redone)."""
        self.work._verified.discard((self.phase, name))
        for suffix in (".done", ".npz"):
            with contextlib.suppress(OSError):
                (self.work.root / self.phase / f"{name}{suffix}").unlink()
