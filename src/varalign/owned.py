"""Files a command writes into a folder it shares with the user (evaluate's tables, experiment's comparison,
minicomp's results, download's report, train's info.json).

A ledger in the folder (`.varalign-files.json`) records each such file's size and SHA-256 when varalign writes
it. Before any work, `check_replaceable` refuses a file of those names that the ledger does not account for (the
user's own, or one changed since varalign wrote it), unless `overwrite`, and a `.varalign-files.json` that is not
varalign's ledger (always); `record` adds the files once written.
The same rule as `filter`'s manifest, for folders of several named outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from .atomic import file_sha256, save_json
from .errors import VaralignError

LEDGER = ".varalign-files.json"


def _ledger(folder: Path) -> dict[str, dict]:
    """The ledger's records ({} when there is none); a file of that name that is not varalign's ledger (the
    user's own, a link, not our JSON) is refused, never replaced, whatever `overwrite` says."""
    path = folder / LEDGER
    if not (path.exists() or path.is_symlink()):
        return {}
    try:
        data = None if path.is_symlink() else json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    files = data.get("files") if isinstance(data, dict) and data.get("tool") == "varalign" else None
    if not isinstance(files, dict):
        raise VaralignError("exists and is not varalign's ledger of the files it wrote here: not overwritten; "
                            "remove or rename it, or choose another folder", path)
    return files


def _accounted(path: Path, record: object) -> bool:
    if not isinstance(record, dict):
        return False
    try:
        return path.stat().st_size == record.get("size") and file_sha256(path) == record.get("sha256")
    except OSError:
        return False


def _json_keys(path: Path, keys: set[str]) -> bool:
    """Whether `path` is a JSON object with `keys` (or a non-empty list of such objects): a file of the group an
    earlier varalign wrote before it kept a ledger, or one whose ledger entry a kill cut off."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    rows = data if isinstance(data, list) and data else [data]
    return all(isinstance(r, dict) and keys <= set(r) for r in rows)


def check_replaceable(folder: str | os.PathLike, names: Iterable[str], overwrite: bool = False,
                      known_by: tuple[str, set[str]] | None = None) -> None:
    """Refuse (one line naming the file) an existing `folder/name` that varalign did not write, or that was
    changed since; with `overwrite` anything may be replaced. `known_by=(name, keys)`: in a folder without a
    ledger, the group of files is recognisably varalign's (then none is refused) when `folder/name` is a JSON
    object with `keys`."""
    folder = Path(folder)
    ledger = _ledger(folder)  # first: `record` will rewrite the ledger, so a foreign file there is refused now
    if overwrite:
        return
    if not ledger and known_by is not None and _json_keys(folder / known_by[0], known_by[1]):
        return  # a folder an earlier varalign wrote before it kept a ledger; with a ledger, the ledger decides
    for name in names:
        path = folder / name
        if (path.exists() or path.is_symlink()) and not _accounted(path, ledger.get(name)):
            raise VaralignError("exists and was not written by varalign (or was changed since): not overwritten; "
                                "remove it, choose another folder, or pass --overwrite", path)


def record(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Add the files `folder/name` just written to the folder's ledger."""
    folder = Path(folder)
    ledger = _ledger(folder)
    for name in names:
        path = folder / name
        if path.is_file():
            ledger[name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    save_json(folder / LEDGER, {"tool": "varalign", "files": ledger})


def unchanged_since_written(folder: str | os.PathLike, name: str) -> bool:
    """Whether `folder/name` is a file the folder's ledger records, unchanged since varalign wrote it."""
    folder = Path(folder)
    try:
        ledger = _ledger(folder)
    except VaralignError:
        return False
    return (folder / name).is_file() and _accounted(folder / name, ledger.get(name))
